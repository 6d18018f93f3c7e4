//! The peer listener: `/health`, the index of the blobs this node owns (`/v1/announce`,
//! `/v1/lookup`) and block bytes from this node's cache (`/v1/blobs/<digest>`), over HTTP/2
//! (HTTP/1.1 too, for probes by hand), plain or mutual TLS.

use std::convert::Infallible;
use std::ops::Range;
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
use super::index::Exclusions;
use super::member::PeerAddr;
use super::stats::PeerCounters;
use super::wire::{
    Announce, Health, Lookup, LookupReply, Renew, MAX_BODY_BYTES, MAX_LOOKUP_BLOCKS,
};
use super::Peers;
use crate::digest::Digest;
use crate::fetcher::Fetcher;

type Reply = Response<Full<Bytes>>;

/// Accepts connections until the runtime shuts down.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, fetcher: Fetcher) {
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
        let fetcher = fetcher.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let fetcher = fetcher.clone();
                async move { Ok::<_, Infallible>(route(&fetcher, request).await) }
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

async fn route(fetcher: &Fetcher, request: Request<Incoming>) -> Reply {
    let Some(peers) = fetcher.peers() else {
        return plain(StatusCode::NOT_FOUND, "peers are off");
    };
    let path = request.uri().path().to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/health") => json(&Health {
            node: peers.node.0.clone(),
        }),
        (Method::POST, "/v1/announce") => match body::<Announce>(request).await {
            Ok(announce) => announced(peers, announce),
            Err(reply) => reply,
        },
        (Method::POST, "/v1/lookup") => match body::<Lookup>(request).await {
            Ok(lookup) => looked_up(peers, lookup),
            Err(reply) => reply,
        },
        (Method::POST, "/v1/renew") => match body::<Renew>(request).await {
            Ok(renew) => renewed(peers, renew),
            Err(reply) => reply,
        },
        (Method::GET, blob) if blob.starts_with("/v1/blobs/") => {
            upload(fetcher, peers, &blob["/v1/blobs/".len()..], &request).await
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
            holder: &|holder| peers.members.is_avoided(holder, now),
            grantee: &|grantee| peers.members.is_out(grantee, now),
        },
    );
    json(&LookupReply { blocks })
}

fn renewed(peers: &Peers, renew: Renew) -> Reply {
    let (Ok(from), Ok(blob)) = (renew.from.parse::<PeerAddr>(), Digest::parse(&renew.blob)) else {
        return plain(StatusCode::BAD_REQUEST, "bad asker or blob");
    };
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

/// Serves bytes of blocks this node may share (fetched from the registry) and still holds.
async fn upload(
    fetcher: &Fetcher,
    peers: &Peers,
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
    if !peers.shareable.contains_all(&blob, blocks) {
        return plain(StatusCode::NOT_FOUND, "not held");
    }
    let Some(_slot) = peers.limiter.try_start() else {
        PeerCounters::add(&peers.counters.uploads_refused, 1);
        return plain(StatusCode::TOO_MANY_REQUESTS, "busy");
    };
    let reader = fetcher.clone();
    let read_range = range.clone();
    let cached = tokio::task::spawn_blocking(move || reader.cache().read(&blob, read_range)).await;
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

async fn body<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Reply> {
    let collected = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large or cut short"))?;
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
}
