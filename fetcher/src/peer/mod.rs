//! The peer network: nodes ask each other for blocks before they ask the registry.
//!
//! - [`Peers`] is one node's side of it: membership ([`member`], kept up by [`probe`]),
//!   rendezvous placement of each blob's index owners ([`rendezvous`]), the index this node
//!   keeps for the blobs it owns ([`index`]), announcements of what it holds ([`announce`]),
//!   and the client and listener of the HTTP/2 protocol ([`client`], [`server`], [`wire`]).
//! - Integrity: peers are asked only for blobs whose every chunk the reader verifies against
//!   hashes from a verified index (eStargz: the TOC, itself checked against the layer's
//!   annotation and always read from the registry); overlaybd blobs, whose CRCs travel with
//!   the data, are never taken from peers. A node shares only blocks it fetched from the
//!   registry itself ("shareable");
//!   blocks it got from a peer serve its own containers once their chunks verify, but are
//!   never passed on, so bad bytes cannot spread, and a peer whose bytes fail verification is
//!   avoided. The expected hashes come from the verified TOC, never from the sender.

mod announce;
mod blockset;
mod client;
mod index;
mod limiter;
mod member;
mod probe;
mod rendezvous;
mod server;
mod stats;
mod tls;
mod wire;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use shoal_config::PeersConfig;
use tracing::{debug, info, warn};

use crate::cache::{BlockKey, ChunkCache};
use crate::digest::Digest;
use crate::error::FetchError;
use crate::fetcher::Fetcher;
use crate::reference::BlobRef;
use announce::Announcer;
use blockset::{BlockSet, MAX_SHARED_BLOCKS};
use client::{PeerClient, PeerFailure};
use index::OwnerIndex;
use limiter::UploadLimiter;
use member::{Membership, NodeId, Penalty};
use stats::{Outcome, PeerCounters};
use wire::{Advice, Lookup, MAX_LOOKUP_BLOCKS};

pub use member::PeerAddr;
pub use stats::{PeerStats, PerPeer};

/// Peer-sourced blocks remembered (to blame their sender if they fail verification).
const PEER_SOURCED_CAP: usize = 1 << 18;

pub struct Peers {
    config: PeersConfig,
    block_size: u64,
    node: NodeId,
    members: Membership,
    index: OwnerIndex,
    client: PeerClient,
    limiter: UploadLimiter,
    announcer: Announcer,
    /// Blocks fetched from the registry by this node: the only ones it shares.
    shareable: Mutex<HashMap<Digest, BlockSet>>,
    /// Which peer sent each block that came from a peer.
    peer_sourced: Mutex<LruCache<BlockKey, PeerAddr>>,
    /// Blobs whose every chunk is checked against hashes the peers did not supply (an
    /// eStargz layer with a verified TOC): the only ones asked of peers.
    verifiable: Mutex<HashSet<Digest>>,
    counters: PeerCounters,
}

impl Peers {
    pub fn new(config: &PeersConfig, block_size: u64) -> Result<Peers, FetchError> {
        Ok(Peers {
            block_size,
            node: NodeId::random(),
            members: Membership::default(),
            // A node told to fetch a block has the budget to bring it before others stop
            // waiting for it.
            index: OwnerIndex::new(config.lease, config.latency_budget),
            client: PeerClient::new(config)?,
            limiter: UploadLimiter::new(config.upload_rate.0, config.max_uploads),
            announcer: Announcer::default(),
            shareable: Mutex::default(),
            peer_sourced: Mutex::new(LruCache::new(
                NonZeroUsize::new(PEER_SOURCED_CAP).unwrap_or(NonZeroUsize::MIN),
            )),
            counters: PeerCounters::default(),
            verifiable: Mutex::default(),
            config: config.clone(),
        })
    }

    pub fn stats(&self) -> PeerStats {
        let now = Instant::now();
        self.counters.snapshot(
            self.members.known().len() as u64,
            self.members.live(now).len() as u64,
        )
    }

    /// This node's own peer address, once a probe has found it among the members.
    pub fn me(&self) -> Option<PeerAddr> {
        self.members.me()
    }

