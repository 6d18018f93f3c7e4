//! One run of adjacent missing blocks, fetched from the remote tiers: peers first where the
//! read allows them, the registry for the rest; the waiters are answered as bytes arrive, and
//! the blocks cached (and announced) after.

use std::sync::Arc;

use bytes::Bytes;

use super::{Fetcher, Mode};
use crate::error::FetchError;
use crate::flight::Lead;
use crate::peer::{PeerRound, Peers};
use crate::reference::BlobRef;
use crate::stats::Source;

/// The one attempt a block gets within [`FAILED_FETCH_WINDOW`](super::FAILED_FETCH_WINDOW) (or `registry.timeout_secs`,
/// when shorter).
pub(super) const AFTER_FAILURE_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(5);

impl Fetcher {
    /// Fetches one run of adjacent blocks: from peers when they have them (unless this is a
    /// refetch), the rest from the registry with one range request per gap; answers the
    /// waiters, caches the blocks, and announces those that came from the registry as soon
    /// as they are cached, so that peers waiting for them get them while this node still
    /// waits on others for the rest of the run.
    pub(super) async fn fetch_run(self, blob: BlobRef, run: Vec<Lead>, mode: Mode) {
        if run.is_empty() {
            return;
        }
        let peers = self.peers_for(mode);
        let from_peers = {
            let Ok(_permit) = self.inner.remote.acquire().await else {
                return;
            };
            let _in_flight = self.inner.counters.in_flight();
            self.fetch_remote(&blob, &run, peers).await
        };
        // The leads stay registered until the blocks are cached, so a reader arriving
        // meanwhile joins the finished flight instead of fetching again.
        self.store(&blob, from_peers).await;
        drop(run);
    }

    /// The peer network, when `mode` may ask it.
    pub(super) fn peers_for(&self, mode: Mode) -> Option<&Peers> {
        match mode {
            Mode::Index | Mode::Read { peers: true } => self.inner.peers.as_deref(),
            Mode::Read { peers: false } | Mode::Refetch => None,
        }
    }

    /// Rounds of asking `peers` (when given) and fetching from the registry what they cannot
    /// send, until every block of `run` is answered. The registry's blocks are cached as they
    /// land; the peers' are returned, for the caller to cache.
    async fn fetch_remote(
        &self,
        blob: &BlobRef,
        run: &[Lead],
        peers: Option<&Peers>,
    ) -> Vec<(u64, Bytes)> {
        let deadline = peers.map(Peers::deadline);
        let mut remaining: Vec<u64> = run.iter().map(|lead| lead.key().index).collect();
        let mut from_peers = Vec::new();
        while !remaining.is_empty() {
            let round = match (peers, deadline) {
                (Some(peers), Some(deadline)) => {
                    self.ask_peers(peers, blob, &remaining, deadline).await
                }
                _ => PeerRound::registry(remaining),
            };
            from_peers.extend(self.answer_from_peers(blob, run, round.got));
            self.fetch_gaps(blob, run, &round.fetch, peers).await;
            remaining = round.waiting;
        }
        from_peers
    }

    /// One round of asking `peers` for `blocks` of `blob`, timed when they sent any.
    async fn ask_peers(
        &self,
        peers: &Peers,
        blob: &BlobRef,
        blocks: &[u64],
        deadline: std::time::Instant,
    ) -> PeerRound {
        let started = std::time::Instant::now();
        let round = peers.fetch(blob, blocks, deadline).await;
        if !round.got.is_empty() {
            self.inner.latency.observe(Source::Peer, started.elapsed());
        }
        round
    }

    /// Answers the waiters of the blocks of `run` that peers sent, and returns those blocks.
    fn answer_from_peers(
        &self,
        blob: &BlobRef,
        run: &[Lead],
        got: Vec<(u64, Bytes)>,
    ) -> Vec<(u64, Bytes)> {
        for (index, bytes) in &got {
            self.inner
                .counters
                .served(&blob.digest, Source::Peer, bytes.len() as u64);
            lead_of(run, *index).publish(Ok(bytes.clone()));
        }
        got
    }

