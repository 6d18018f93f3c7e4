//! [`OwnerIndex`]: what an index owner knows about the blobs it owns: which node holds which
//! blocks (under a lease), and which node was told to fetch a block nobody holds yet.
//!
//! The second part keeps a herd of nodes missing the same block from all going to the
//! registry: the first asker gets [`Advice::Fetch`], the others [`Advice::Wait`] for it, and
//! once its announcement lands they are sent to it.
//!
//! Its memory is bounded (`peers.index_memory`): each blob's entry is costed (block sets,
//! holders, grants), and past the cap the blobs least recently announced or asked about are
//! forgotten first; a forgotten blob costs at most a fetch its holders could have served.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::blockset::BlockSet;
use super::member::PeerAddr;
use super::wire::Advice;
use crate::digest::Digest;

/// What an entry costs beyond its block sets, as counted against the cap: the blob's digest,
/// map slots and its place in the eviction order; each holder's record; each grant.
const BLOB_COST: usize = 192;
const HOLDER_COST: usize = 96;
const GRANT_COST: usize = 48;
/// Holders kept per blob; the stalest are forgotten first. Enough for every node of a large
/// cluster: an owner that forgets holders tells later askers that nobody holds a block many
/// nodes have, and they go to the registry. Memory stays bounded by this and by the cap
/// (a holder costs `HOLDER_COST` plus its block set: about 0.5 MiB for a blob held by 4,096
/// nodes), which forgets the stalest holders of a blob too large on its own.
const MAX_HOLDERS: usize = 4096;
/// Holders named in one answer, least loaded first: enough for a hedge and for retries on
/// others when some are busy, without an answer growing with the cluster.
pub const NAMED_HOLDERS: usize = 8;
/// How soon an asker told to wait asks again.
const RETRY: Duration = Duration::from_millis(20);
/// Hand-outs of a holder are counted over windows this long to find the least loaded.
const LOAD_WINDOW: Duration = Duration::from_secs(2);

/// Which nodes an owner leaves out of its advice.
pub struct Exclusions<'a> {
    /// Not to be named as holders: dead or penalised.
    pub holder: &'a dyn Fn(&PeerAddr) -> bool,
    /// Named after the others: busy right now. Such a holder answers shortly, and leaving it
    /// out when it is the only one would send the asker to the registry for a block the
    /// cluster has (in a herd, the first holder of every block is busy).
    pub busy: &'a dyn Fn(&PeerAddr) -> bool,
    /// Whose grant no longer holds the others back: dead or penalised. A busy node is still
    /// fetching what it was granted, and handing its blocks to another node would fetch
    /// them twice.
    pub grantee: &'a dyn Fn(&PeerAddr) -> bool,
}

pub struct OwnerIndex {
    lease: Duration,
    /// How long a node told to fetch a block keeps the exclusive right to.
    grant: Duration,
    /// Bytes the entries may cost in all.
    cap: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, BlobEntry>,
    /// Every blob by its last announcement or lookup (a counter, not a clock), oldest first.
    order: BTreeMap<u64, Digest>,
    ticks: u64,
    /// The sum of the entries' costs.
    bytes: usize,
    evictions: u64,
}

#[derive(Default)]
struct BlobEntry {
    holders: HashMap<PeerAddr, Holding>,
    grants: HashMap<u64, (PeerAddr, Instant)>,
    /// Its key in [`State::order`].
    touched: u64,
    /// What it counted for in [`State::bytes`] when last costed.
    cost: usize,
}

impl BlobEntry {
    /// Drops the holder whose announcement expires first.
    fn forget_stalest_holder(&mut self) {
        let stalest = self
            .holders
            .iter()
            .min_by_key(|(_, holding)| holding.expires)
            .map(|(addr, _)| *addr);
        if let Some(stalest) = stalest {
            self.holders.remove(&stalest);
        }
    }

    fn cost(&self) -> usize {
        let holders: usize = self
            .holders
            .values()
            .map(|holding| HOLDER_COST + holding.blocks.heap_bytes())
            .sum();
        BLOB_COST + holders + self.grants.len() * GRANT_COST
    }
}

/// The owner index's size, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexUse {
    pub blobs: u64,
    pub bytes: u64,
    /// Blobs forgotten to stay under the cap, since start.
    pub evictions: u64,
}

impl State {
    /// `blob`'s entry, created if new, moved to the newest end of the eviction order.
    fn touch(&mut self, blob: &Digest) -> &mut BlobEntry {
        self.ticks += 1;
        let tick = self.ticks;
        let entry = self.blobs.entry(blob.clone()).or_default();
        self.order.remove(&entry.touched);
        entry.touched = tick;
        self.order.insert(tick, blob.clone());
        entry
    }

    /// Costs `blob`'s entry again after a change, then forgets the least recently touched
    /// other blobs until the index fits in `cap`; a blob too large on its own keeps only its
    /// freshest holders.
    fn settle(&mut self, blob: &Digest, cap: usize) {
        if let Some(entry) = self.blobs.get_mut(blob) {
            while entry.holders.len() > 1 && entry.cost() > cap {
                entry.forget_stalest_holder();
            }
            let cost = entry.cost();
            self.bytes = self.bytes - entry.cost + cost;
            entry.cost = cost;
        }
        while self.bytes > cap {
            let Some((&tick, oldest)) = self.order.iter().find(|(_, digest)| *digest != blob)
            else {
                break;
            };
            let oldest = oldest.clone();
            self.order.remove(&tick);
            if let Some(gone) = self.blobs.remove(&oldest) {
                self.bytes -= gone.cost;
                self.evictions += 1;
            }
        }
    }
}