    /// Lets peers supply `blob`'s blocks from now on: its reader checks every chunk against
    /// hashes from its verified index, so bad bytes are caught and their sender blamed.
    pub(crate) fn allow(&self, blob: &Digest) {
        self.verifiable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(blob.clone());
    }

    pub(crate) fn allows(&self, blob: &Digest) -> bool {
        self.verifiable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(blob)
    }

    /// When blocks asked of peers now must be fetched from the registry at the latest.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.latency_budget
    }

    /// One round of asking peers for `blocks` (ascending) of `blob`, until `deadline`: it
    /// ends as soon as some blocks must come from the registry (this node was told to fetch
    /// them, or no holder could send them), so that the caller fetches and announces those
    /// while others may be waiting for them, then asks again about the rest.
    pub(crate) async fn fetch(
        &self,
        blob: &BlobRef,
        blocks: &[u64],
        deadline: Instant,
    ) -> PeerRound {
        let mut round = PeerRound::default();
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            return round;
        };
        if last - first >= MAX_LOOKUP_BLOCKS || last >= MAX_SHARED_BLOCKS {
            return PeerRound::registry(blocks.to_vec());
        }
        let mut pending: BTreeSet<u64> = blocks.iter().copied().collect();
        let mut tried: HashMap<u64, HashSet<PeerAddr>> = HashMap::new();
        let mut waited = false;
        while let (Some(&first), Some(&last)) = (pending.first(), pending.last()) {
            if Instant::now() >= deadline {
                break;
            }
            let Some(advice) = self.lookup(blob, first..last + 1, deadline).await else {
                break;
            };
            let me = self.members.me();
            let now = Instant::now();
            let mut plan: Vec<(u64, PeerAddr)> = Vec::new();
            let mut wait = None;
            for (index, advice) in (first..).zip(advice) {
                if !pending.contains(&index) {
                    continue;
                }
                match advice {
                    Advice::Fetch => {
                        pending.remove(&index);
                        round.fetch.push(index);
                    }
                    Advice::Wait { retry_ms, .. } => {
                        wait = Some(Duration::from_millis(retry_ms.clamp(5, 500)));
                    }
                    Advice::Holders { holders } => {
                        let tried = tried.entry(index).or_default();
                        let holder = holders
                            .iter()
                            .filter_map(|h| h.parse::<PeerAddr>().ok())
                            .find(|h| {
                                Some(*h) != me
                                    && !tried.contains(h)
                                    && !self.members.is_avoided(h, now)
                            });
                        match holder {
                            Some(holder) => plan.push((index, holder)),
                            None => {
                                // Every holder was tried or is avoided: the registry.
                                pending.remove(&index);
                                round.fetch.push(index);
                                PeerCounters::add(&self.counters.fallbacks, 1);
                            }
                        }
                    }
                }
            }
            for (holder, run) in runs_by_holder(&plan) {
                match self.get(holder, blob, run.clone(), deadline).await {
                    Some(bytes) => {
                        let from = self.block_bytes(blob, run.start).start;
                        for index in run {
                            let at = self.block_bytes(blob, index);
                            let part =
                                bytes.slice((at.start - from) as usize..(at.end - from) as usize);
                            pending.remove(&index);
                            self.peer_sourced
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .put(BlockKey::new(blob.digest.clone(), index), holder);
                            round.got.push((index, part));
                        }
                    }
                    None => {
                        for index in run {
                            tried.entry(index).or_default().insert(holder);
                        }
                    }
                }
            }
            if !round.fetch.is_empty() {
                // Others may be waiting for these: fetch them first, ask again after.
                round.fetch.sort_unstable();
                round.waiting = pending.into_iter().collect();
                return round;
            }
            if plan.is_empty() {
                match wait {
                    Some(pause) => {
                        waited = true;
                        let until = (Instant::now() + pause).min(deadline);
                        tokio::time::sleep_until(until.into()).await;
                    }
                    None => break,
                }
            }
        }
        if waited || !tried.is_empty() {
            PeerCounters::add(&self.counters.fallbacks, pending.len() as u64);
        }
        round.fetch.extend(pending);
        round.fetch.sort_unstable();
        round
    }

    /// Asks the blob's owners (this node's own index when it is one), in rendezvous order,
    /// until one answers; `None` when none does.
    async fn lookup(
        &self,
        blob: &BlobRef,
        blocks: Range<u64>,
        deadline: Instant,
    ) -> Option<Vec<Advice>> {
        let now = Instant::now();
        let live = self.members.live(now);
        let me = self.members.me();
        let count = blocks.end - blocks.start;
        for owner in rendezvous::owners(&blob.digest, &live, self.config.owners) {
            PeerCounters::add(&self.counters.lookups, 1);
            if Some(owner) == me {
                return Some(self.index.lookup(
                    now,
                    me,
                    &blob.digest,
                    blocks.start,
                    count,
                    &|holder| self.members.is_avoided(holder, now),
                ));
            }
            let lookup = Lookup {
                from: me.map(|me| me.to_string()),
                blob: blob.digest.to_string(),
                block_size: self.block_size,
                first: blocks.start,
                count,
            };
            // Half the budget left: a loaded owner is waited for, and a dead one (which the
            // probes drop soon anyway) still leaves time for the second owner.
            let timeout =
                (deadline.saturating_duration_since(now) / 2).max(Duration::from_millis(50));
            match self.client.lookup(owner, &lookup, timeout).await {
                Ok(reply) if reply.blocks.len() as u64 == count => return Some(reply.blocks),
                Ok(_) => {
                    PeerCounters::add(&self.counters.lookup_failures, 1);
                    self.members
                        .penalise(owner, Penalty::BadData, Instant::now());
                }
                Err(failure) => {
                    PeerCounters::add(&self.counters.lookup_failures, 1);
                    debug!(%owner, %failure, "index lookup failed");
                    let penalty = match failure {
                        PeerFailure::Busy => Penalty::Busy,
                        _ => Penalty::Unreachable,
                    };
                    self.members.penalise(owner, penalty, Instant::now());
                }
            }
        }
        None
    }

    /// Blocks `run` of `blob` from `holder`, counted and penalised as they go.
    async fn get(
        &self,
        holder: PeerAddr,
        blob: &BlobRef,
        run: Range<u64>,
        deadline: Instant,
    ) -> Option<Bytes> {
        let range =
            self.block_bytes(blob, run.start).start..self.block_bytes(blob, run.end - 1).end;
        let started = Instant::now();
        match self
            .client
            .blocks(holder, &blob.digest, range, deadline)
            .await
        {
            Ok(bytes) => {
                self.counters.record(
                    holder,
                    Outcome::Served {
                        bytes: bytes.len() as u64,
                        took: started.elapsed(),
                    },
                );
                Some(bytes)
            }
            Err(failure) => {
                debug!(%holder, %failure, "block request to peer failed");
                let (outcome, penalty) = match failure {
                    PeerFailure::Busy => (Outcome::Busy, Some(Penalty::Busy)),
                    PeerFailure::Missing => (Outcome::Failed, None),
                    PeerFailure::Failed(_) => (Outcome::Failed, Some(Penalty::Unreachable)),
                };
                self.counters.record(holder, outcome);
                if let Some(penalty) = penalty {
                    self.members.penalise(holder, penalty, Instant::now());
                }
                None
            }
        }
    }

    /// Blocks of `blob` that just landed from the registry: shareable, and announced.
    pub(crate) fn landed(&self, blob: &Digest, blocks: &[u64]) {
        let mut fresh = BlockSet::new();
        for &index in blocks {
            fresh.insert(index);
        }
        if fresh.is_empty() {
            return;
        }
        self.shareable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(blob.clone())
            .or_default()
            .merge(&fresh);
        self.announcer.landed(blob, &fresh);
    }

    /// Blocks `blocks` of `blob` failed verification and are fetched again: they stop being
    /// shared, and a peer that sent any of them is blamed and avoided.
    pub(crate) fn rejected(&self, blob: &Digest, blocks: Range<u64>) {
        if let Some(set) = self
            .shareable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(blob)
        {
            for index in blocks.clone() {
                set.remove(index);
            }
        }
        let mut blamed = HashSet::new();
        {
            let mut sourced = self.peer_sourced.lock().unwrap_or_else(|e| e.into_inner());
            for index in blocks {
                if let Some(peer) = sourced.pop(&BlockKey::new(blob.clone(), index)) {
                    blamed.insert(peer);
                }
            }
        }
        for peer in blamed {
            warn!(%peer, %blob, "bytes from a peer failed verification; avoiding it");
            self.counters.record(peer, Outcome::BadData);
            self.members
                .penalise(peer, Penalty::BadData, Instant::now());
        }
    }

    fn shareable(&self, blob: &Digest, blocks: Range<u64>) -> bool {
        let shareable = self.shareable.lock().unwrap_or_else(|e| e.into_inner());
        shareable
            .get(blob)
            .is_some_and(|set| blocks.clone().all(|index| set.contains(index)))
    }

    /// Every blob's shareable blocks, less those the cache no longer holds (evicted, or
    /// dropped by a refetch), which stop being shareable too.
    fn shareable_sets(&self, cache: &ChunkCache) -> Vec<(Digest, BlockSet)> {
        let mut shareable = self.shareable.lock().unwrap_or_else(|e| e.into_inner());
        for (blob, set) in shareable.iter_mut() {
            set.retain(|index| cache.contains(&BlockKey::new(blob.clone(), index)));
        }
        shareable.retain(|_, set| !set.is_empty());
        shareable
            .iter()
            .map(|(blob, set)| (blob.clone(), set.clone()))
            .collect()
    }

    fn block_bytes(&self, blob: &BlobRef, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.block_size).min(blob.size);
        start..start.saturating_add(self.block_size).min(blob.size)
    }
}

