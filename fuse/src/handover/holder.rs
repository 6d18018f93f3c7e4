//! [`Holder`]: the process that keeps FUSE connections alive between daemons. It does nothing
//! but keep fds by name and hand copies back, so it never needs upgrading with the daemon.
//!
//! Policy: a kept fd whose connection has ended (its mount is gone, the kernel reports POLLERR)
//! is closed within a second. With no daemon attached for [`HolderPolicy::orphan_after`],
//! every fd is closed, ending those connections, so that mounts no daemon will serve again do
//! not wait forever. With nothing kept and no daemon attached for
//! [`HolderPolicy::idle_exit`], the holder exits; the next daemon starts another.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::protocol::{self, ATTACH, ERROR, FD, KEEP, LIST, OK, RELEASE, VERSION};
use super::HandoverError;

/// When the holder lets go of what it keeps.
#[derive(Debug, Clone, Copy)]
pub struct HolderPolicy {
    /// With no daemon attached for this long, every kept fd is closed.
    pub orphan_after: Duration,
    /// With nothing kept and no daemon attached for this long, the holder exits; `None`: never
    /// (a holder run as a service of its own).
    pub idle_exit: Option<Duration>,
}

/// A bound holder, ready to [`Holder::run`].
pub struct Holder {
    socket: PathBuf,
    listener: OwnedFd,
    policy: HolderPolicy,
    state: Arc<Mutex<State>>,
}

struct State {
    kept: BTreeMap<String, OwnedFd>,
    attached: usize,
    /// Connections accepted and not yet hung up: a client whose first request is still on its
    /// way must not find the holder gone.
    open: usize,
    /// Since when no daemon is attached.
    alone_since: Instant,
}

impl Holder {
    /// Binds `socket` (root's alone). A socket file nobody answers on is a dead holder's and is
    /// replaced; one that answers means a holder runs there already.
    pub fn bind(socket: &Path, policy: HolderPolicy) -> Result<Holder, HandoverError> {
        let fail = |source| HandoverError::Connect {
            socket: socket.to_owned(),
            source,
        };
        let address = UnixAddr::new(socket).map_err(fail)?;
        if socket.exists() {
            let probe = seqpacket().map_err(fail)?;
            if connect(probe.as_raw_fd(), &address).is_ok() {
                return Err(HandoverError::Refused {
                    socket: socket.to_owned(),
                    answer: "a holder runs there already".into(),
                });
            }
            let _ = std::fs::remove_file(socket);
        }
        if let Some(dir) = socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let listener = seqpacket().map_err(fail)?;
        bind(listener.as_raw_fd(), &address).map_err(fail)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        listen(&listener, Backlog::new(64).map_err(fail)?).map_err(fail)?;
        Ok(Holder {
            socket: socket.to_owned(),
            listener,
            policy,
            state: Arc::new(Mutex::new(State {
                kept: BTreeMap::new(),
                attached: 0,
                open: 0,
                alone_since: Instant::now(),
            })),
        })
    }

    /// Serves until the idle policy says to exit.
    pub fn run(self) -> Result<(), HandoverError> {
        info!(socket = %self.socket.display(), "fd holder serving");
        loop {
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(0) | Err(Errno::EINTR) => {}
                Ok(_) => match accept(self.listener.as_raw_fd()) {
                    Ok(raw) => {
                        // SAFETY: accept returned a new fd that nothing else owns.
                        let connection = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
                        let state = self.state.clone();
                        state.lock().open += 1;
                        std::thread::spawn(move || serve(connection, &state));
                    }
                    Err(err) => warn!(error = %err, "accept failed"),
                },
                Err(source) => {
                    return Err(HandoverError::Exchange {
                        socket: self.socket.clone(),
                        source,
                    })
                }
            }
            if self.tick() && !self.connection_waiting() {
                info!(socket = %self.socket.display(), "nothing kept and no daemon attached; fd holder exiting");
                let _ = std::fs::remove_file(&self.socket);
                return Ok(());
            }
        }
    }

    /// Whether a client has connected and waits to be accepted.
    fn connection_waiting(&self) -> bool {
        let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    }

    /// Applies the policy once; true when the holder should exit.
    fn tick(&self) -> bool {
        let mut state = self.state.lock();
        state.kept.retain(|name, fd| {
            let ended = connection_ended(fd.as_fd());
            if ended {
                info!(name, "connection ended; its fd is released");
            }
            !ended
        });
        let alone = state.attached == 0;
        let alone_for = state.alone_since.elapsed();
        if alone && alone_for >= self.policy.orphan_after && !state.kept.is_empty() {
            warn!(
                connections = state.kept.len(),
                seconds = alone_for.as_secs(),
                "no daemon attached for too long: releasing every connection (their mounts fail until a daemon mounts them again)"
            );
            state.kept.clear();
        }
        alone
            && state.open == 0
            && state.kept.is_empty()
            && self.policy.idle_exit.is_some_and(|idle| alone_for >= idle)
    }
}

