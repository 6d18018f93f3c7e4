//! A loopback HTTP/1.1 proxy in front of the registry that counts, per request path, how many
//! requests were answered and how many response body bytes were sent. It follows message
//! framing (Content-Length, chunked, HEAD, 1xx/204/304) so keep-alive connections are counted
//! exactly; it is the place where network faults get injected.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A message head larger than this is not HTTP we want to proxy.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// A stalled request is held at most this long, so no test can hang on it.
const MAX_STALL: Duration = Duration::from_secs(120);

/// A failure the proxy injects, instead of forwarding, into requests whose path contains
/// [`FaultRule::path_fragment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers with this status and an empty body, then closes the connection.
    Status(u16),
    /// Never answers; the connection stays open until the fault is cleared (or [`MAX_STALL`]).
    Stall,
    /// Forwards the request after holding it this long: a registry far away.
    Delay(Duration),
}

#[derive(Clone, Debug)]
struct FaultRule {
    path_fragment: String,
    fault: Fault,
}

type Faults = Arc<Mutex<Option<FaultRule>>>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathStats {
    pub requests: u64,
    pub response_bytes: u64,
    /// Requests answered (or held) by an injected fault instead of the upstream.
    pub faulted: u64,
}

type Stats = Arc<Mutex<BTreeMap<String, PathStats>>>;

pub struct CountingProxy {
    addr: SocketAddr,
    stats: Stats,
    faults: Faults,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl CountingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let stats = Stats::default();
        let faults = Faults::default();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let shared = Shared {
                stats: Arc::clone(&stats),
                faults: Arc::clone(&faults),
                stop: Arc::clone(&stop),
            };
            std::thread::spawn(move || accept_loop(&listener, upstream, &shared))
        };
        Ok(CountingProxy {
            addr,
            stats,
            faults,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the counters, by request path (query string removed).
    pub fn stats(&self) -> BTreeMap<String, PathStats> {
        self.stats
            .lock()
            .map(|stats| stats.clone())
            .unwrap_or_default()
    }

    /// Body bytes sent in answers to paths containing `fragment`.
    pub fn response_bytes_for(&self, fragment: &str) -> u64 {
        self.stats()
            .iter()
            .filter(|(path, _)| path.contains(fragment))
            .map(|(_, stats)| stats.response_bytes)
            .sum()
    }

    pub fn reset(&self) {
        if let Ok(mut stats) = self.stats.lock() {
            stats.clear();
        }
    }

    /// From now on, requests whose path contains `path_fragment` get `fault` instead of the
    /// upstream's answer (replacing any earlier fault).
    pub fn inject(&self, path_fragment: &str, fault: Fault) {
        if let Ok(mut faults) = self.faults.lock() {
            *faults = Some(FaultRule {
                path_fragment: path_fragment.to_owned(),
                fault,
            });
        }
    }

    /// Forwards every request again; stalled requests are released (their connection closes).
    pub fn clear_faults(&self) {
        if let Ok(mut faults) = self.faults.lock() {
            *faults = None;
        }
    }
}

/// What every connection thread shares with the proxy.
#[derive(Clone)]
struct Shared {
    stats: Stats,
    faults: Faults,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn fault_for(&self, path: &str) -> Option<Fault> {
        let faults = self.faults.lock().ok()?;
        faults
            .as_ref()
            .filter(|rule| path.contains(&rule.path_fragment))
            .map(|rule| rule.fault)
    }

    fn count_fault(&self, path: &str) {
        if let Ok(mut stats) = self.stats.lock() {
            stats.entry(path.to_owned()).or_default().faulted += 1;
        }
    }

    /// Holds a stalled request until its fault is cleared, the proxy stops, or [`MAX_STALL`].
    fn stall(&self, path: &str) {
        let deadline = Instant::now() + MAX_STALL;
        while self.fault_for(path) == Some(Fault::Stall)
            && !self.stop.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the loop sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Shared) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let shared = shared.clone();
        // Connection threads end when either side closes; the registry is killed with the test.
        std::thread::spawn(move || {
            if let Err(err) = serve(client, upstream, &shared) {
                eprintln!("proxy: {err:#}");
            }
        });
    }
}

/// One client connection: requests flow up on this thread, responses down on another.
fn serve(client: TcpStream, upstream: SocketAddr, shared: &Shared) -> Result<()> {
    // A TLS ClientHello (record type 0x16) from a client probing for HTTPS before it falls
    // back to plain HTTP, as skopeo does: refuse it at once rather than let the client wait
    // out its handshake timeout for a head that never ends.
    let mut first = [0u8; 1];
    if matches!(client.peek(&mut first), Ok(1) if first[0] == TLS_HANDSHAKE) {
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let server = TcpStream::connect(upstream).context("connect to the upstream")?;
    let (requests_tx, requests_rx) = mpsc::channel::<(String, String)>();
    let down = {
        let server = server.try_clone()?;
        let client = client.try_clone()?;
        let stats = Arc::clone(&shared.stats);
        std::thread::spawn(move || relay_responses(server, client, &requests_rx, &stats))
    };
    let up = relay_requests(
        client.try_clone()?,
        server.try_clone()?,
        &requests_tx,
        shared,
    );
    drop(requests_tx);
    let _ = server.shutdown(Shutdown::Write);
    let down = down.join().unwrap_or(Ok(()));
    let _ = client.shutdown(Shutdown::Both);
    up.and(down).or_else(ignore_disconnects)
}

fn ignore_disconnects(err: io::Error) -> Result<()> {
    match err.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => Ok(()),
        _ => Err(err.into()),
    }
}

