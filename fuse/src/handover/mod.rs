//! Where FUSE connections wait between daemons: an [`FdStore`] keeps a copy of each mounted
//! layer's `/dev/fuse` fd, so the connection outlives a daemon that stops or dies, and hands
//! the copies to the next daemon. Shoal's store is [`Holder`], a process that does nothing
//! else, reached over a unix socket ([`HolderClient`]); its protocol is [`protocol`]'s. A
//! daemon run as a systemd service may use systemd's own fd store instead ([`SystemdStore`]).

mod client;
mod holder;
pub mod protocol;
mod systemd;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub use client::HolderClient;
pub use holder::{Holder, HolderPolicy};
pub use systemd::{notify as systemd_notify, SystemdEnvironment, SystemdStore};

/// Why the fd store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("connect to the fd holder at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("talk to the fd holder at {socket}")]
    Exchange {
        socket: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("the fd holder at {socket} answered {answer:?}")]
    Refused { socket: PathBuf, answer: String },
    #[error("prepare {dir} for the fd holder")]
    PrepareDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("start the fd holder {program}")]
    Start {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fd holder {program} did not answer at {socket} within {seconds} s")]
    NotAnswering {
        program: PathBuf,
        socket: PathBuf,
        seconds: u64,
    },
    #[error("invalid {variable} from systemd: {why}")]
    SystemdEnvironment { variable: &'static str, why: String },
    #[error("take over the fd systemd passed for {name}")]
    Adopt {
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("send to systemd's notify socket {socket}")]
    Notify {
        socket: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("systemd cannot store an fd named {name:?} (at most 255 ASCII bytes, no `:`)")]
    UnstorableName { name: String },
    #[error("systemd's fd store is full ({max} fds, the unit's FileDescriptorStoreMax=)")]
    StoreFull { max: usize },
}

/// Keeps fds under names across the lives of daemons.
pub trait FdStore: Send + Sync + 'static {
    /// Keeps a copy of `fd` under `name`, replacing one kept under it before.
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HandoverError>;

    /// Closes the copy kept under `name`, if there is one.
    fn release(&self, name: &str) -> Result<(), HandoverError>;

    /// Copies of every fd kept, by name; the store keeps its own.
    fn kept(&self) -> Result<Vec<(String, OwnedFd)>, HandoverError>;

    /// Where it keeps them, for status and logs.
    fn describe(&self) -> String;
}
