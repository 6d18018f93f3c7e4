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
mod tests {
    use super::*;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr(format!("10.0.0.{i}:7420").parse().unwrap())
    }

    fn blocks(indices: &[u64]) -> BlockSet {
        let mut set = BlockSet::new();
        for &i in indices {
            set.insert(i);
        }
        set
    }

    const NONE: Exclusions<'static> = Exclusions {
        holder: &|_| false,
        busy: &|_| false,
        grantee: &|_| false,
    };

    #[test]
    fn first_asker_fetches_and_the_herd_waits_then_follows() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        assert_eq!(
            index.lookup(t0, Some(addr(1)), &blob, 0, 1, &NONE),
            [Advice::Fetch]
        );
        for asker in 2..5 {
            assert_eq!(
                index.lookup(t0, Some(addr(asker)), &blob, 0, 1, &NONE),
                [Advice::Wait {
                    holder: addr(1).to_string(),
                    retry_ms: 20
                }]
            );
        }
        index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
        assert_eq!(
            index.lookup(t0, Some(addr(2)), &blob, 0, 1, &NONE),
            [Advice::Holders {
                holders: vec![addr(1).to_string()]
            }]
        );
    }

    #[test]
    fn an_expired_grant_passes_to_the_next_asker() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.lookup(t0, Some(addr(1)), &blob, 0, 1, &NONE);
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            index.lookup(later, Some(addr(2)), &blob, 0, 1, &NONE),
            [Advice::Fetch]
        );
        // A grantee that is known dead does not hold the others back either.
        let dead = |a: &PeerAddr| *a == addr(2);
        let without_dead = Exclusions {
            holder: &dead,
            busy: &|_| false,
            grantee: &dead,
        };
        assert_eq!(
            index.lookup(later, Some(addr(3)), &blob, 0, 1, &without_dead),
            [Advice::Fetch]
        );
    }

    #[test]
    fn a_grantee_still_fetching_keeps_its_grant_and_nobody_else_can_extend_it() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.lookup(t0, Some(addr(1)), &blob, 0, 2, &NONE);
        // The grantee renews block 0 only; a waiter's renewal of block 1 counts for nothing.
        let t1 = t0 + Duration::from_millis(1500);
        index.renew(t1, addr(1), &blob, 0, 1);
        index.renew(t1, addr(2), &blob, 1, 1);
        let t2 = t0 + Duration::from_millis(2500);
        let wait = Advice::Wait {
            holder: addr(1).to_string(),
            retry_ms: 20,
        };
        assert_eq!(
            index.lookup(t2, Some(addr(3)), &blob, 0, 2, &NONE),
            [wait, Advice::Fetch]
        );
        // Renewing a blob the owner never heard of is harmless.
        index.renew(t2, addr(1), &Digest::of(b"other"), 0, 4);
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let index = OwnerIndex::new(Duration::from_secs(10), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.announce(t0, addr(1), &blob, &blocks(&[0, 1]), false);
        index.announce(t0, addr(2), &blob, &blocks(&[1]), false);
        let t1 = t0 + Duration::from_secs(8);
        index.announce(t1, addr(2), &blob, &blocks(&[1]), true);
        let t2 = t0 + Duration::from_secs(11);
        let advice = index.lookup(t2, Some(addr(3)), &blob, 0, 2, &NONE);
        assert_eq!(advice[0], Advice::Fetch, "addr 1's lease expired");
        assert_eq!(
            advice[1],
            Advice::Holders {
                holders: vec![addr(2).to_string()]
            }
        );
    }

    #[test]
    fn announcements_merge_or_replace() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
        index.announce(t0, addr(1), &blob, &blocks(&[2]), false);
        let held = |index: &OwnerIndex| {
            index
                .lookup(t0, Some(addr(9)), &blob, 0, 3, &NONE)
                .iter()
                .map(|a| matches!(a, Advice::Holders { .. }))
                .collect::<Vec<_>>()
        };
        assert_eq!(held(&index), [true, false, true]);
        index.announce(t0, addr(1), &blob, &blocks(&[1]), true);
        assert_eq!(held(&index), [false, true, false]);
    }

    #[test]
    fn least_loaded_holder_comes_first_and_the_asker_is_never_named() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
        index.announce(t0, addr(2), &blob, &blocks(&[0]), false);
        let first = |asker| match &index.lookup(t0, Some(addr(asker)), &blob, 0, 1, &NONE)[0] {
            Advice::Holders { holders } => holders.clone(),
            other => panic!("{other:?}"),
        };
        let a = first(5);
        let b = first(6);
        assert_ne!(a[0], b[0], "hand-outs alternate between equal holders");
        assert_eq!(first(1), [addr(2).to_string()]);
    }

    #[test]
    fn busy_holders_are_named_last_and_a_lone_busy_holder_still_is() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        index.announce(t0, addr(1), &blob, &blocks(&[0, 1]), false);
        index.announce(t0, addr(2), &blob, &blocks(&[0]), false);
        let busy = |a: &PeerAddr| *a == addr(1);
        let excluded = Exclusions {
            holder: &|_| false,
            busy: &busy,
            grantee: &|_| false,
        };
        let holders = |advice: &Advice| match advice {
            Advice::Holders { holders } => holders.clone(),
            other => panic!("{other:?}"),
        };
        for _ in 0..3 {
            let advice = index.lookup(t0, Some(addr(9)), &blob, 0, 2, &excluded);
            assert_eq!(
                holders(&advice[0]),
                [addr(2).to_string(), addr(1).to_string()]
            );
            // Not a second registry fetch of a block the cluster has.
            assert_eq!(holders(&advice[1]), [addr(1).to_string()]);
        }
    }

    /// The `n`th of many nodes.
    fn node(n: u32) -> PeerAddr {
        let [_, b, c, d] = (n + 1).to_be_bytes();
        PeerAddr(std::net::SocketAddr::from(([10, b, c, d], 7420)))
    }

    #[test]
    fn a_thousand_holders_are_remembered_and_an_answer_names_a_few_spread_over_them() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 64 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        // The first holder alone has block 1; a thousand announce block 0 after it.
        index.announce(t0, node(0), &blob, &blocks(&[0, 1]), false);
        for n in 1..1000 {
            let at = t0 + Duration::from_micros(u64::from(n));
            index.announce(at, node(n), &blob, &blocks(&[0]), false);
        }
        let t1 = t0 + Duration::from_millis(10);
        let names = |advice: &Advice| match advice {
            Advice::Holders { holders } => holders.clone(),
            other => panic!("{other:?}"),
        };
        let advice = index.lookup(t1, Some(node(5000)), &blob, 0, 2, &NONE);
        assert_eq!(names(&advice[0]).len(), NAMED_HOLDERS);
        assert_eq!(
            names(&advice[1]),
            [node(0).to_string()],
            "the stalest of a thousand holders is not forgotten"
        );
        // Hand-outs go to the least handed out first: a herd of askers is spread.
        let mut first = std::collections::HashSet::new();
        for asker in 0..500 {
            let advice = index.lookup(t1, Some(node(2000 + asker)), &blob, 0, 1, &NONE);
            let named = names(&advice[0]);
            assert_eq!(named.len(), NAMED_HOLDERS);
            first.insert(named[0].clone());
        }
        assert_eq!(
            first.len(),
            500,
            "no holder handed out twice before all once"
        );
    }

    #[test]
    fn busy_holders_are_named_after_free_ones_among_many() {
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 64 << 20);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        for n in 0..100 {
            index.announce(t0, node(n), &blob, &blocks(&[0]), false);
        }
        // All but three are busy: those three come first.
        let busy = |a: &PeerAddr| ![node(7), node(42), node(99)].contains(a);
        let excluded = Exclusions {
            holder: &|_| false,
            busy: &busy,
            grantee: &|_| false,
        };
        match &index.lookup(t0, Some(node(500)), &blob, 0, 1, &excluded)[0] {
            Advice::Holders { holders } => {
                let mut free = holders[..3].to_vec();
                free.sort();
                let mut want = [node(7), node(42), node(99)]
                    .map(|a| a.to_string())
                    .to_vec();
                want.sort();
                assert_eq!((free, holders.len()), (want, NAMED_HOLDERS));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A block set of `blocks` blocks, all held, as a flood of announcements would send.
    fn full(blocks: u64) -> BlockSet {
        BlockSet::from_hex(&"f".repeat((blocks / 4) as usize)).unwrap()
    }

    #[test]
    fn the_index_stays_under_its_cap_by_forgetting_the_least_recently_touched_blobs() {
        let cap = 1 << 20;
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
        let t0 = Instant::now();
        // 100 blobs with 128 KiB block sets each: 12.5 MiB announced into a 1 MiB index.
        let big = full(1 << 20);
        let kept = Digest::of(b"kept");
        index.announce(t0, addr(1), &kept, &blocks(&[0]), false);
        for n in 0..100u32 {
            index.announce(t0, addr(2), &Digest::of(&n.to_le_bytes()), &big, false);
            // A blob asked about all along stays in.
            index.lookup(t0, Some(addr(3)), &kept, 0, 1, &NONE);
            let usage = index.usage();
            assert!(usage.bytes <= cap as u64, "{usage:?} after {n}");
        }
        let usage = index.usage();
        assert!(usage.blobs < 10 && usage.evictions > 90, "{usage:?}");
        assert_eq!(usage.blobs + usage.evictions, 101);
        let newest = Digest::of(&99u32.to_le_bytes());
        let held = |blob: &Digest| {
            matches!(
                index.lookup(t0, Some(addr(4)), blob, 0, 1, &NONE)[0],
                Advice::Holders { .. }
            )
        };
        assert!(held(&newest) && held(&kept));
        assert!(
            !held(&Digest::of(&0u32.to_le_bytes())),
            "the oldest was forgotten"
        );
    }

    #[test]
    fn one_blob_larger_than_the_cap_keeps_only_its_freshest_holders() {
        let cap = 1 << 20;
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
        let blob = Digest::of(b"blob");
        let t0 = Instant::now();
        for i in 1..=20u8 {
            let at = t0 + Duration::from_millis(u64::from(i));
            index.announce(at, addr(i), &blob, &full(1 << 20), false);
        }
        let usage = index.usage();
        assert!(usage.bytes <= cap as u64 && usage.blobs == 1, "{usage:?}");
        match &index.lookup(t0, Some(addr(99)), &blob, 0, 1, &NONE)[0] {
            Advice::Holders { holders } => {
                assert!(holders.contains(&addr(20).to_string()) && holders.len() < 10)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lookups_of_blobs_nobody_holds_are_costed_too() {
        let cap = 1 << 20;
        let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
        let t0 = Instant::now();
        for n in 0..1000u32 {
            index.lookup(
                t0,
                Some(addr(1)),
                &Digest::of(&n.to_le_bytes()),
                0,
                1024,
                &NONE,
            );
        }
        let usage = index.usage();
        assert!(
            usage.bytes <= cap as u64 && usage.evictions > 0,
            "{usage:?}"
        );
    }
}
