//! A peer that lies: a small HTTP/2 server in its own network namespace that answers
//! `/health`, tells every asker it holds every block, announces so to the real nodes, and
//! sends garbage of the right length. Containers must see only right bytes, the run must
//! finish, and the liar must be blamed and avoided.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use super::{ensure_all_right, peer_stat, start_together, with_cluster, PEER_PORT};
use crate::convert::manifest_layers;
use crate::fixture::{privileged, Fixture};
use crate::netns::Network;
use crate::process;

/// The liar's server, running on a thread of its own inside the liar's namespace.
struct Liar {
    served: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Liar {
    fn start(network: &Network, label: &str, address: Ipv4Addr) -> Result<Liar> {
        let netns = std::fs::File::open(network.namespace_path(label)?)
            .context("open the liar's namespace")?;
        let served = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
        let counter = served.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread only moves this thread (and the sockets it opens)
            // into the namespace; the fd is a valid open namespace file.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(std::io::Error::last_os_error().into()));
                return;
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready_tx.send(Err(err.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let addr = SocketAddr::from((address, PEER_PORT));
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let counter = counter.clone();
                        let me = addr.to_string();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                let counter = counter.clone();
                                let me = me.clone();
                                async move {
                                    Ok::<_, Infallible>(lie(request, &me, &counter).await)
                                }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                TokioExecutor::new(),
                            )
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .context("the liar did not start")??;
        Ok(Liar {
            served,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every answer a lying peer gives.
async fn lie(
    request: Request<hyper::body::Incoming>,
    me: &str,
    served: &AtomicU64,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let range = request
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    match path.as_str() {
        "/health" => reply(StatusCode::OK, br#"{"node":"liar"}"#.to_vec()),
        "/v1/announce" => reply(StatusCode::OK, Vec::new()),
        "/v1/lookup" => {
            let lookup: Value = serde_json::from_slice(&body).unwrap_or_default();
            let count = lookup["count"].as_u64().unwrap_or(0).min(1024);
            let blocks: Vec<Value> = (0..count)
                .map(|_| json!({"action": "holders", "holders": [me]}))
                .collect();
            reply(
                StatusCode::OK,
                serde_json::to_vec(&json!({ "blocks": blocks })).unwrap_or_default(),
            )
        }
        blob if blob.starts_with("/v1/blobs/") => match range {
            Some((start, end)) if end >= start && end - start < 64 << 20 => {
                let len = (end - start + 1) as usize;
                served.fetch_add(len as u64, Ordering::Relaxed);
                reply(StatusCode::PARTIAL_CONTENT, vec![0x42; len])
            }
            _ => reply(StatusCode::RANGE_NOT_SATISFIABLE, Vec::new()),
        },
        _ => reply(StatusCode::NOT_FOUND, Vec::new()),
    }
}

#[test]
fn a_lying_peer_never_reaches_a_container_and_is_avoided() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let layers =
                manifest_layers(&format!("{}/{}", cluster.host_registry(), published.path))?;
            let liar_ip = cluster.network.attach("liar")?;
            let liar_name = format!("{liar_ip}:{PEER_PORT}");
            let liar = Liar::start(&cluster.network, "liar", liar_ip)?;
            let nodes = cluster.add_peers_with(
                "v",
                &["latency_budget_ms = 3000"; 2],
                std::slice::from_ref(&liar_name),
            )?;

            // The liar tells each real node it holds every block of every layer.
            for &i in &nodes {
                let node = cluster.nodes[i].peer_name();
                for (digest, size) in &layers {
                    let blocks = size.div_ceil(1 << 20);
                    let announce = json!({
                        "from": liar_name,
                        "blob": digest,
                        "block_size": 1 << 20,
                        "blocks": "ff".repeat(blocks.div_ceil(8) as usize),
                        "replace": false,
                    });
                    let mut curl = cluster.network.command("liar", "curl")?;
                    curl.args(["-sSf", "--http2-prior-knowledge", "--max-time", "5"])
                        .args(["-H", "content-type: application/json", "-d"])
                        .arg(announce.to_string())
                        .arg(format!("http://{node}/v1/announce"));
                    process::run(&mut curl, Duration::from_secs(20))?;
                }
            }

            let started = start_together(cluster, &nodes, &reference, "lied-to");
            ensure_all_right(&started, &published.blob_sha256)?;
            let mut blamed = 0;
            for &i in &nodes {
                let status = cluster.nodes[i].status(&cluster.network)?;
                blamed += peer_stat(&status, &liar_name, "verify_failures");
                // Lazily mounted all the same: the index was read again from the registry.
                anyhow::ensure!(
                    status["lazy_fallbacks"]
                        .as_object()
                        .is_some_and(|f| f.is_empty()),
                    "a layer was downloaded instead: {}",
                    status["lazy_fallbacks"]
                );
            }
            let served = liar.served.load(Ordering::Relaxed);
            let slowest = started.iter().map(|s| s.took).max().unwrap_or_default();
            eprintln!(
                "p2p liar: sent {served} garbage bytes, blamed {blamed} times, slowest start {slowest:?}"
            );
            anyhow::ensure!(served > 0, "nobody asked the liar: the test proves nothing");
            anyhow::ensure!(blamed >= 1, "the liar was never blamed");
            anyhow::ensure!(slowest < Duration::from_secs(60), "took {slowest:?}");
            drop(liar);
            Ok(())
        })
    });
}
