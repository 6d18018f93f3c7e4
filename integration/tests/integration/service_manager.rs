//! The part of systemd a service's fd store is made of, for a machine without systemd as PID 1:
//! a notify socket that takes `READY=1`, `FDSTORE=1` (the fd in `SCM_RIGHTS`, named by
//! `FDNAME=`) and `FDSTOREREMOVE=1`, the way `service_notify_message` does, and the start of a
//! service with the stored fds from 3 on, `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// What the store holds and what the service said.
#[derive(Default)]
struct State {
    stored: Vec<(String, OwnedFd)>,
    ready: usize,
}

/// A notify socket and the fd store behind it, served by a thread until dropped.
pub struct ServiceManager {
    socket: PathBuf,
    /// `FileDescriptorStoreMax=`, told to the service as `$FDSTORE`.
    max: usize,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServiceManager {
    pub fn bind(socket: &Path, max: usize) -> Result<ServiceManager> {
        let receiver =
            UnixDatagram::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
        // Bounds each wait, so that a drop ends the thread within it.
        receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (state, stop) = (state.clone(), stop.clone());
            move || serve(&receiver, &state, &stop)
        });
        Ok(ServiceManager {
            socket: socket.to_owned(),
            max,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// The names of the fds stored, in the order they came.
    pub fn stored(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.stored.iter().map(|(name, _)| name.clone()).collect()
    }

    /// How many times the service said `READY=1`.
    pub fn ready(&self) -> usize {
        self.state.lock().unwrap().ready
    }

    /// `command` started as this manager starts its service: told the notify socket and the
    /// store's size, handed a copy of every stored fd from fd 3 on, named in
    /// `$LISTEN_FDNAMES`, with `$LISTEN_PID` its own pid (set by a shell that then execs it).
    /// The copies returned must live until the command is spawned.
    pub fn service_command(&self, command: &Command) -> Result<(Command, Vec<OwnedFd>)> {
        let state = self.state.lock().unwrap();
        // Copies far above 3.., so that placing them cannot overwrite one another; CLOEXEC,
        // so that only the placed ones cross the exec.
        let mut copies: Vec<OwnedFd> = Vec::new();
        for (_, fd) in &state.stored {
            let copy =
                nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200))
                    .context("copy a stored fd")?;
            // SAFETY: F_DUPFD_CLOEXEC just made this fd, owned by nothing else.
            copies.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(copy) });
        }
        let names: Vec<&str> = state.stored.iter().map(|(name, _)| name.as_str()).collect();
        let mut service = Command::new("sh");
        service
            .arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => service.env(key, value),
                None => service.env_remove(key),
            };
        }
        service
            .env("NOTIFY_SOCKET", &self.socket)
            .env("FDSTORE", self.max.to_string());
        // As systemd: the LISTEN_ variables only when there are fds to pass.
        if !copies.is_empty() {
            service
                .env("LISTEN_FDS", copies.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        let placed: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: between fork and exec the closure only calls dup2, which is
        // async-signal-safe, on fds the caller keeps open until the spawn is done.
        unsafe {
            service.pre_exec(move || {
                for (i, &copy) in placed.iter().enumerate() {
                    if libc::dup2(copy, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok((service, copies))
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(receiver: &UnixDatagram, state: &Mutex<State>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (len, fds) = match recvmsg::<()>(
            receiver.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(message) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = message.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(received) = cmsg {
                            fds.extend(received);
                        }
                    }
                }
                (message.bytes, fds)
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        };
        // SAFETY: SCM_RIGHTS just installed these fds in this process; nothing else owns them.
        let mut fds: Vec<OwnedFd> = fds
            .into_iter()
            .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
            .collect();
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let name = lines
            .iter()
            .find_map(|line| line.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_owned();
        let mut state = state.lock().unwrap();
        if lines.contains(&"READY=1") {
            state.ready += 1;
        }
        if lines.contains(&"FDSTOREREMOVE=1") {
            state.stored.retain(|(stored, _)| *stored != name);
        }
        if lines.contains(&"FDSTORE=1") {
            for fd in fds.drain(..) {
                state.stored.push((name.clone(), fd));
            }
        }
    }
}
