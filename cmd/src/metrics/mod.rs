//! The observability endpoint on `metrics.address`: `/metrics` in Prometheus text format,
//! `/status` as JSON (what `shoal status` shows), and the probes a supervisor or a
//! Kubernetes kubelet asks: `/health` (the daemon answers and its metadata store reads) and
//! `/ready` (healthy and not draining for a stop). GET only, one small response per
//! connection.

mod exposition;
mod learned;
mod process;
mod status;

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

pub use exposition::render;
pub use process::ProcessSample;
pub use status::{
    DaemonStatus, HandoverStatus, LayerReads, LayerStatus, LearnedLayer, NotCarried, Observed,
    UnmountedLayerStatus,
};

/// A request line longer than this is not one of ours.
const MAX_REQUEST_BYTES: usize = 1024;
/// A client that sends nothing for this long is dropped.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a report waits for reads already answered to land in the cache: long enough for
/// a disk write, short enough that a registry that hangs never holds a scrape up.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One answer: status line, content type, body.
struct Answer {
    code: &'static str,
    kind: &'static str,
    body: String,
}

impl Answer {
    fn text(code: &'static str, body: String) -> Answer {
        Answer {
            code,
            kind: "text/plain; charset=utf-8",
            body,
        }
    }
}

impl Observed {
    /// `Err` with the reason when the daemon cannot serve: its metadata store does not read.
    fn health(&self) -> Result<(), String> {
        self.snapshotter
            .counts()
            .map(|_| ())
            .map_err(|error| format!("metadata store: {error}"))
    }

    async fn answer(&self, path: &str) -> Answer {
        if matches!(path, "/metrics" | "/status") {
            // Reads are answered before their blocks are cached: report the cache once the
            // fetches already answered have landed, or as it is after a short wait.
            let _ = tokio::time::timeout(SETTLE_WAIT, self.fetcher.settled()).await;
        }
        match path {
            "/metrics" => {
                let mut body = render(&self.status());
                ProcessSample::now().render(&mut body);
                Answer {
                    code: "200 OK",
                    kind: "text/plain; version=0.0.4",
                    body,
                }
            }
            "/status" => Answer {
                code: "200 OK",
                kind: "application/json",
                body: serde_json::to_string(&self.status()).unwrap_or_default(),
            },
            "/health" => match self.health() {
                Ok(()) => Answer::text("200 OK", "ok\n".into()),
                Err(reason) => Answer::text("503 Service Unavailable", format!("{reason}\n")),
            },
            "/ready" => match self.health() {
                Err(reason) => Answer::text("503 Service Unavailable", format!("{reason}\n")),
                Ok(()) if *self.draining.borrow() => {
                    Answer::text("503 Service Unavailable", "draining for a stop\n".into())
                }
                Ok(()) => Answer::text("200 OK", "ready\n".into()),
            },
            _ => Answer::text("404 Not Found", "not found\n".into()),
        }
    }
}

/// Binds `address` and serves the endpoint until the runtime shuts down. It is started once
/// the snapshotter is open and its layers remounted, so a listener that answers is a daemon
/// that has finished starting.
pub async fn serve(address: SocketAddr, observed: Observed) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("bind metrics address {address}"))?;
    info!(%address, "serving /metrics, /status, /health and /ready");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            let observed = observed.clone();
            tokio::spawn(async move {
                let mut request = [0u8; MAX_REQUEST_BYTES];
                let n = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut request)).await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let line = String::from_utf8_lossy(&request[..n]);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap_or(path);
                debug!(%peer, path, "metrics request");
                let answer = observed.answer(path).await;
                let head = format!(
                    "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.code,
                    answer.kind,
                    answer.body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(answer.body.as_bytes()).await;
            });
        }
    });
    Ok(())
}
