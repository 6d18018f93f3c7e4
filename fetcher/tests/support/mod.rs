//! Test fixtures: a scriptable HTTP/1.1 server on 127.0.0.1 and configs pointing at it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const MAX_REQUEST_HEAD: usize = 64 << 10;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `Content-Length` to declare instead of the body's length.
    pub declared_length: Option<usize>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Never answer.
    pub stall: bool,
    /// Send the status line and headers, then never the body.
    pub stall_body: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            declared_length: None,
            delay: Duration::ZERO,
            stall: false,
            stall_body: false,
        }
    }

    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            body: body.into(),
            ..Reply::status(200)
        }
    }

    pub fn stall() -> Reply {
        Reply {
            stall: true,
            ..Reply::status(200)
        }
    }

    /// This reply's headers, then silence where its body should be.
    pub fn stalling_body(mut self) -> Reply {
        self.stall_body = true;
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// Serves `data` the way a registry serves a blob: a 206 slice when asked for a range.
    pub fn blob(request: &Request, data: &[u8]) -> Reply {
        let Some(spec) = request
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
        else {
            return Reply::ok(data);
        };
        let (first, last) = spec.split_once('-').expect("range has a dash");
        let first: usize = first.parse().expect("range start");
        let last: usize = last.parse().expect("range end");
        if first >= data.len() || last < first {
            return Reply::status(416);
        }
        let last = last.min(data.len() - 1);
        Reply {
            status: 206,
            body: data[first..=last].to_vec(),
            ..Reply::status(206)
        }
        .header(
            "Content-Range",
            format!("bytes {first}-{last}/{}", data.len()),
        )
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// An HTTP server answering every request with its handler's reply, one connection per
/// request. It records what it was sent.
pub struct TestServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, handler.clone(), log.clone()));
            }
        });
        TestServer {
            addr,
            requests,
            task,
        }
    }

    /// `127.0.0.1:<port>`, as configs and references name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, handler: Arc<Handler>, log: Arc<Mutex<Vec<Request>>>) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let request = Request {
        method: request_line.next().unwrap_or("").to_owned(),
        target: request_line.next().unwrap_or("").to_owned(),
        headers: lines
            .take_while(|line| !line.is_empty())
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
    };
    log.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    if reply.stall {
        // Bounded: the test ends long before, dropping the runtime and this task with it.
        tokio::time::sleep(Duration::from_secs(120)).await;
        return;
    }
    tokio::time::sleep(reply.delay).await;
    let mut response = format!(
        "HTTP/1.1 {} X\r\nConnection: close\r\nContent-Length: {}\r\n",
        reply.status,
        reply.declared_length.unwrap_or(reply.body.len())
    );
    for (name, value) in &reply.headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    let _ = stream.write_all(response.as_bytes()).await;
    if reply.stall_body {
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        return;
    }
    let body_len = reply
        .declared_length
        .unwrap_or(reply.body.len())
        .min(reply.body.len());
    let _ = stream.write_all(&reply.body[..body_len]).await;
    let _ = stream.shutdown().await;
}

/// A config rooted at `root` (4 KiB blocks, 1 MiB cache, 2 s timeout) with `retries`; each
/// host is reached over plain HTTP, with `extra` lines added to its table.
pub fn config(root: &Path, retries: u32, hosts: &[(&str, &str)]) -> Config {
    let mut text = format!(
        "root = \"{}\"\n[cache]\nblock_size = \"4KiB\"\ncapacity = \"1MiB\"\n[registry]\n\
         timeout_secs = 2\nretries = {retries}\ndocker_config = \"{}\"\n",
        root.display(),
        root.join("docker-config.json").display()
    );
    for (host, extra) in hosts {
        text.push_str(&format!(
            "[registry.hosts.\"{host}\"]\nplain_http = true\n{extra}\n"
        ));
    }
    Config::parse(&text).unwrap()
}

/// Deterministic, non-repeating test content.
pub fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}
