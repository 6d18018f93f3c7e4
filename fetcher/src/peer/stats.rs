//! Counters of the peer network: what this node got from its peers and how, and what it
//! gave them.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::member::PeerAddr;

/// A snapshot of the peer counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// Members named by the configuration, and those answering their probe.
    pub members_known: u64,
    pub members_live: u64,
    /// Whether blocks that landed, or a full renewal after the owners changed, are still to
    /// be announced (or being announced): while true, owners may not yet name this node.
    pub announcing: bool,
    /// Whether what this node shares changed since it was last saved (or is being saved): a
    /// restart now would forget some of it.
    #[serde(default)]
    pub shareable_unsaved: bool,
    /// Index lookups answered (by a remote owner or this node as owner), and failed.
    pub lookups: u64,
    pub lookup_failures: u64,
    /// Lookups this node answered as an index owner for its peers.
    pub lookups_answered: u64,
    /// Blocks that waited on peers and then went to the registry (budget spent or no holder
    /// could serve them).
    pub fallbacks: u64,
    /// "busy" answers received from peers.
    pub busy_answers: u64,
    /// Requests sent to a second holder because the first was slow.
    pub hedges: u64,
    /// Renewals of this node's right to fetch blocks others wait for, taken by an owner.
    pub renewals: u64,
    /// Blocks received from peers that every byte of checked out, so this node shares them.
    pub blocks_reshared: u64,
    /// Index owners avoided for naming holders that did not hold the blocks.
    pub owners_avoided: u64,
    /// Blocks received from a peer that then failed verification.
    pub verify_failures: u64,
    /// Block bytes this node served to peers, and requests it turned away as busy.
    pub bytes_uploaded: u64,
    pub uploads_refused: u64,
    /// Block uploads to peers under way now.
    pub uploads_in_flight: u64,
    /// Requests refused with 403: from a non-member's address (without TLS), or naming a
    /// non-member as announcer or asker.
    #[serde(default)]
    pub requests_refused: u64,
    /// Requests for blocks of a private repository refused (403): not over mutual TLS,
    /// without a proof of pull access, or with one the registry did not accept.
    #[serde(default)]
    pub private_refused: u64,
    /// Proofs of pull access checked with the registry (one HEAD each).
    #[serde(default)]
    pub pull_checks: u64,
    /// The listener is plain HTTP on a non-loopback address (`peers.insecure`).
    #[serde(default)]
    pub insecure: bool,
    /// The owner index: blobs and bytes it holds now, blobs forgotten to stay under its cap.
    #[serde(default)]
    pub index_blobs: u64,
    #[serde(default)]
    pub index_bytes: u64,
    #[serde(default)]
    pub index_evictions: u64,
    pub per_peer: BTreeMap<String, PerPeer>,
}

/// What the peer network is doing at the moment of a [`PeerStats`] snapshot, beside the
/// counters since start.
pub(crate) struct PeerGauges {
    pub members_known: u64,
    pub members_live: u64,
    pub announcing: bool,
    pub uploads_in_flight: u64,
}

/// What one peer did for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PerPeer {
    pub bytes: u64,
    pub requests: u64,
    pub errors: u64,
    pub busy: u64,
    pub verify_failures: u64,
    /// Sum of request latencies (to the whole body), for a mean.
    pub latency_micros: u64,
}

#[derive(Default)]
pub(crate) struct PeerCounters {
    pub lookups: AtomicU64,
    pub lookup_failures: AtomicU64,
    pub lookups_answered: AtomicU64,
    pub fallbacks: AtomicU64,
    pub busy_answers: AtomicU64,
    pub hedges: AtomicU64,
    pub renewals: AtomicU64,
    pub blocks_reshared: AtomicU64,
    pub owners_avoided: AtomicU64,
    pub verify_failures: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub uploads_refused: AtomicU64,
    pub requests_refused: AtomicU64,
    pub private_refused: AtomicU64,
    pub pull_checks: AtomicU64,
    per_peer: Mutex<BTreeMap<PeerAddr, PerPeer>>,
}

/// How one block request to a peer ended.
pub(crate) enum Outcome {
    Served { bytes: u64, took: Duration },
    Busy,
    Failed,
    BadData,
}

impl PeerCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn record(&self, peer: PeerAddr, outcome: Outcome) {
        let mut per_peer = self.per_peer.lock();
        let entry = per_peer.entry(peer).or_default();
        match outcome {
            Outcome::Served { bytes, took } => {
                entry.bytes += bytes;
                entry.requests += 1;
                entry.latency_micros += took.as_micros() as u64;
            }
            Outcome::Busy => {
                entry.busy += 1;
                Self::add(&self.busy_answers, 1);
            }
            Outcome::Failed => entry.errors += 1,
            Outcome::BadData => {
                entry.verify_failures += 1;
                Self::add(&self.verify_failures, 1);
            }
        }
    }

    pub fn snapshot(&self, gauges: PeerGauges) -> PeerStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PeerStats {
            members_known: gauges.members_known,
            members_live: gauges.members_live,
            announcing: gauges.announcing,
            uploads_in_flight: gauges.uploads_in_flight,
            lookups: load(&self.lookups),
            lookup_failures: load(&self.lookup_failures),
            lookups_answered: load(&self.lookups_answered),
            fallbacks: load(&self.fallbacks),
            busy_answers: load(&self.busy_answers),
            hedges: load(&self.hedges),
            renewals: load(&self.renewals),
            blocks_reshared: load(&self.blocks_reshared),
            owners_avoided: load(&self.owners_avoided),
            verify_failures: load(&self.verify_failures),
            bytes_uploaded: load(&self.bytes_uploaded),
            uploads_refused: load(&self.uploads_refused),
            requests_refused: load(&self.requests_refused),
            private_refused: load(&self.private_refused),
            pull_checks: load(&self.pull_checks),
            insecure: false,
            index_blobs: 0,
            index_bytes: 0,
            index_evictions: 0,
            shareable_unsaved: false,
            per_peer: self
                .per_peer
                .lock()
                .iter()
                .map(|(addr, stats)| (addr.to_string(), stats.clone()))
                .collect(),
        }
    }
}