struct Holding {
    blocks: BlockSet,
    expires: Instant,
    handed_out: u32,
    window: Instant,
}

impl OwnerIndex {
    /// An index whose entries cost at most `cap` bytes in all.
    pub fn new(lease: Duration, grant: Duration, cap: usize) -> OwnerIndex {
        OwnerIndex {
            lease,
            grant,
            cap,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    pub fn usage(&self) -> IndexUse {
        let state = self.lock();
        IndexUse {
            blobs: state.blobs.len() as u64,
            bytes: state.bytes as u64,
            evictions: state.evictions,
        }
    }

    /// Records that `from` holds `blocks` of `blob`: added to what it announced before, or
    /// instead of it when `replace`; either way its lease starts again.
    pub fn announce(
        &self,
        now: Instant,
        from: PeerAddr,
        blob: &Digest,
        blocks: &BlockSet,
        replace: bool,
    ) {
        let mut state = self.lock();
        let entry = state.touch(blob);
        if !entry.holders.contains_key(&from) && entry.holders.len() >= MAX_HOLDERS {
            entry.forget_stalest_holder();
        }
        let holding = entry.holders.entry(from).or_insert_with(|| Holding {
            blocks: BlockSet::new(),
            expires: now,
            handed_out: 0,
            window: now,
        });
        if replace {
            holding.blocks = blocks.clone();
        } else {
            holding.blocks.merge(blocks);
        }
        holding.expires = now + self.lease;
        // A grant is done with once its holder announces the block.
        entry
            .grants
            .retain(|index, (grantee, _)| *grantee != from || !blocks.contains(*index));
        state.settle(blob, self.cap);
    }

    /// `from` is still fetching blocks `first..first+count` of `blob`: those it was told to
    /// fetch stay its own for another `grant`. Grants held by other nodes are left alone.
    pub fn renew(&self, now: Instant, from: PeerAddr, blob: &Digest, first: u64, count: u64) {
        let mut state = self.lock();
        let Some(entry) = state.blobs.get_mut(blob) else {
            return;
        };
        for index in first..first.saturating_add(count) {
            if let Some((grantee, granted)) = entry.grants.get_mut(&index) {
                if *grantee == from {
                    *granted = now;
                }
            }
        }
    }

    /// The node holding the grant on block `index` of `blob` at `now`, if one does: what the
    /// simulation checks its invariants against.
    #[cfg(any(test, feature = "sim"))]
    pub fn grantee(&self, now: Instant, blob: &Digest, index: u64) -> Option<PeerAddr> {
        let state = self.lock();
        let (grantee, granted) = state.blobs.get(blob)?.grants.get(&index)?;
        (now.duration_since(*granted) < self.grant).then_some(*grantee)
    }

    /// Advice for blocks `first..first+count` of `blob`, asked by `from` (if it knows its own
    /// address), never naming `from` or a node `excluded.holder` as a holder, and passing
    /// over the grants of nodes `excluded.grantee`.
    pub fn lookup(
        &self,
        now: Instant,
        from: Option<PeerAddr>,
        blob: &Digest,
        first: u64,
        count: u64,
        excluded: &Exclusions<'_>,
    ) -> Vec<Advice> {
        let mut state = self.lock();
        let entry = state.touch(blob);
        entry.holders.retain(|_, holding| holding.expires > now);
        let grant = self.grant;
        entry
            .grants
            .retain(|_, (_, granted)| now.duration_since(*granted) < grant);
        let mut advice = Vec::with_capacity(count as usize);
        for index in first..first.saturating_add(count) {
            let mut holders: Vec<(bool, u32, PeerAddr)> = entry
                .holders
                .iter_mut()
                .filter(|(addr, holding)| {
                    Some(**addr) != from
                        && !(excluded.holder)(addr)
                        && holding.blocks.contains(index)
                })
                .map(|(addr, holding)| {
                    if now.duration_since(holding.window) >= LOAD_WINDOW {
                        holding.handed_out = 0;
                        holding.window = now;
                    }
                    ((excluded.busy)(addr), holding.handed_out, *addr)
                })
                .collect();
            if !holders.is_empty() {
                let named = name_holders(&mut holders);
                if let Some(holding) = entry.holders.get_mut(&named[0]) {
                    holding.handed_out += 1;
                }
                advice.push(Advice::Holders {
                    holders: named.iter().map(PeerAddr::to_string).collect(),
                });
                continue;
            }
            match (entry.grants.get(&index), from) {
                (Some((grantee, _)), _)
                    if Some(*grantee) != from && !(excluded.grantee)(grantee) =>
                {
                    advice.push(Advice::Wait {
                        holder: grantee.to_string(),
                        retry_ms: RETRY.as_millis() as u64,
                    })
                }
                (_, Some(asker)) => {
                    entry.grants.insert(index, (asker, now));
                    advice.push(Advice::Fetch);
                }
                (_, None) => advice.push(Advice::Fetch),
            }
        }
        state.settle(blob, self.cap);
        advice
    }
}

/// The few of `holders` (busy, hand-outs, address) an answer names: free ones before busy
/// ones (named still: a busy holder answers shortly, and leaving out a lone one would send
/// the asker to the registry for a block the cluster has), the least handed out first.
fn name_holders(holders: &mut [(bool, u32, PeerAddr)]) -> Vec<PeerAddr> {
    // A partial selection: sorting a thousand holders per block on every lookup is what a
    // large cluster's owner cannot afford.
    let named = NAMED_HOLDERS.min(holders.len());
    if named < holders.len() {
        holders.select_nth_unstable(named - 1);
    }
    let named = &mut holders[..named];
    named.sort_unstable();
    named.iter().map(|(_, _, addr)| *addr).collect()
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
