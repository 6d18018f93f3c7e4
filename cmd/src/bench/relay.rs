//! A TCP relay on loopback in front of a plain-HTTP registry that counts what every
//! scenario's clients (containerd, `shoal rpull`, the snapshotter daemons) take from it: the
//! bytes the registry sends, headers included, and the requests (registry requests have no
//! body, so each ends at one blank line).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// End of a request's head.
const BLANK_LINE: &[u8] = b"\r\n\r\n";

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    requests: AtomicU64,
}

/// What the relay counted so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counted {
    pub bytes: u64,
    pub requests: u64,
}

impl Counted {
    pub fn since(self, earlier: Counted) -> Counted {
        Counted {
            bytes: self.bytes - earlier.bytes,
            requests: self.requests - earlier.requests,
        }
    }
}

/// The relay; dropping it closes its listener and every connection and joins its threads.
pub struct Relay {
    address: SocketAddr,
    counters: Arc<Counters>,
    stopping: Arc<AtomicBool>,
    /// Both ends of every relayed connection, to shut them down at the end.
    open: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free loopback port and relays each connection to `upstream` (`host:port`).
    pub fn start(upstream: String) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (counters, stopping, open, threads) = (
                counters.clone(),
                stopping.clone(),
                open.clone(),
                threads.clone(),
            );
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    // A registry that refuses the connection: the client sees it closed.
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let ends = [client.try_clone(), server.try_clone()];
                    let [Ok(client_copy), Ok(server_copy)] = ends else {
                        continue;
                    };
                    {
                        let mut open = open.lock().expect("relay lock");
                        open.push(client_copy);
                        open.push(server_copy);
                    }
                    let up = spawn_copy(&client, &server, counters.clone(), Direction::Up);
                    let down = spawn_copy(&server, &client, counters.clone(), Direction::Down);
                    let mut threads = threads.lock().expect("relay lock");
                    threads.extend(up.into_iter().chain(down));
                }
            })
        };
        Ok(Relay {
            address,
            counters,
            stopping,
            open,
            threads,
            acceptor: Some(acceptor),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn counted(&self) -> Counted {
        Counted {
            bytes: self.counters.bytes.load(Ordering::SeqCst),
            requests: self.counters.requests.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor so that it sees `stopping`.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in self.open.lock().expect("relay lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().expect("relay lock").drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    /// Client to registry: requests are counted.
    Up,
    /// Registry to client: bytes are counted.
    Down,
}

fn spawn_copy(
    from: &TcpStream,
    to: &TcpStream,
    counters: Arc<Counters>,
    direction: Direction,
) -> Option<JoinHandle<()>> {
    let mut from = from.try_clone().ok()?;
    let mut to = to.try_clone().ok()?;
    Some(std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024];
        // The end of the previous read, so that a blank line split between reads is seen.
        let mut tail: Vec<u8> = Vec::with_capacity(BLANK_LINE.len() * 2);
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match direction {
                Direction::Down => {
                    counters.bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
                Direction::Up => {
                    let found = count_blank_lines(&mut tail, &buffer[..n]);
                    counters.requests.fetch_add(found, Ordering::SeqCst);
                }
            }
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }))
}

/// Blank lines (`\r\n\r\n`) in `chunk`, counting one that began in `tail` (the previous
/// chunk's last bytes, updated to this chunk's).
fn count_blank_lines(tail: &mut Vec<u8>, chunk: &[u8]) -> u64 {
    let keep = BLANK_LINE.len() - 1;
    let mut joined = std::mem::take(tail);
    let carried = joined.len();
    joined.extend_from_slice(chunk);
    let count = joined
        .windows(BLANK_LINE.len())
        .enumerate()
        // A match wholly inside the carried bytes was counted with the previous chunk.
        .filter(|(at, window)| at + BLANK_LINE.len() > carried && *window == BLANK_LINE)
        .count() as u64;
    *tail = joined[joined.len().saturating_sub(keep)..].to_vec();
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_split_between_reads_is_counted_once() {
        let mut tail = Vec::new();
        assert_eq!(
            count_blank_lines(&mut tail, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r"),
            0
        );
        assert_eq!(
            count_blank_lines(&mut tail, b"\nGET /v2/a HTTP/1.1\r\n\r\n"),
            2
        );
        assert_eq!(
            count_blank_lines(&mut tail, b"GET /v2/b HTTP/1.1\r\nA: b\r\n"),
            0
        );
        assert_eq!(
            count_blank_lines(&mut tail, b"\r\nGET / HTTP/1.1\r\n\r\n"),
            2
        );
    }

    #[test]
    fn the_relay_passes_bytes_both_ways_and_counts_them() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = upstream.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = upstream.accept().unwrap();
            let mut head = [0u8; 64];
            let mut got = Vec::new();
            while !got.ends_with(BLANK_LINE) {
                let n = stream.read(&mut head).unwrap();
                got.extend_from_slice(&head[..n]);
            }
            stream.write_all(&[7u8; 1000]).unwrap();
        });
        let relay = Relay::start(target).unwrap();
        let mut client = TcpStream::connect(relay.address()).unwrap();
        client.write_all(b"GET /v2/ HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        server.join().unwrap();
        assert_eq!(answer, vec![7u8; 1000]);
        assert_eq!(
            relay.counted(),
            Counted {
                bytes: 1000,
                requests: 1
            }
        );
    }
}
