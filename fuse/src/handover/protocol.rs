//! The fd holder's protocol, kept small so the holder never needs upgrading. One
//! `SOCK_SEQPACKET` message per request and per answer; a request is `[VERSION, op, name...]`.
//!
//! | op | request | answer |
//! |---|---|---|
//! | `K` keep | the name, one fd attached (`SCM_RIGHTS`) | `O` |
//! | `R` release | the name | `O` |
//! | `L` list | — | one `F name` per fd kept, each with a copy attached, then `O` |
//! | `A` attach | — | `O`; a daemon runs while this connection stays open |
//!
//! An error answer is `E` followed by a message.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub const VERSION: u8 = 1;
pub const KEEP: u8 = b'K';
pub const RELEASE: u8 = b'R';
pub const LIST: u8 = b'L';
pub const ATTACH: u8 = b'A';
pub const OK: u8 = b'O';
pub const FD: u8 = b'F';
pub const ERROR: u8 = b'E';

/// Longest message: a name is a path.
pub const MAX_MESSAGE: usize = 4096 + 2;

/// Sends `bytes`, with `fd` attached if given.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
    let iov = [IoSlice::new(bytes)];
    let raw: [RawFd; 1] = [fd.map_or(-1, |fd| fd.as_raw_fd())];
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if fd.is_some() { &rights } else { &[] };
    sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one message and the fd attached to it, if any; an empty message is the peer's end.
pub fn receive(socket: BorrowedFd<'_>) -> Result<(Vec<u8>, Option<OwnedFd>), Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel installed `raw` in this process for this message; it
                    // is owned by nobody else, so wrapping it makes it closed exactly once.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    buf.truncate(len);
    Ok((buf, fd))
}
