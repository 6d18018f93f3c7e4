//! `shoal reload`: finds the daemon behind the socket, sends it SIGHUP, and prints the
//! outcome it records.
//!
//! The daemon is the process that listens on the socket (its peer credentials say which), not
//! whatever a pid file claims, so a stale file can never make this signal another process.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::Outcome;

/// How long the daemon may take to read and apply its config.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// The pid of the process listening on `socket`, by the peer credentials of a connection.
pub fn listener_pid(socket: &Path) -> anyhow::Result<u32> {
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to shoal-snapshotter at {}: is it running?",
            socket.display()
        )
    })?;
    let credentials =
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .with_context(|| format!("ask who listens on {}", socket.display()))?;
    u32::try_from(credentials.pid()).context("the socket's owner has no pid here")
}

/// Asks the daemon serving `socket` to reload; its outcome.
pub fn reload(socket: &Path) -> anyhow::Result<Outcome> {
    let pid = listener_pid(socket)?;
    let before = Outcome::read(socket)
        .filter(|outcome| outcome.pid == pid)
        .map_or(0, |outcome| outcome.generation);
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
        .with_context(|| format!("send SIGHUP to shoal-snapshotter (pid {pid})"))?;
    let started = Instant::now();
    loop {
        if let Some(outcome) = Outcome::read(socket) {
            if outcome.pid == pid && outcome.generation > before {
                return Ok(outcome);
            }
        }
        if started.elapsed() > OUTCOME_TIMEOUT {
            anyhow::bail!(
                "sent SIGHUP to shoal-snapshotter (pid {pid}), but no outcome appeared in {} \
                 within {OUTCOME_TIMEOUT:?}; its log says what it did",
                super::outcome::path(socket).display()
            );
        }
        std::thread::sleep(POLL);
    }
}
