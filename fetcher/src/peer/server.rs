//! The peer listener: `/health`, the index of the blobs this node owns (`/v1/announce`,
//! `/v1/lookup`), block bytes from this node's cache (`/v1/blobs/<digest>`) and learned-prefetch
//! traces (`/v1/traces/<image>/<blob>`, see [`trace`](super::trace)), over HTTP/2
//! (HTTP/1.1 too, for probes by hand), plain or mutual TLS.
//!
//! Who is served: with TLS, clients whose certificate the configured CA signed (anyone else
//! fails the handshake); without it, only requests from a member's address. Anyone else gets
//! 403 from every route but `/health`, before a body is read. Announcements and renewals must
//! also come from a member's peer address, and every body has a size limit (413 past it).
//! Blocks of a private repository go only to a client that proves it may pull it
//! ([`gate`](super::gate)).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::blockset::BlockSet;
use super::held::HeldBlocks;
use super::index::Exclusions;
use super::member::PeerAddr;
use super::shareable::Audience;
use super::stats::PeerCounters;
use super::warm::Warm;
use super::wire::{
    Announce, Health, Lookup, LookupReply, Renew, MAX_ANNOUNCE_BYTES, MAX_LOOKUP_BLOCKS,
    MAX_QUERY_BYTES,
};
use super::Peers;
use crate::digest::Digest;
use crate::traces::TraceStore;

type Reply = Response<Full<Bytes>>;

/// Accepts connections until the runtime shuts down.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    peers: Arc<Peers>,
    held: Arc<dyn HeldBlocks>,
    traces: Arc<TraceStore>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "peer accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (peers, held, traces) = (peers.clone(), held.clone(), traces.clone());
        let tls = tls.clone();
        // Past the TLS handshake, the client's certificate is the CA's: it is a peer.
        let client = Client {
            remote,
            certified: tls.is_some(),
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (peers, held, traces) = (peers.clone(), held.clone(), traces.clone());
                async move { Ok::<_, Infallible>(route(&peers, held, traces, client, request).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let served = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(error) => {
                        debug!(%remote, %error, "peer TLS handshake refused");
                        return;
                    }
                },
            };
            if let Err(error) = served {
                debug!(%remote, %error, "peer connection ended");
            }
        });
    }
}

/// Where a connection comes from, and whether its client proved it is a peer.
#[derive(Clone, Copy)]
struct Client {
    remote: SocketAddr,
    certified: bool,
}

