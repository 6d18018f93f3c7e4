//! Recording which files are opened on one filesystem, in order, with fanotify.
//!
//! The mark covers the whole filesystem (`FAN_MARK_FILESYSTEM`), so opens made inside the
//! sandbox's own mount namespace count too; the rootfs is a tmpfs of its own, so nothing else
//! on the machine shows up. Events carry file handles (`FAN_REPORT_FID`), turned back into
//! paths through the rootfs directory while the run goes on, so files the run deletes later are
//! still named. Directories are not reported (no `FAN_ONDIR`): only file data is prefetched.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};

/// How long a read waits for events before looking at the stop flag.
const POLL_MS: i32 = 50;

/// What a recording saw.
#[derive(Debug, Default)]
pub struct Recording {
    /// Opened files, as paths under the root, in the order first opened (repeats kept).
    pub opened: Vec<PathBuf>,
    /// The kernel's queue overflowed: some opens were lost.
    pub overflowed: bool,
}

/// A running recording; [`Recorder::finish`] collects it.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Recording>>>,
}

impl Recorder {
    /// Starts recording opens of regular files on the filesystem `root` is on, named relative
    /// to `root`. Opens by this process are not recorded.
    pub fn start(root: &Path) -> anyhow::Result<Recorder> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_REPORT_FID
                    | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("fanotify_init (recording a run needs root and fanotify)");
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fanotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(root.as_os_str().as_bytes())
            .with_context(|| format!("{} is not a C string", root.display()))?;
        // SAFETY: `path` is a valid C string for the call's duration.
        let marked = unsafe {
            libc::fanotify_mark(
                fanotify.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                libc::FAN_OPEN | libc::FAN_OPEN_EXEC,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if marked < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("fanotify_mark {}", root.display()));
        }
        let root_dir = File::open(root).with_context(|| format!("open {}", root.display()))?;
        let root = root
            .canonicalize()
            .with_context(|| format!("resolve {}", root.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("optimize-recorder".to_owned())
                .spawn(move || record(&fanotify, &root_dir, &root, &stop))
                .context("start the recording thread")?
        };
        Ok(Recorder {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after reading every event already queued (call once the run has ended, so all of
    /// its opens are in the queue).
    pub fn finish(mut self) -> anyhow::Result<Recording> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(recording)) => recording,
            Some(Err(_)) => bail!("the recording thread panicked"),
            None => bail!("the recording was already collected"),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads events until `stop` is set and the queue is empty.
fn record(
    fanotify: &OwnedFd,
    root_dir: &File,
    root: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<Recording> {
    let mut recording = Recording::default();
    // u64s keep the buffer aligned for the event structs.
    let mut buffer = vec![0u64; 8192];
    let own_pid = std::process::id() as i32;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut poll = libc::pollfd {
            fd: fanotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, if stopping { 0 } else { POLL_MS }) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error).context("poll the fanotify queue");
        }
        if ready == 0 {
            if stopping {
                return Ok(recording);
            }
            continue;
        }
        let bytes = std::mem::size_of_val(buffer.as_slice());
        // SAFETY: reads at most `bytes` into the buffer we own.
        let n = unsafe { libc::read(fanotify.as_raw_fd(), buffer.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(error).context("read the fanotify queue"),
            }
        }
        // SAFETY: the kernel wrote `n` bytes of the buffer; viewing them as bytes is sound.
        let events =
            unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), n as usize) };
        parse_events(
            events,
            own_pid,
            |handle| {
                if let Some(path) = resolve(root_dir, root, handle) {
                    recording.opened.push(path);
                }
            },
            &mut recording.overflowed,
        );
    }
}

/// Calls `found` with the file handle bytes (`struct file_handle`) of each open event.
fn parse_events(events: &[u8], own_pid: i32, mut found: impl FnMut(&[u8]), overflowed: &mut bool) {
    let meta_size = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut offset = 0;
    while offset + meta_size <= events.len() {
        // SAFETY: `meta_size` bytes are in range; read_unaligned copes with any alignment.
        let meta: libc::fanotify_event_metadata =
            unsafe { std::ptr::read_unaligned(events[offset..].as_ptr().cast()) };
        let event_len = meta.event_len as usize;
        if event_len < meta_size || offset + event_len > events.len() {
            break;
        }
        if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
            *overflowed = true;
        } else if meta.pid != own_pid {
            let info = &events[offset + meta.metadata_len as usize..offset + event_len];
            if let Some(handle) = fid_handle(info) {
                found(handle);
            }
        }
        offset += event_len;
    }
}

/// The `struct file_handle` of the first FID info record in `info`.
fn fid_handle(info: &[u8]) -> Option<&[u8]> {
    // header (4 bytes) + fsid (8 bytes), then the handle.
    const HANDLE_AT: usize = 12;
    let info_type = *info.first()?;
    let len = u16::from_ne_bytes([*info.get(2)?, *info.get(3)?]) as usize;
    if info_type != libc::FAN_EVENT_INFO_TYPE_FID || len > info.len() || len < HANDLE_AT + 8 {
        return None;
    }
    Some(&info[HANDLE_AT..len])
}

/// The path under `root` of the file `handle` names, while it still exists.
fn resolve(root_dir: &File, root: &Path, handle: &[u8]) -> Option<PathBuf> {
    // The handle starts with two 32-bit fields: copy it into u32-aligned memory.
    let mut aligned = vec![0u32; handle.len().div_ceil(4)];
    // SAFETY: `aligned` has at least `handle.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            handle.as_ptr(),
            aligned.as_mut_ptr().cast::<u8>(),
            handle.len(),
        )
    };
    // SAFETY: `aligned` holds a `struct file_handle` as the kernel wrote it; the descriptor
    // returned is owned right away.
    let fd = unsafe {
        libc::open_by_handle_at(
            root_dir.as_raw_fd(),
            aligned.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let opened = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", opened.as_raw_fd())).ok()?;
    path.strip_prefix(root).ok().map(Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out: metadata, then a FID record with `handle`.
    fn event(mask: u64, pid: i32, handle: &[u8]) -> Vec<u8> {
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        let info_len = 12 + handle.len();
        let meta = libc::fanotify_event_metadata {
            event_len: (meta_len + info_len) as u32,
            vers: libc::FANOTIFY_METADATA_VERSION,
            reserved: 0,
            metadata_len: meta_len as u16,
            mask,
            fd: libc::FAN_NOFD,
            pid,
        };
        // SAFETY: viewing a plain C struct as bytes.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(
                (&meta as *const libc::fanotify_event_metadata).cast::<u8>(),
                meta_len,
            )
        }
        .to_vec();
        bytes.push(libc::FAN_EVENT_INFO_TYPE_FID);
        bytes.push(0);
        bytes.extend_from_slice(&(info_len as u16).to_ne_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(handle);
        bytes
    }

    #[test]
    fn events_yield_handles_skip_our_own_and_note_overflow() {
        let handle_a = [8u8, 0, 0, 0, 1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let handle_b = [8u8, 0, 0, 0, 1, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9];
        let mut queue = event(libc::FAN_OPEN, 10, &handle_a);
        queue.extend(event(libc::FAN_OPEN, 99, &handle_b));
        queue.extend(event(libc::FAN_OPEN_EXEC, 11, &handle_b));
        queue.extend(event(libc::FAN_Q_OVERFLOW, -1, &[]));
        let mut seen = Vec::new();
        let mut overflowed = false;
        parse_events(&queue, 99, |h| seen.push(h.to_vec()), &mut overflowed);
        assert_eq!(seen, [handle_a.to_vec(), handle_b.to_vec()]);
        assert!(overflowed);
    }
}
