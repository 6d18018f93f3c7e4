//! [`SystemdStore`]: systemd's file-descriptor store as an [`FdStore`], for a daemon that runs
//! as a systemd service. systemd keeps what the service sends it (`FDSTORE=1` and an
//! `FDNAME`, over `$NOTIFY_SOCKET`, the fd in `SCM_RIGHTS`) across restarts of the service,
//! and hands it all to the next start as `$LISTEN_FDS` fds from 3, named in
//! `$LISTEN_FDNAMES`, for the process `$LISTEN_PID`. `FDSTOREREMOVE=1` closes systemd's copy.
//! systemd also drops a stored fd by itself once it reports an error, as a FUSE connection
//! does when its mount is gone.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;

use super::{FdStore, HandoverError};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// systemd's limit on an fd's name (`FDNAME_MAX`).
const FDNAME_MAX: usize = 255;

/// What systemd put in the environment of the service's process, as read by the caller.
#[derive(Debug, Default, Clone)]
pub struct SystemdEnvironment {
    /// `$NOTIFY_SOCKET`: a path, or an abstract name after `@`.
    pub notify_socket: Option<String>,
    /// `$FDSTORE`: the unit's `FileDescriptorStoreMax=` (systemd 254 and later).
    pub fdstore: Option<String>,
    /// `$LISTEN_PID`, `$LISTEN_FDS` and `$LISTEN_FDNAMES`.
    pub listen_pid: Option<String>,
    pub listen_fds: Option<String>,
    pub listen_fdnames: Option<String>,
}

impl SystemdEnvironment {
    /// Whether systemd offers this service an fd store: a notify socket, and a store size
    /// above zero (systemd says so only from version 254 on).
    pub fn offers_fd_store(&self) -> bool {
        self.notify_socket.is_some()
            && self
                .fdstore
                .as_deref()
                .and_then(|max| max.parse::<usize>().ok())
                .is_some_and(|max| max > 0)
    }

    /// The fds systemd passed to the process `own_pid`, by name; none when they were meant for
    /// another process (a variable inherited from a parent).
    fn passed(&self, own_pid: u32) -> Result<Vec<(String, RawFd)>, HandoverError> {
        let invalid = |variable: &'static str, why: String| HandoverError::SystemdEnvironment {
            variable,
            why,
        };
        let (Some(pid), Some(count)) = (&self.listen_pid, &self.listen_fds) else {
            return Ok(Vec::new());
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| invalid("LISTEN_PID", format!("{pid:?} is not a pid")))?;
        if pid != own_pid {
            return Ok(Vec::new());
        }
        let count: RawFd = count
            .parse()
            .ok()
            .filter(|n| (0..=65_536).contains(n))
            .ok_or_else(|| invalid("LISTEN_FDS", format!("{count:?} is not a count of fds")))?;
        let names: Vec<&str> = match &self.listen_fdnames {
            Some(names) if !names.is_empty() => names.split(':').collect(),
            _ => Vec::new(),
        };
        if names.len() != count as usize {
            return Err(invalid(
                "LISTEN_FDNAMES",
                format!("{} names for {count} fds", names.len()),
            ));
        }
        Ok(names
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name.to_owned(), LISTEN_FDS_START + i as RawFd))
            .collect())
    }
}

/// systemd's fd store, reached over its notify socket.
pub struct SystemdStore {
    notify_socket: String,
    /// `FileDescriptorStoreMax=`, when systemd said it: past it systemd refuses more.
    max: Option<usize>,
    /// The names stored, with the fd systemd passed this process for it at start (taken over
    /// connections) or none (kept by this daemon).
    stored: Mutex<HashMap<String, Option<OwnedFd>>>,
}

impl SystemdStore {
    /// The store of the service this process runs as, taking ownership of the fds systemd
    /// passed it. Fails when there is no notify socket.
    pub fn adopt(environment: &SystemdEnvironment) -> Result<SystemdStore, HandoverError> {
        let notify_socket =
            environment
                .notify_socket
                .clone()
                .ok_or(HandoverError::SystemdEnvironment {
                    variable: "NOTIFY_SOCKET",
                    why: "not set: the daemon does not run as a systemd service".into(),
                })?;
        let max = environment
            .fdstore
            .as_deref()
            .and_then(|max| max.parse().ok());
        let mut stored = HashMap::new();
        for (name, raw) in environment.passed(std::process::id())? {
            // SAFETY: systemd passed this process fds LISTEN_FDS_START.. (LISTEN_PID is ours)
            // and nothing in it has claimed or closed them: adopting them at start is the only
            // use, and `passed` yields each number once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // systemd passes them inheritable; no child of the daemon has business with them.
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|source| HandoverError::Adopt {
                name: name.clone(),
                source,
            })?;
            stored.insert(name, Some(fd));
        }
        Ok(SystemdStore {
            notify_socket,
            max,
            stored: Mutex::new(stored),
        })
    }

    fn send(&self, message: &str, fd: Option<BorrowedFd<'_>>) -> Result<(), HandoverError> {
        notify(&self.notify_socket, message, fd)
    }
}

/// Sends `message` (`KEY=VALUE` lines) to systemd's notify socket, with `fd` if given.
pub fn notify(
    notify_socket: &str,
    message: &str,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), HandoverError> {
    let fail = |source| HandoverError::Notify {
        socket: PathBuf::from(notify_socket),
        source,
    };
    let address = match notify_socket.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()),
        None => UnixAddr::new(std::ffi::OsStr::new(notify_socket).as_bytes()),
    }
    .map_err(fail)?;
    let sender = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(fail)?;
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let rights: Vec<ControlMessage<'_>> =
        fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    let body = [IoSlice::new(message.as_bytes())];
    sendmsg(
        sender.as_raw_fd(),
        &body,
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        Some(&address),
    )
    .map_err(fail)?;
    Ok(())
}

