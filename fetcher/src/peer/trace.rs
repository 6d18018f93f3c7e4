//! Learned-prefetch traces between nodes: `GET /v1/traces/<image>/<blob>` answers with the
//! trace this node keeps for that image's layer blob, and [`Peers::trace`] asks for one.
//!
//! Who is asked: the nodes the blob's index owners name as holding its first blocks (the node
//! that recorded a trace read the blob, so it holds some of it), then the live members in the
//! blob's rendezvous order, a few at most. The lookup names no asker, so it takes no right to
//! fetch anything. Who is answered: members only (as every route), and for a blob this node
//! shares only with peers that prove pull access ([`super::gate`]), a trace of a blob this
//! node does not share at all is not served: it says what a private image reads.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{HeaderMap, StatusCode};
use tracing::debug;

use super::index::Exclusions;
use super::member::PeerAddr;
use super::rendezvous;
use super::shareable::Audience;
use super::stats::PeerCounters;
use super::wire::{Advice, Lookup, MAX_LOOKUP_BLOCKS};
use super::Peers;
use crate::digest::Digest;
use crate::reference::BlobRef;
use crate::traces::TraceStore;

/// Nodes asked for a trace at most, one after the other.
const MAX_ASKED: usize = 4;

impl Peers {
    /// A trace of `blob` for `image` from the first peer that has one and gives it.
    pub(crate) async fn trace(&self, image: &Digest, blob: &BlobRef) -> Option<(PeerAddr, Bytes)> {
        let budget = self.config.latency_budget;
        let proof = self
            .config
            .tls
            .as_ref()
            .and_then(|_| self.gate.proof(&blob.image));
        for peer in self.trace_candidates(blob).await {
            match self
                .client
                .trace(peer, image, &blob.digest, proof.clone(), budget)
                .await
            {
                Ok(bytes) => return Some((peer, bytes)),
                Err(failure) => {
                    debug!(%peer, blob = %blob.digest, %failure, "no trace from this peer")
                }
            }
        }
        None
    }

    /// Holders of the blob's first blocks as its owners know them, then live members.
    async fn trace_candidates(&self, blob: &BlobRef) -> Vec<PeerAddr> {
        let now = Instant::now();
        let live = self.members.live(now);
        let me = self.members.me();
        let count = blob
            .size
            .div_ceil(self.block_size)
            .clamp(1, MAX_LOOKUP_BLOCKS);
        let mut found: Vec<PeerAddr> = Vec::new();
        for owner in rendezvous::owners(&blob.digest, &live, self.config.owners) {
            let advice = if Some(owner) == me {
                let excluded = Exclusions {
                    holder: &|holder| self.members.is_out(holder, now),
                    busy: &|holder| self.members.is_busy(holder, now),
                    grantee: &|grantee| self.members.is_out(grantee, now),
                };
                self.index
                    .lookup(now, None, &blob.digest, 0, count, &excluded)
            } else {
                let lookup = Lookup {
                    from: None,
                    blob: blob.digest.to_string(),
                    block_size: self.block_size,
                    first: 0,
                    count,
                };
                let timeout = (self.config.latency_budget / 2).max(Duration::from_millis(50));
                match self.client.lookup(owner, &lookup, timeout).await {
                    Ok(reply) => reply.blocks,
                    Err(failure) => {
                        debug!(%owner, %failure, "trace holder lookup failed");
                        continue;
                    }
                }
            };
            for advice in advice {
                if let Advice::Holders { holders } = advice {
                    found.extend(holders.iter().filter_map(|h| h.parse::<PeerAddr>().ok()));
                }
            }
        }
        found.extend(rendezvous::owners(&blob.digest, &live, live.len()));
        let mut seen = HashSet::new();
        found
            .into_iter()
            .filter(|peer| Some(*peer) != me && seen.insert(*peer))
            .take(MAX_ASKED)
            .collect()
    }

    /// The answer to `GET /v1/traces/<image>/<blob>` (`rest` is `<image>/<blob>`).
    pub(super) async fn serve_trace(
        &self,
        traces: Arc<TraceStore>,
        rest: &str,
        certified: bool,
        headers: &HeaderMap,
    ) -> Result<Bytes, (StatusCode, &'static str)> {
        let parsed = rest.split_once('/').and_then(|(image, blob)| {
            Some((Digest::parse(image).ok()?, Digest::parse(blob).ok()?))
        });
        let Some((image, blob)) = parsed else {
            return Err((StatusCode::BAD_REQUEST, "bad image or blob digest"));
        };
        let Some(audience) = self.shareable.audience(&blob) else {
            return Err((StatusCode::NOT_FOUND, "not held"));
        };
        if let Audience::PullersFrom(registry) = audience {
            match self.gate.admit(&registry, &blob, certified, headers).await {
                Ok(asked) => {
                    if asked {
                        PeerCounters::add(&self.counters.pull_checks, 1);
                    }
                }
                Err(refusal) => {
                    PeerCounters::add(&self.counters.private_refused, 1);
                    return Err((StatusCode::FORBIDDEN, refusal.reason()));
                }
            }
        }
        let path = traces.path(&image, &blob);
        let kept = tokio::task::spawn_blocking(move || traces.get(&image, &blob)).await;
        match kept {
            Ok(Ok(Some(bytes))) => Ok(bytes),
            Ok(Ok(None)) => Err((StatusCode::NOT_FOUND, "no trace")),
            Ok(Err(error)) => {
                debug!(path = %path.display(), %error, "trace not served");
                Err((StatusCode::NOT_FOUND, "no trace"))
            }
            Err(_) => Err((StatusCode::NOT_FOUND, "no trace")),
        }
    }
}
