//! A TCP proxy that adds latency: every byte is held for a fixed time in each direction, which
//! is what this kernel's missing `netem` qdisc would do. It runs inside a network namespace,
//! in front of a server listening there, so that the namespace's `tc` shaping and this delay
//! together make a slow, distant link.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub struct DelayProxy {
    stop: Arc<AtomicBool>,
    /// Every connection's sockets, shut down on drop so that no pump outlives the proxy.
    open: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` inside the network namespace of file `namespace` and forwards each
    /// connection to `upstream` (reached from inside it too), holding every byte for
    /// `one_way` in each direction: a round trip of twice that.
    pub fn start(
        namespace: &Path,
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way: Duration,
    ) -> Result<DelayProxy> {
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (ready, bound) = mpsc::channel();
        let namespace = namespace.to_owned();
        let (stop_flag, sockets) = (stop.clone(), open.clone());
        // Threads started by a thread inherit its network namespace: the acceptor enters it
        // once, and every pump it starts dials and listens from there.
        let acceptor = std::thread::spawn(move || {
            let listener = enter(&namespace).and_then(|()| {
                let listener = TcpListener::bind(listen).context("bind the delay proxy")?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            });
            let listener = match listener {
                Ok(listener) => {
                    let _ = ready.send(Ok(()));
                    listener
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    // An upstream that is not listening yet (or any more) closes the client's
                    // connection, as a refused one would.
                    Ok((client, _)) => drop(relay(client, upstream, one_way, &sockets)),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => eprintln!("delay proxy: accept: {error}"),
                }
            }
        });
        bound
            .recv()
            .context("the delay proxy's thread ended before listening")??;
        Ok(DelayProxy {
            stop,
            open,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for socket in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Moves the calling thread into the network namespace of file `namespace`.
fn enter(namespace: &Path) -> Result<()> {
    let file = File::open(namespace).with_context(|| format!("open {}", namespace.display()))?;
    // SAFETY: `file` is an open namespace file for the whole call; setns changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("enter {}", namespace.display()));
    }
    Ok(())
}

/// Connects `client` to `upstream` through two delayed pumps.
fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    one_way: Duration,
    open: &Mutex<Vec<TcpStream>>,
) -> Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
        .with_context(|| format!("connect to {upstream}"))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
        open.push(client.try_clone()?);
        open.push(server.try_clone()?);
    }
    pump(client.try_clone()?, server.try_clone()?, one_way);
    pump(server, client, one_way);
    Ok(())
}

/// Copies `from` to `to`, each read held for `delay` after it arrived; closes `to`'s write
/// side when `from` ends.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (send, receive) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send.send((Instant::now(), buffer[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (arrived, bytes) in receive {
            let due = arrived + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