/// Whether the kernel ended the connection behind `fd` (unmounted, aborted).
fn connection_ended(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        }),
        Err(_) => false,
    }
}

fn seqpacket() -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Answers one client until it hangs up.
fn serve(connection: OwnedFd, state: &Mutex<State>) {
    let mut attached = false;
    loop {
        let Ok((message, fd)) = protocol::receive(connection.as_fd()) else {
            break;
        };
        if message.is_empty() {
            break;
        }
        let answer = answer(&connection, state, &message, fd, &mut attached);
        if protocol::send(connection.as_fd(), &answer, None).is_err() {
            break;
        }
    }
    let mut state = state.lock();
    state.open -= 1;
    if attached {
        state.attached -= 1;
        if state.attached == 0 {
            state.alone_since = Instant::now();
        }
    }
}

fn answer(
    connection: &OwnedFd,
    state: &Mutex<State>,
    message: &[u8],
    fd: Option<OwnedFd>,
    attached: &mut bool,
) -> Vec<u8> {
    let refuse = |why: &str| [&[ERROR][..], why.as_bytes()].concat();
    let [version, op, name @ ..] = message else {
        return refuse("short request");
    };
    if *version != VERSION {
        return refuse("unknown protocol version");
    }
    let name = String::from_utf8_lossy(name).into_owned();
    match *op {
        KEEP => {
            let Some(fd) = fd else {
                return refuse("keep without an fd");
            };
            state.lock().kept.insert(name, fd);
        }
        RELEASE => {
            state.lock().kept.remove(&name);
        }
        LIST => {
            // Copies are made under the lock, sent after it.
            let copies: Vec<(String, OwnedFd)> = state
                .lock()
                .kept
                .iter()
                .filter_map(|(name, fd)| Some((name.clone(), fd.try_clone().ok()?)))
                .collect();
            for (name, fd) in copies {
                let message = [&[FD][..], name.as_bytes()].concat();
                if protocol::send(connection.as_fd(), &message, Some(fd.as_fd())).is_err() {
                    return refuse("list interrupted");
                }
            }
        }
        ATTACH if !*attached => {
            *attached = true;
            state.lock().attached += 1;
        }
        _ => return refuse("unknown request"),
    }
    vec![OK]
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::handover::{FdStore, HolderClient};

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn keeps_lists_and_releases_fds_by_name_and_exits_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let policy = HolderPolicy {
            orphan_after: Duration::from_secs(3600),
            idle_exit: Some(Duration::from_millis(1)),
        };
        let holder = Holder::bind(&socket, policy).unwrap();
        let second = Holder::bind(&socket, policy);
        assert!(second.is_err(), "a second holder on a live socket");
        let served = std::thread::spawn(move || holder.run());

        let client = HolderClient::at(&socket);
        client.keep("/a/fs", null().as_fd()).unwrap();
        client.keep("/b/fs", null().as_fd()).unwrap();
        client.keep("/a/fs", null().as_fd()).unwrap();
        let mut names: Vec<String> = client.kept().unwrap().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, ["/a/fs", "/b/fs"], "one fd per name, the latest");
        let copy = client.kept().unwrap().remove(0).1;
        assert!(nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&copy)).is_ok());

        client.release("/a/fs").unwrap();
        client.release("/never-kept").unwrap();
        let names: Vec<String> = client.kept().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["/b/fs"]);
        client.release("/b/fs").unwrap();
        // Nothing kept and nobody attached: it exits (within its one-second tick) and removes
        // its socket.
        served.join().unwrap().unwrap();
        assert!(!socket.exists());
    }

    #[test]
    fn an_attached_daemon_keeps_the_holder_and_its_fds() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let policy = HolderPolicy {
            orphan_after: Duration::from_millis(1),
            idle_exit: Some(Duration::from_millis(1)),
        };
        let holder = Holder::bind(&socket, policy).unwrap();
        let served = std::thread::spawn(move || holder.run());
        let program = std::path::Path::new("/nonexistent/shoal-fdholder");
        let daemon =
            HolderClient::connect_or_start(&socket, program, Duration::from_secs(1)).unwrap();
        daemon.keep("/a/fs", null().as_fd()).unwrap();
        // Several ticks pass with the daemon attached: nothing is let go.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(daemon.kept().unwrap().len(), 1);
        // The daemon goes: past orphan_after the fds are released, then the holder exits.
        drop(daemon);
        served.join().unwrap().unwrap();
    }
}