/// Whether systemd accepts `name` as an fd's name: ASCII without control characters or `:`
/// (the separator of `$LISTEN_FDNAMES`), at most 255 bytes.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= FDNAME_MAX
        && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':')
}

impl FdStore for SystemdStore {
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HandoverError> {
        if !valid_name(name) {
            return Err(HandoverError::UnstorableName { name: name.into() });
        }
        let mut stored = self.stored.lock();
        if let Some(max) = self.max {
            if !stored.contains_key(name) && stored.len() >= max {
                return Err(HandoverError::StoreFull { max });
            }
        }
        // systemd stores by fd, not by name: a name kept before is removed first.
        if stored.contains_key(name) {
            self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)?;
        }
        self.send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd))?;
        stored.insert(name.to_owned(), None);
        Ok(())
    }

    fn release(&self, name: &str) -> Result<(), HandoverError> {
        if !valid_name(name) {
            return Ok(());
        }
        let mut stored = self.stored.lock();
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)?;
        stored.remove(name);
        Ok(())
    }

    fn kept(&self) -> Result<Vec<(String, OwnedFd)>, HandoverError> {
        let stored = self.stored.lock();
        let mut kept = Vec::new();
        for (name, fd) in stored.iter() {
            if let Some(fd) = fd {
                let copy = fd.try_clone().map_err(|source| HandoverError::Adopt {
                    name: name.clone(),
                    source: nix::errno::Errno::from_raw(source.raw_os_error().unwrap_or(0)),
                })?;
                kept.push((name.clone(), copy));
            }
        }
        Ok(kept)
    }

    fn describe(&self) -> String {
        format!("systemd's fd store (notify socket {})", self.notify_socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(pid: u32, fds: &str, names: Option<&str>) -> SystemdEnvironment {
        SystemdEnvironment {
            notify_socket: Some("/run/systemd/notify".into()),
            fdstore: Some("16".into()),
            listen_pid: Some(pid.to_string()),
            listen_fds: Some(fds.into()),
            listen_fdnames: names.map(Into::into),
        }
    }

    #[test]
    fn passed_fds_are_numbered_from_three_with_their_names() {
        let env = environment(42, "2", Some("/a/fs:/b/vdisk"));
        let passed = env.passed(42).unwrap();
        assert_eq!(
            passed,
            vec![("/a/fs".to_owned(), 3), ("/b/vdisk".to_owned(), 4)]
        );
    }

    #[test]
    fn fds_meant_for_another_process_are_not_taken() {
        let env = environment(41, "2", Some("/a/fs:/b/vdisk"));
        assert!(env.passed(42).unwrap().is_empty());
        assert!(environment(42, "0", Some(""))
            .passed(42)
            .unwrap()
            .is_empty());
        assert!(SystemdEnvironment::default().passed(42).unwrap().is_empty());
    }

    #[test]
    fn names_that_do_not_match_the_count_are_an_error_naming_the_variable() {
        let err = environment(42, "2", Some("/a/fs")).passed(42).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDNAMES"), "{err}");
        let err = environment(42, "x", None).passed(42).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS"), "{err}");
    }

    #[test]
    fn an_fd_store_is_offered_only_with_a_notify_socket_and_a_size() {
        assert!(environment(1, "0", None).offers_fd_store());
        let mut env = environment(1, "0", None);
        env.fdstore = Some("0".into());
        assert!(!env.offers_fd_store());
        env.fdstore = None;
        assert!(!env.offers_fd_store());
        env.fdstore = Some("8".into());
        env.notify_socket = None;
        assert!(!env.offers_fd_store());
    }

    #[test]
    fn names_systemd_refuses_are_recognised() {
        assert!(valid_name("/var/lib/shoal/snapshots/12/fs"));
        assert!(!valid_name("/a:b"));
        assert!(!valid_name("/a\nb"));
        assert!(!valid_name(&"x".repeat(256)));
        assert!(!valid_name(""));
    }

    #[test]
    fn keep_and_release_send_what_systemd_expects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let env = SystemdEnvironment {
            notify_socket: Some(path.to_string_lossy().into_owned()),
            fdstore: Some("1".into()),
            ..SystemdEnvironment::default()
        };
        let store = SystemdStore::adopt(&env).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        store.keep("/m/a", file.as_fd()).unwrap();
        // The store is full at one, but the same name replaces.
        assert!(matches!(
            store.keep("/m/b", file.as_fd()),
            Err(HandoverError::StoreFull { max: 1 })
        ));
        store.keep("/m/a", file.as_fd()).unwrap();
        store.release("/m/a").unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 256];
        for _ in 0..4 {
            let n = listener.recv(&mut buf).unwrap();
            received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            received,
            [
                "FDSTORE=1\nFDNAME=/m/a",
                "FDSTOREREMOVE=1\nFDNAME=/m/a",
                "FDSTORE=1\nFDNAME=/m/a",
                "FDSTOREREMOVE=1\nFDNAME=/m/a",
            ]
        );
        assert!(store.kept().unwrap().is_empty());
        assert!(matches!(
            store.keep("/m:c", file.as_fd()),
            Err(HandoverError::UnstorableName { .. })
        ));
    }
}
