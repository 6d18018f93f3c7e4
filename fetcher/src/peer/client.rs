//! [`PeerClient`]: this node's requests to other nodes, over HTTP/2 connections that are kept
//! open between requests (plain, or mutual TLS when `peers.tls` is set).

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_config::PeersConfig;

use super::error::PeerError;
use super::member::PeerAddr;
use super::tls;
use super::warm::Warm;
use super::wire::{Announce, Health, Lookup, LookupReply, Renew, MAX_BODY_BYTES};
use crate::digest::Digest;

/// Why a request to a peer gave nothing.
#[derive(Debug)]
pub enum PeerFailure {
    /// It answered "busy" (429 or 503).
    Busy,
    /// It does not hold what was asked (404).
    Missing,
    /// It will not give it to this node (403): for blocks of a private repository, this
    /// node showed no proof of pull access the registry accepts (none yet, or a stale one).
    Refused(String),
    /// Anything else: refused, reset, timed out, a bad answer.
    Failed(String),
}

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerFailure::Busy => f.write_str("busy"),
            PeerFailure::Missing => f.write_str("does not hold it"),
            PeerFailure::Refused(reason) => write!(f, "refused: {reason}"),
            PeerFailure::Failed(reason) => f.write_str(reason),
        }
    }
}

#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    scheme: &'static str,
}

impl PeerClient {
    pub fn new(config: &PeersConfig) -> Result<PeerClient, PeerError> {
        let builder = reqwest::Client::builder()
            .http2_prior_knowledge()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(300))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        // From the address peers know this node by: a listener without TLS serves members
        // by their address, and the kernel would otherwise pick another one on loopback.
        let listen = config.listen.ip();
        let builder = if listen.is_unspecified() {
            builder
        } else {
            builder.local_address(listen)
        };
        let (builder, scheme) = match &config.tls {
            None => (builder, "http"),
            Some(tls) => (tls::client(builder, tls)?, "https"),
        };
        let http = builder.build().map_err(|source| PeerError::BuildClient {
            host: "peers".into(),
            source,
        })?;
        Ok(PeerClient { http, scheme })
    }

    fn url(&self, peer: PeerAddr, path: &str) -> String {
        format!("{}://{}{}", self.scheme, peer, path)
    }

    pub async fn health(&self, peer: PeerAddr, timeout: Duration) -> Result<Health, PeerFailure> {
        let request = self.http.get(self.url(peer, "/health")).timeout(timeout);
        json_of(request.send().await).await
    }

    pub async fn lookup(
        &self,
        peer: PeerAddr,
        lookup: &Lookup,
        timeout: Duration,
    ) -> Result<LookupReply, PeerFailure> {
        self.post(peer, "/v1/lookup", lookup, timeout).await
    }

    pub async fn announce(
        &self,
        peer: PeerAddr,
        announce: &Announce,
        timeout: Duration,
    ) -> Result<(), PeerFailure> {
        self.post_only(peer, "/v1/announce", announce, timeout)
            .await
    }

    pub async fn renew(
        &self,
        peer: PeerAddr,
        renew: &Renew,
        timeout: Duration,
    ) -> Result<(), PeerFailure> {
        self.post_only(peer, "/v1/renew", renew, timeout).await
    }

    /// Asks `peer` to take a whole blob; waits until it has. A refusal carries its reason.
    pub async fn warm(
        &self,
        peer: PeerAddr,
        warm: &Warm,
        timeout: Duration,
    ) -> Result<(), PeerFailure> {
        let response = self
            .http
            .post(self.url(peer, "/v1/warm"))
            .json(warm)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| PeerFailure::Failed(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            return Err(PeerFailure::Busy);
        }
        let body = response.bytes().await.unwrap_or_default();
        let reason = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
        Err(PeerFailure::Failed(format!(
            "answered {status}: {}",
            reason.trim()
        )))
    }

    /// A POST whose answer carries nothing but its status.
    async fn post_only<T: Serialize>(
        &self,
        peer: PeerAddr,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<(), PeerFailure> {
        let response = self
            .http
            .post(self.url(peer, path))
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        checked(response).map(drop)
    }

    async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        peer: PeerAddr,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, PeerFailure> {
        let request = self
            .http
            .post(self.url(peer, path))
            .json(body)
            .timeout(timeout);
        json_of(request.send().await).await
    }

    /// Bytes `range` of `blob` from `peer`'s cache, which must send exactly that many by
    /// `deadline`; `proof` are the headers that show this node may pull the blob, for a
    /// blob of a private repository.
    pub async fn blocks(
        &self,
        peer: PeerAddr,
        blob: &Digest,
        range: Range<u64>,
        proof: Option<[(&'static str, HeaderValue); 2]>,
        deadline: Instant,
    ) -> Result<Bytes, PeerFailure> {
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let mut request = self
            .http
            .get(self.url(peer, &format!("/v1/blobs/{blob}")))
            .header(
                reqwest::header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            )
            .timeout(timeout);
        for (name, value) in proof.into_iter().flatten() {
            request = request.header(name, value);
        }
        let response = request.send().await;
        let response = checked(response)?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(PeerFailure::Failed(format!(
                "answered {} to a range request",
                response.status()
            )));
        }
        let expected = range.end - range.start;
        if response.content_length().is_some_and(|len| len != expected) {
            return Err(PeerFailure::Failed("wrong content length".into()));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| PeerFailure::Failed(e.to_string()))?;
        if bytes.len() as u64 != expected {
            return Err(PeerFailure::Failed(format!(
                "sent {} bytes, {expected} asked",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

impl PeerClient {
    /// The trace `peer` keeps of `blob` for `image`, at most
    /// [`MAX_TRACE_BYTES`](crate::traces::MAX_TRACE_BYTES); `proof` as for blocks.
    pub async fn trace(
        &self,
        peer: PeerAddr,
        image: &Digest,
        blob: &Digest,
        proof: Option<[(&'static str, HeaderValue); 2]>,
        timeout: Duration,
    ) -> Result<Bytes, PeerFailure> {
        let mut request = self
            .http
            .get(self.url(peer, &format!("/v1/traces/{image}/{blob}")))
            .timeout(timeout);
        for (name, value) in proof.into_iter().flatten() {
            request = request.header(name, value);
        }
        let mut response = checked(request.send().await)?;
        let limit = crate::traces::MAX_TRACE_BYTES;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| PeerFailure::Failed(e.to_string()))?
        {
            if body.len() + chunk.len() > limit {
                return Err(PeerFailure::Failed("trace too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }
}

fn checked(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, PeerFailure> {
    let response = response.map_err(|e| PeerFailure::Failed(e.to_string()))?;
    match response.status() {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Err(PeerFailure::Busy),
        StatusCode::NOT_FOUND => Err(PeerFailure::Missing),
        StatusCode::FORBIDDEN => Err(PeerFailure::Refused("answered 403".into())),
        status if status.is_success() => Ok(response),
        status => Err(PeerFailure::Failed(format!("answered {status}"))),
    }
}

async fn json_of<R: DeserializeOwned>(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<R, PeerFailure> {
    let response = checked(response)?;
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(PeerFailure::Failed("answer too large".into()));
    }
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| PeerFailure::Failed(e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(PeerFailure::Failed("answer too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| PeerFailure::Failed(format!("bad answer: {e}")))
}