/// Binds the peer listener and starts membership upkeep, announcements and the listener on
/// the current runtime. Returns the bound address.
pub async fn start(fetcher: &Fetcher) -> Result<Option<std::net::SocketAddr>, FetchError> {
    let Some(peers) = fetcher.peers_arc() else {
        return Ok(None);
    };
    let tls = peers.config.tls.as_ref().map(tls::acceptor).transpose()?;
    let listen = peers.config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| FetchError::BindPeerListener {
            address: listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| FetchError::BindPeerListener {
            address: listen,
            source,
        })?;
    info!(address = %bound, tls = tls.is_some(), node = %peers.node.0, "serving peers");
    tokio::spawn(server::serve(listener, tls, fetcher.clone()));
    tokio::spawn(probe::run(peers.clone()));
    tokio::spawn(announce::run(peers, fetcher.clone()));
    Ok(Some(bound))
}

/// What one round of asking peers came to: blocks they sent, blocks to fetch from the
/// registry now, and blocks still worth waiting for.
#[derive(Debug, Default)]
pub(crate) struct PeerRound {
    pub got: Vec<(u64, Bytes)>,
    pub fetch: Vec<u64>,
    pub waiting: Vec<u64>,
}

impl PeerRound {
    /// Every block from the registry.
    pub fn registry(blocks: Vec<u64>) -> PeerRound {
        PeerRound {
            fetch: blocks,
            ..PeerRound::default()
        }
    }
}

/// Groups `(block, holder)` pairs (in block order) into runs of adjacent blocks with the
/// same holder, each fetched with one range request.
fn runs_by_holder(plan: &[(u64, PeerAddr)]) -> Vec<(PeerAddr, Range<u64>)> {
    let mut runs: Vec<(PeerAddr, Range<u64>)> = Vec::new();
    for &(index, holder) in plan {
        match runs.last_mut() {
            Some((last, run)) if *last == holder && run.end == index => run.end += 1,
            _ => runs.push((holder, index..index + 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_of_one_holder_go_together() {
        let a: PeerAddr = "10.0.0.1:7420".parse().unwrap();
        let b: PeerAddr = "10.0.0.2:7420".parse().unwrap();
        let runs = runs_by_holder(&[(0, a), (1, a), (2, b), (4, b), (5, a)]);
        assert_eq!(runs, [(a, 0..2), (b, 2..3), (b, 4..5), (a, 5..6)]);
    }
}