async fn route(
    peers: &Peers,
    held: Arc<dyn HeldBlocks>,
    traces: Arc<TraceStore>,
    client: Client,
    request: Request<Incoming>,
) -> Reply {
    let path = request.uri().path().to_owned();
    if path == "/health" && request.method() == Method::GET {
        // Liveness and a random node id: nothing a stranger can use.
        return json(&Health {
            node: peers.node.0.clone(),
        });
    }
    if !client.certified && !peers.members.has_ip(client.remote.ip()) {
        PeerCounters::add(&peers.counters.requests_refused, 1);
        debug!(remote = %client.remote, path, "peer request from a non-member refused");
        return plain(StatusCode::FORBIDDEN, "not a member of this cluster");
    }
    match (request.method().clone(), path.as_str()) {
        (Method::POST, "/v1/announce") => {
            match body::<Announce, _>(request, MAX_ANNOUNCE_BYTES).await {
                Ok(announce) => announced(peers, announce),
                Err(reply) => reply,
            }
        }
        (Method::POST, "/v1/lookup") => match body::<Lookup, _>(request, MAX_QUERY_BYTES).await {
            Ok(lookup) => looked_up(peers, lookup),
            Err(reply) => reply,
        },
        (Method::POST, "/v1/renew") => match body::<Renew, _>(request, MAX_QUERY_BYTES).await {
            Ok(renew) => renewed(peers, renew),
            Err(reply) => reply,
        },
        (Method::POST, "/v1/warm") => match body::<Warm, _>(request, MAX_QUERY_BYTES).await {
            Ok(warm) => match peers.warm(warm).await {
                Ok(()) => plain(StatusCode::OK, "taken"),
                Err((status, why)) => {
                    debug!(remote = %client.remote, why, "blob not taken");
                    plain(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        &why,
                    )
                }
            },
            Err(reply) => reply,
        },
        (Method::GET, blob) if blob.starts_with("/v1/blobs/") => {
            upload(held, peers, client, &blob["/v1/blobs/".len()..], &request).await
        }
        (Method::GET, trace) if trace.starts_with("/v1/traces/") => {
            let rest = &trace["/v1/traces/".len()..];
            match peers
                .serve_trace(traces, rest, client.certified, request.headers())
                .await
            {
                Ok(bytes) => Response::new(Full::new(bytes)),
                Err((status, why)) => {
                    debug!(remote = %client.remote, path, why, "trace not served");
                    plain(status, why)
                }
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn announced(peers: &Peers, announce: Announce) -> Reply {
    let (Ok(from), Ok(blob)) = (
        announce.from.parse::<PeerAddr>(),
        Digest::parse(&announce.blob),
    ) else {
        return plain(StatusCode::BAD_REQUEST, "bad announcer or blob");
    };
    if !peers.members.is_known(&from) {
        PeerCounters::add(&peers.counters.requests_refused, 1);
        return plain(StatusCode::FORBIDDEN, "the announcer is not a member");
    }
    if announce.block_size != peers.block_size {
        return plain(
            StatusCode::BAD_REQUEST,
            "block size differs from this node's",
        );
    }
    let Some(blocks) = BlockSet::from_hex(&announce.blocks) else {
        return plain(StatusCode::BAD_REQUEST, "bad block set");
    };
    peers
        .index
        .announce(Instant::now(), from, &blob, &blocks, announce.replace);
    plain(StatusCode::OK, "")
}

fn looked_up(peers: &Peers, lookup: Lookup) -> Reply {
    let Ok(blob) = Digest::parse(&lookup.blob) else {
        return plain(StatusCode::BAD_REQUEST, "bad blob digest");
    };
    let from = match lookup.from.as_deref().map(str::parse::<PeerAddr>) {
        None => None,
        Some(Ok(from)) => Some(from),
        Some(Err(_)) => return plain(StatusCode::BAD_REQUEST, "bad asker address"),
    };
    if from.is_some_and(|from| !peers.members.is_known(&from)) {
        PeerCounters::add(&peers.counters.requests_refused, 1);
        return plain(StatusCode::FORBIDDEN, "the asker is not a member");
    }
    if lookup.block_size != peers.block_size {
        return plain(
            StatusCode::BAD_REQUEST,
            "block size differs from this node's",
        );
    }
    if lookup.count > MAX_LOOKUP_BLOCKS {
        return plain(StatusCode::BAD_REQUEST, "too many blocks in one lookup");
    }
    PeerCounters::add(&peers.counters.lookups_answered, 1);
    let now = Instant::now();
    let blocks = peers.index.lookup(
        now,
        from,
        &blob,
        lookup.first,
        lookup.count,
        &Exclusions {
            holder: &|holder| peers.members.is_out(holder, now),
            busy: &|holder| peers.members.is_busy(holder, now),
            grantee: &|grantee| peers.members.is_out(grantee, now),
        },
    );
    json(&LookupReply { blocks })
}

fn renewed(peers: &Peers, renew: Renew) -> Reply {
    let (Ok(from), Ok(blob)) = (renew.from.parse::<PeerAddr>(), Digest::parse(&renew.blob)) else {
        return plain(StatusCode::BAD_REQUEST, "bad asker or blob");
    };
    if !peers.members.is_known(&from) {
        PeerCounters::add(&peers.counters.requests_refused, 1);
        return plain(StatusCode::FORBIDDEN, "the asker is not a member");
    }
    if renew.block_size != peers.block_size {
        return plain(
            StatusCode::BAD_REQUEST,
            "block size differs from this node's",
        );
    }
    if renew.count > MAX_LOOKUP_BLOCKS {
        return plain(StatusCode::BAD_REQUEST, "too many blocks in one renewal");
    }
    peers
        .index
        .renew(Instant::now(), from, &blob, renew.first, renew.count);
    plain(StatusCode::OK, "")
}

/// Serves bytes of blocks this node may share (fetched from the registry) and still holds,
/// to this client.
async fn upload(
    held: Arc<dyn HeldBlocks>,
    peers: &Peers,
    client: Client,
    blob: &str,
    request: &Request<Incoming>,
) -> Reply {
    let Ok(blob) = Digest::parse(blob) else {
        return plain(StatusCode::BAD_REQUEST, "bad blob digest");
    };
    let Some(range) = request
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_range)
    else {
        return plain(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "one bytes=a-b range required",
        );
    };
    let block_size = peers.block_size;
    let blocks = range.start / block_size..(range.end - 1) / block_size + 1;
    let Some(audience) = peers.shareable.contains_all(&blob, blocks) else {
        return plain(StatusCode::NOT_FOUND, "not held");
    };
    if let Audience::PullersFrom(registry) = audience {
        let admitted = peers
            .gate
            .admit(&registry, &blob, client.certified, request.headers())
            .await;
        match admitted {
            Ok(asked) => {
                if asked {
                    PeerCounters::add(&peers.counters.pull_checks, 1);
                }
            }
            Err(refusal) => {
                PeerCounters::add(&peers.counters.private_refused, 1);
                debug!(remote = %client.remote, %blob, reason = refusal.reason(), "private blocks refused");
                return plain(StatusCode::FORBIDDEN, refusal.reason());
            }
        }
    }
    let Some(_slot) = peers.limiter.try_start() else {
        PeerCounters::add(&peers.counters.uploads_refused, 1);
        return plain(StatusCode::TOO_MANY_REQUESTS, "busy");
    };
    let read_range = range.clone();
    let cached = tokio::task::spawn_blocking(move || held.read(&blob, read_range)).await;
    let Ok(Some(bytes)) = cached else {
        return plain(StatusCode::NOT_FOUND, "not held");
    };
    tokio::time::sleep(peers.limiter.charge(bytes.len() as u64)).await;
    PeerCounters::add(&peers.counters.bytes_uploaded, bytes.len() as u64);
    let mut reply = Response::new(Full::new(bytes));
    *reply.status_mut() = StatusCode::PARTIAL_CONTENT;
    reply
}

/// `bytes=a-b` (inclusive) as `a..b+1`; nothing else is served.
fn parse_range(header: &str) -> Option<Range<u64>> {
    let (start, end) = header.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = end.parse().ok()?;
    (start <= end && end < u64::MAX).then(|| start..end + 1)
}

/// The JSON body of `request`, refused with 413 once it is known to exceed `limit` bytes: by
/// its Content-Length before anything is read, or as soon as that many bytes have arrived.
async fn body<T, B>(request: Request<B>, limit: usize) -> Result<T, Reply>
where
    T: serde::de::DeserializeOwned,
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body over {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let collected = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected,
        Err(error) if error.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(error) => {
            return Err(plain(
                StatusCode::BAD_REQUEST,
                &format!("body cut short: {error}"),
            ))
        }
    };
    serde_json::from_slice(&collected.to_bytes())
        .map_err(|e| plain(StatusCode::BAD_REQUEST, &format!("bad body: {e}")))
}

fn json<T: Serialize>(value: &T) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    reply
}

fn plain(status: StatusCode, text: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(text.to_owned())));
    *reply.status_mut() = status;
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_closed_ranges_parse() {
        assert_eq!(parse_range("bytes=0-9"), Some(0..10));
        assert_eq!(parse_range("bytes=5-5"), Some(5..6));
        assert_eq!(parse_range("bytes=9-0"), None);
        assert_eq!(parse_range("bytes=0-"), None);
        assert_eq!(parse_range("bytes=0-1,3-4"), None);
        assert_eq!(parse_range("items=0-1"), None);
    }

    fn post(body: Vec<u8>, declared: Option<usize>) -> Request<Full<Bytes>> {
        let mut request = Request::post("/v1/lookup");
        if let Some(len) = declared {
            request = request.header(hyper::header::CONTENT_LENGTH, len);
        }
        request.body(Full::new(Bytes::from(body))).unwrap()
    }

    async fn status_of(request: Request<Full<Bytes>>, limit: usize) -> StatusCode {
        match body::<serde_json::Value, _>(request, limit).await {
            Ok(_) => StatusCode::OK,
            Err(reply) => reply.status(),
        }
    }

    #[tokio::test]
    async fn bodies_over_their_limit_get_413_whether_declared_or_not() {
        let lookup = br#"{"blob":"x"}"#.to_vec();
        let len = lookup.len();
        assert_eq!(
            status_of(post(lookup.clone(), None), len).await,
            StatusCode::OK
        );
        let big = [b"[".as_slice(), &b"1,".repeat(5000), b"1]"].concat();
        assert_eq!(
            status_of(post(big.clone(), None), MAX_QUERY_BYTES).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // A declared length over the limit is refused before a byte is read.
        assert_eq!(
            status_of(
                post(lookup.clone(), Some(MAX_QUERY_BYTES + 1)),
                MAX_QUERY_BYTES
            )
            .await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let reply = body::<serde_json::Value, _>(post(big, None), MAX_QUERY_BYTES)
            .await
            .unwrap_err();
        let text = reply.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, format!("body over {MAX_QUERY_BYTES} bytes"));
        assert_eq!(
            status_of(post(b"{".to_vec(), None), len).await,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn the_largest_honest_announcement_fits_its_limit() {
        let blocks = BlockSet::from_hex(
            &"f".repeat((super::super::blockset::MAX_SHARED_BLOCKS / 4) as usize),
        )
        .unwrap();
        let announce = Announce {
            from: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
            blob: Digest::of(b"blob").to_string(),
            block_size: u64::MAX,
            blocks: blocks.to_hex(),
            replace: false,
        };
        assert!(serde_json::to_vec(&announce).unwrap().len() <= MAX_ANNOUNCE_BYTES);
        let lookup = Lookup {
            from: Some(announce.from.clone()),
            blob: announce.blob.clone(),
            block_size: u64::MAX,
            first: u64::MAX,
            count: u64::MAX,
        };
        assert!(serde_json::to_vec(&lookup).unwrap().len() <= MAX_QUERY_BYTES / 8);
    }
}