/// Forwards requests upstream; a request hit by a fault is answered here instead, and ends
/// the connection. The clients under test do not pipeline, so when a request arrives every
/// earlier answer on the connection has been relayed and the client socket is free to write.
fn relay_requests(
    client: TcpStream,
    mut server: TcpStream,
    requests: &mpsc::Sender<(String, String)>,
    shared: &Shared,
) -> io::Result<()> {
    let mut answer = client.try_clone()?;
    let mut reader = BufReader::new(client);
    while let Some(head) = read_head(&mut reader)? {
        let mut parts = head.start_line.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default().to_owned();
        match shared.fault_for(&path) {
            Some(Fault::Delay(delay)) => std::thread::sleep(delay),
            Some(Fault::Status(status)) => {
                shared.count_fault(&path);
                write!(
                    answer,
                    "HTTP/1.1 {status} Injected Fault\r\nContent-Length: 0\r\n\
                     Connection: close\r\n\r\n"
                )?;
                return Ok(());
            }
            Some(Fault::Stall) => {
                shared.count_fault(&path);
                shared.stall(&path);
                return Ok(());
            }
            None => {}
        }
        // The response thread needs the method (HEAD has no body) before the answer arrives.
        let _ = requests.send((method, path));
        server.write_all(&head.raw)?;
        let framing = if head.is_chunked() {
            Framing::Chunked
        } else {
            head.content_length()
                .map_or(Framing::Empty, Framing::Length)
        };
        copy_body(&mut reader, &mut server, framing)?;
    }
    Ok(())
}

fn relay_responses(
    server: TcpStream,
    mut client: TcpStream,
    requests: &mpsc::Receiver<(String, String)>,
    stats: &Stats,
) -> io::Result<()> {
    let mut reader = BufReader::new(server);
    let mut current: Option<(String, String)> = None;
    while let Some(head) = read_head(&mut reader)? {
        if current.is_none() {
            current = requests.recv().ok();
        }
        let (method, path) = current.clone().unwrap_or_default();
        let status: u16 = head
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        client.write_all(&head.raw)?;
        let framing =
            if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
                Framing::Empty
            } else if head.is_chunked() {
                Framing::Chunked
            } else {
                head.content_length()
                    .map_or(Framing::UntilClose, Framing::Length)
            };
        let bytes = copy_body(&mut reader, &mut client, framing)?;
        // An interim 1xx answer is followed by the real one for the same request.
        if !(100..200).contains(&status) {
            if let Ok(mut stats) = stats.lock() {
                let entry = stats.entry(path).or_default();
                entry.requests += 1;
                entry.response_bytes += bytes;
            }
            current = None;
        }
    }
    Ok(())
}

struct Head {
    raw: Vec<u8>,
    start_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|value| value.trim().parse().ok())
    }
}

/// Reads one message head; `None` on a clean end of stream before it.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&line);
        if raw.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message head too large",
            ));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            if lines.is_empty() {
                // Stray CRLF between messages.
                continue;
            }
            break;
        }
        lines.push(text);
    }
    let start_line = lines.remove(0);
    let headers = lines
        .iter()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok(Some(Head {
        raw,
        start_line,
        headers,
    }))
}

#[derive(Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Forwards one body; returns its payload size (chunk data only, for chunked bodies).
fn copy_body(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    framing: Framing,
) -> io::Result<u64> {
    match framing {
        Framing::Empty => Ok(0),
        Framing::Length(length) => copy_exact(reader, writer, length),
        Framing::UntilClose => io::copy(reader, writer),
        Framing::Chunked => {
            let mut payload = 0;
            loop {
                let mut size_line = Vec::new();
                reader.read_until(b'\n', &mut size_line)?;
                writer.write_all(&size_line)?;
                let text = String::from_utf8_lossy(&size_line);
                let digits = text.trim().split(';').next().unwrap_or_default();
                let size = u64::from_str_radix(digits, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, then the empty line that ends the body.
                    loop {
                        let mut line = Vec::new();
                        if reader.read_until(b'\n', &mut line)? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        writer.write_all(&line)?;
                        if line == b"\r\n" || line == b"\n" {
                            return Ok(payload);
                        }
                    }
                }
                payload += copy_exact(reader, writer, size)?;
                let mut crlf = Vec::new();
                reader.read_until(b'\n', &mut crlf)?;
                writer.write_all(&crlf)?;
            }
        }
    }
}

fn copy_exact(reader: &mut impl BufRead, writer: &mut impl Write, length: u64) -> io::Result<u64> {
    let copied = io::copy(&mut reader.by_ref().take(length), writer)?;
    if copied < length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(copied)
}
