//! [`HolderClient`]: the daemon's side of the fd holder.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use parking_lot::Mutex;

use super::protocol::{self, ATTACH, ERROR, FD, KEEP, LIST, OK, RELEASE, VERSION};
use super::{FdStore, HandoverError};

/// How long a holder just started may take to answer.
const START_WAIT: Duration = Duration::from_secs(5);

/// Talks to the fd holder at a socket; one connection per request, plus one held open while
/// this daemon runs, which is how the holder knows a daemon is there.
pub struct HolderClient {
    socket: PathBuf,
    attached: Mutex<Option<OwnedFd>>,
}

impl HolderClient {
    /// A client of the holder at `socket`, not attached: for requests only.
    pub fn at(socket: &Path) -> HolderClient {
        HolderClient {
            socket: socket.to_owned(),
            attached: Mutex::new(None),
        }
    }

    /// Connects to the holder at `socket` and attaches, first starting `program` there if none
    /// answers: detached into a session of its own, so that it outlives this process, letting
    /// connections go after `orphan_after` with no daemon attached.
    pub fn connect_or_start(
        socket: &Path,
        program: &Path,
        orphan_after: Duration,
    ) -> Result<HolderClient, HandoverError> {
        let client = HolderClient::at(socket);
        if client.attach().is_ok() {
            return Ok(client);
        }
        let start = |source| HandoverError::Start {
            program: program.to_owned(),
            source,
        };
        // The socket's directory may not exist yet (a fresh /run); the holder's log sits in it.
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|source| HandoverError::PrepareDir {
                dir: dir.to_owned(),
                source,
            })?;
        }
        let log_path = socket.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| HandoverError::PrepareDir {
                dir: log_path.clone(),
                source,
            })?;
        // The holder forks itself away and this child exits at once, so nothing is left to reap.
        let status = Command::new(program)
            .arg("--socket")
            .arg(socket)
            .arg("--orphan-after-secs")
            .arg(orphan_after.as_secs().to_string())
            .arg("--detach")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(start)?)
            .stderr(log)
            .status()
            .map_err(start)?;
        if !status.success() {
            return Err(start(std::io::Error::other(format!(
                "exited with {status}"
            ))));
        }
        let started = Instant::now();
        loop {
            match client.attach() {
                Ok(()) => return Ok(client),
                Err(_) if started.elapsed() < START_WAIT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => {
                    return Err(HandoverError::NotAnswering {
                        program: program.to_owned(),
                        socket: socket.to_owned(),
                        seconds: START_WAIT.as_secs(),
                    })
                }
            }
        }
    }

    fn connect(&self) -> Result<OwnedFd, HandoverError> {
        let fail = |source| HandoverError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(fail)?;
        let address = UnixAddr::new(&self.socket).map_err(fail)?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address).map_err(fail)?;
        Ok(fd)
    }

    fn exchange_error(&self, source: nix::errno::Errno) -> HandoverError {
        HandoverError::Exchange {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Sends one request and reads answers until `OK`, passing each fd answer to `each`.
    fn request(
        &self,
        op: u8,
        name: &str,
        fd: Option<BorrowedFd<'_>>,
        mut each: impl FnMut(String, OwnedFd),
    ) -> Result<OwnedFd, HandoverError> {
        let connection = self.connect()?;
        let mut message = vec![VERSION, op];
        message.extend_from_slice(name.as_bytes());
        protocol::send(connection.as_fd(), &message, fd).map_err(|e| self.exchange_error(e))?;
        loop {
            let (answer, fd) =
                protocol::receive(connection.as_fd()).map_err(|e| self.exchange_error(e))?;
            match (answer.first(), fd) {
                (Some(&OK), _) => return Ok(connection),
                (Some(&FD), Some(fd)) => each(String::from_utf8_lossy(&answer[1..]).into(), fd),
                (Some(&ERROR), _) | (_, _) => {
                    return Err(HandoverError::Refused {
                        socket: self.socket.clone(),
                        answer: String::from_utf8_lossy(&answer).into(),
                    })
                }
            }
        }
    }

    /// Tells the holder a daemon runs, for as long as this client lives.
    fn attach(&self) -> Result<(), HandoverError> {
        let connection = self.request(ATTACH, "", None, |_, _| {})?;
        *self.attached.lock() = Some(connection);
        Ok(())
    }
}

impl FdStore for HolderClient {
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HandoverError> {
        self.request(KEEP, name, Some(fd), |_, _| {}).map(drop)
    }

    fn release(&self, name: &str) -> Result<(), HandoverError> {
        self.request(RELEASE, name, None, |_, _| {}).map(drop)
    }

    fn kept(&self) -> Result<Vec<(String, OwnedFd)>, HandoverError> {
        let mut kept = Vec::new();
        self.request(LIST, "", None, |name, fd| kept.push((name, fd)))?;
        Ok(kept)
    }

    fn describe(&self) -> String {
        format!("fd holder at {}", self.socket.display())
    }
}