    /// Fetches `blocks` (ascending) of `run` from the registry, one range request per
    /// stretch of adjacent blocks, caching each stretch and announcing it to `peers` as soon
    /// as it is cached. Others may be waiting for these blocks: while this node fetches them,
    /// however long that takes, it renews its right to them.
    async fn fetch_gaps(
        &self,
        blob: &BlobRef,
        run: &[Lead],
        blocks: &[u64],
        peers: Option<&Peers>,
    ) {
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            return;
        };
        let gap: Vec<&Lead> = blocks.iter().map(|&index| lead_of(run, index)).collect();
        let fetch = async {
            for stretch in adjacent(&gap) {
                let got = self.fetch_registry(blob, stretch).await;
                let landed: Vec<u64> = got.iter().map(|(index, _)| *index).collect();
                self.store(blob, got).await;
                // Shared only where peers may ask for it: blobs they can verify.
                if let Some(peers) = peers {
                    peers.landed(blob, &landed);
                }
            }
        };
        match peers {
            Some(peers) => peers.renewing(blob, first..last + 1, fetch).await,
            None => fetch.await,
        }
    }

    /// Writes fetched blocks to the cache, off the runtime's threads.
    pub(super) async fn store(&self, blob: &BlobRef, blocks: Vec<(u64, Bytes)>) {
        if blocks.is_empty() {
            return;
        }
        let fetcher = self.clone();
        let blob = blob.clone();
        let cached = tokio::task::spawn_blocking(move || {
            for (index, part) in blocks {
                match fetcher
                    .inner
                    .cache
                    .insert(&blob.digest, blob.size, index, &part)
                {
                    // A full disk is logged by the cache, once per spell.
                    Err(error) if error.is_no_space() => {}
                    Err(error) => tracing::warn!(%error, "block fetched but not cached"),
                    Ok(()) => {}
                }
            }
        })
        .await;
        if let Err(error) = cached {
            tracing::warn!(%error, "caching task failed");
        }
    }

    /// Adjacent blocks `gap` from the registry with one range request; answers their
    /// waiters and returns them (none on failure).
    async fn fetch_registry(&self, blob: &BlobRef, gap: &[&Lead]) -> Vec<(u64, Bytes)> {
        let (Some(first), Some(last)) = (gap.first(), gap.last()) else {
            return Vec::new();
        };
        let geometry = self.geometry(blob);
        let range = geometry.span(first.key().index).start..geometry.span(last.key().index).end;
        let inner = &self.inner;
        tracing::debug!(blob = %blob.digest, ?range, "fetching blocks from the registry");
        let started = std::time::Instant::now();
        let fetched = if gap.iter().all(|lead| lead.after_failure()) {
            self.registry()
                .get_blob_range_briefly(blob, range.clone(), AFTER_FAILURE_ATTEMPT)
                .await
        } else {
            self.registry().get_blob_range(blob, range.clone()).await
        };
        inner.latency.observe(Source::Registry, started.elapsed());
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(error) => {
                inner.counters.error();
                tracing::debug!(blob = %blob.digest, ?range, %error, "block fetch failed");
                let error = Arc::new(FetchError::from(error));
                for lead in gap {
                    lead.publish(Err(error.clone()));
                }
                return Vec::new();
            }
        };
        inner
            .counters
            .served(&blob.digest, Source::Registry, bytes.len() as u64);
        gap.iter()
            .map(|lead| {
                let block = geometry.span(lead.key().index);
                let part = bytes.slice(
                    (block.start - range.start) as usize..(block.end - range.start) as usize,
                );
                lead.publish(Ok(part.clone()));
                (lead.key().index, part)
            })
            .collect()
    }
}

/// The lead of block `index` of `run` (adjacent blocks, in order).
fn lead_of(run: &[Lead], index: u64) -> &Lead {
    &run[(index - run[0].key().index) as usize]
}

/// Leads (in block order) cut where a block is missing.
fn adjacent<'a>(leads: &'a [&'a Lead]) -> Vec<&'a [&'a Lead]> {
    let mut cuts = Vec::new();
    let mut start = 0;
    for at in 1..=leads.len() {
        let broken = at == leads.len() || leads[at - 1].key().index + 1 != leads[at].key().index;
        if broken {
            cuts.push(&leads[start..at]);
            start = at;
        }
    }
    cuts
}

/// Splits leads (in block order) into runs of adjacent blocks, each at most `max` long.
pub(super) fn runs(leads: Vec<Lead>, max: u64) -> Vec<Vec<Lead>> {
    let mut runs: Vec<Vec<Lead>> = Vec::new();
    for lead in leads {
        let extends = runs
            .last()
            .and_then(|run| run.last())
            .is_some_and(|last| last.key().index + 1 == lead.key().index);
        match runs.last_mut() {
            Some(run) if extends && (run.len() as u64) < max => run.push(lead),
            _ => runs.push(vec![lead]),
        }
    }
    runs
}
