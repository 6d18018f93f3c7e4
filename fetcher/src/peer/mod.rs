//! The peer network: nodes ask each other for blocks before they ask the registry.
//!
//! - [`Peers`] is one node's side of it: membership ([`member`], kept up by [`probe`]),
//!   rendezvous placement of each blob's index owners ([`rendezvous`]), the index this node
//!   keeps for the blobs it owns ([`index`]), announcements of what it holds ([`announce`]),
//!   and the client and listener of the HTTP/2 protocol ([`client`], [`server`], [`wire`]).
//! - Integrity: [`crate::trust`] decides. Peers are asked for bytes checked against hashes
//!   from a verified index or table (eStargz: the TOC, itself checked against the layer's
//!   annotation; overlaybd: the block digest table the manifest names), and, with mutual TLS
//!   only, for overlaybd blocks whose CRCs travel with the data, which the blob's digest checks
//!   once complete. A node shares only blocks it fetched from the registry itself, or got from
//!   a peer and has since checked every byte of ([`shareable`]); so bad bytes cannot spread,
//!   and a peer whose bytes fail verification is avoided. The expected hashes never come from
//!   the sender.
//! - Privacy: blocks of a blob whose registry wanted this node's credential go only to a
//!   peer that proves, over mutual TLS, that the registry lets it pull the blob ([`gate`]).
//! - A herd of nodes missing the same block does not all go to the registry: the index owner
//!   lets one fetch it and the rest wait ([`index`]), for as long as that node renews its
//!   right; a holder slower than peers' usual [`pace`] has a second holder asked too
//!   ([`hedge`]).
//! - The decisions of a round of asking peers and of renewing a grant are made without I/O or
//!   a clock of their own ([`plan`]); [`Peers::fetch`] and [`Peers::renewing`] drive them, and
//!   so does a deterministic simulation of whole clusters ([`sim`], for tests and the `sim`
//!   feature).

mod announce;
mod blockset;
mod client;
mod error;
mod gate;
mod hedge;
mod held;
mod index;
mod limiter;
mod member;
mod pace;
mod plan;
mod probe;
mod rendezvous;
mod server;
mod shareable;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod stats;
mod tls;
mod trace;
mod warm;
mod wire;

use std::collections::HashSet;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use parking_lot::RwLock;
use shoal_config::PeersConfig;
use tracing::{debug, info, warn};

use crate::cache::BlockKey;
use crate::digest::Digest;
use crate::reference::BlobRef;
use crate::registry::RegistryClient;
use announce::Announcer;
use blockset::{BlockSet, MAX_SHARED_BLOCKS};
use client::{PeerClient, PeerFailure};
use gate::PullGate;
pub(crate) use held::HeldBlocks;
use index::{Exclusions, OwnerIndex};
use limiter::UploadLimiter;
use member::{Membership, NodeId, Penalty};
use pace::Pace;
use plan::{AfterRound, PeerFetchPlan, Renewals, RunAnswer};
use shareable::{Audience, Shareable};
use stats::{Outcome, PeerCounters, PeerGauges};
use wire::{Advice, Lookup, Renew, MAX_LOOKUP_BLOCKS};

pub use error::PeerError;
pub use member::PeerAddr;
pub use stats::{PeerStats, PerPeer};
pub use warm::{Warm, Warmer, WARM_TIMEOUT};

/// Latency budgets a block may be waited for while another node fetches it (see
/// [`Peers::deadline`]). The owner ends a wait much sooner when that node dies or stops
/// renewing; this bounds a wait on a node that renews but never finishes.
const WAIT_BUDGETS: u32 = 10;

pub struct Peers {
    config: PeersConfig,
    block_size: u64,
    node: NodeId,
    members: Membership,
    /// How many members were live when the probes last changed the live set and the
    /// announcer was told to renew: what this node acts on, as status reports it.
    members_live: std::sync::atomic::AtomicU64,
    index: OwnerIndex,
    client: PeerClient,
    limiter: UploadLimiter,
    announcer: Announcer,
    /// Blocks this node fetched from the registry or verified: the only ones it shares.
    shareable: Shareable,
    counters: PeerCounters,
    /// The pace peers have sent at, for when to hedge a request.
    pace: Pace,
    /// Which blobs are private, proofs of pull access sent and checked.
    gate: PullGate,
    /// What takes a whole blob when a peer asks (`POST /v1/warm`): the fetcher, once started.
    warmer: RwLock<Option<Arc<dyn Warmer>>>,
    /// Bounds the blobs taken at once for peers.
    warming: tokio::sync::Semaphore,
}

impl Peers {
    /// The peer side of a node whose cache has blocks of `block_size`; what it may share is
    /// kept in `state` across restarts. `registry` is the client in force, through which
    /// private repositories are recognised and peers' proofs of access checked.
    pub fn new(
        config: &PeersConfig,
        block_size: u64,
        state: Option<PathBuf>,
        registry: Arc<RwLock<RegistryClient>>,
    ) -> Result<Peers, PeerError> {
        Ok(Peers {
            block_size,
            node: NodeId::random(),
            members: Membership::default(),
            members_live: std::sync::atomic::AtomicU64::new(0),
            // A node told to fetch a block has the budget to bring it before others stop
            // waiting for it.
            index: OwnerIndex::new(
                config.lease,
                config.latency_budget,
                usize::try_from(config.index_memory.0).unwrap_or(usize::MAX),
            ),
            client: PeerClient::new(config)?,
            limiter: UploadLimiter::new(config.upload_rate.0, config.max_uploads),
            announcer: Announcer::default(),
            shareable: Shareable::open(state),
            counters: PeerCounters::default(),
            pace: Pace::default(),
            gate: PullGate::new(registry),
            warmer: RwLock::new(None),
            warming: tokio::sync::Semaphore::new(warm::MAX_WARMING),
            config: config.clone(),
        })
    }

    pub fn stats(&self) -> PeerStats {
        let index = self.index.usage();
        PeerStats {
            insecure: self.config.insecure,
            index_blobs: index.blobs,
            index_bytes: index.bytes,
            index_evictions: index.evictions,
            shareable_unsaved: self.shareable.is_unsaved(),
            ..self.counters.snapshot(PeerGauges {
                members_known: self.members.known().len() as u64,
                members_live: self.members_live.load(std::sync::atomic::Ordering::Relaxed),
                announcing: self.announcer.is_busy(),
                uploads_in_flight: self.limiter.in_flight() as u64,
            })
        }
    }

    /// This node's own peer address, once a probe has found it among the members.
    pub fn me(&self) -> Option<PeerAddr> {
        self.members.me()
    }

    /// When blocks asked of peers now must be fetched from the registry at the latest: a few
    /// latency budgets, for a block another node is fetching may be waited for that long
    /// while its owner says the fetch is still under way (see [`renewing`](Self::renewing)).
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.latency_budget * WAIT_BUDGETS
    }

    /// One round of asking peers for `blocks` (ascending) of `blob`, until `deadline`: it
    /// ends as soon as some blocks must come from the registry (this node was told to fetch
    /// them, or no holder could send them), so that the caller fetches and announces those
    /// while others may be waiting for them, then asks again about the rest.
    ///
    /// A block another node is fetching is waited for as long as the index owner says so:
    /// the owner keeps that node's exclusive right only while it renews it, so a node that
    /// died or gave up frees its blocks within one budget, and a node that is merely slow
    /// (a starved CPU, a congested link) keeps the herd off the registry.
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
        let mut plan = PeerFetchPlan::new(blocks, self.config.latency_budget);
        while let Some(asking) = plan.asking() {
            if Instant::now() >= deadline {
                break;
            }
            let Some((owner, advice)) = self.lookup(blob, asking.clone(), deadline).await else {
                break;
            };
            debug!(blob = %blob.digest, first = asking.start, ?owner, ?advice, "index advice");
            let step = plan.advise(
                Instant::now(),
                asking.start,
                &advice,
                self.members.me(),
                &self.members,
            );
            PeerCounters::add(&self.counters.fallbacks, step.fallbacks);
            let requests = step.runs.iter().map(|run| async move {
                let outcome = self.get_hedged(blob, run, deadline).await;
                (run, outcome)
            });
            let mut misled = false;
            for (run, outcome) in join_all(requests).await {
                misled |= outcome.missing > 0;
                let answer = RunAnswer {
                    got: outcome.got.as_ref().map(|(holder, _)| *holder),
                    failed: outcome.failed,
                    busy: !outcome.busy.is_empty(),
                };
                plan.answered(&step, run, &answer);
                let Some((holder, bytes)) = outcome.got else {
                    continue;
                };
                let from = self.block_bytes(blob, run.blocks.start).start;
                // Decided now: a block got with a proof stays private, whatever happens
                // to this node's registry client before it is verified.
                let audience = self.gate.audience(&blob.image);
                for index in run.blocks.clone() {
                    let at = self.block_bytes(blob, index);
                    let part = bytes.slice((at.start - from) as usize..(at.end - from) as usize);
                    self.shareable.got_from_peer(
                        BlockKey::new(blob.digest.clone(), index),
                        holder,
                        audience.clone(),
                    );
                    round.got.push((index, part));
                }
            }
            if let (true, Some(owner)) = (misled, owner) {
                if self.members.strike(owner, Instant::now()) {
                    warn!(%owner, %blob.digest, "index owner keeps naming holders without the blocks; avoiding it");
                    PeerCounters::add(&self.counters.owners_avoided, 1);
                }
            }
            match plan.after(&step) {
                AfterRound::Registry => {
                    // Others may be waiting for these: fetch them first, ask again after.
                    (round.fetch, round.waiting) = plan.registry_first();
                    return round;
                }
                AfterRound::Ask => {}
                AfterRound::Pause(pause) => {
                    let until = (Instant::now() + pause).min(deadline);
                    tokio::time::sleep_until(until.into()).await;
                }
                AfterRound::Stop => break,
            }
        }
        let (fetch, fallbacks) = plan.give_up();
        PeerCounters::add(&self.counters.fallbacks, fallbacks);
        round.fetch = fetch;
        round
    }

    /// Runs `work` (this node fetching `blocks` of `blob` from the registry after the owner
    /// told it to) while renewing its right to them at the owner, so that nodes waiting for
    /// them keep waiting however long the fetch takes; renewals stop with `work`, or when no
    /// owner takes them.
    pub(crate) async fn renewing<F: Future>(
        &self,
        blob: &BlobRef,
        blocks: Range<u64>,
        work: F,
    ) -> F::Output {
        // Each renewal may take as long as the grant has left, so a slow owner still counts.
        let renewals = async {
            let mut renewals = Renewals::new(self.config.latency_budget, Instant::now());
            loop {
                tokio::time::sleep(renewals.every()).await;
                let Some(left) = renewals.left(Instant::now()) else {
                    return;
                };
                if self.renew(blob, blocks.clone(), left).await {
                    renewals.taken(Instant::now());
                }
            }
        };
        tokio::pin!(work);
        tokio::pin!(renewals);
        tokio::select! {
            biased;
            output = &mut work => return output,
            () = &mut renewals => {}
        }
        work.await
    }

    /// Renews this node's grants on `blocks` at the first owner that takes the renewal.
    async fn renew(&self, blob: &BlobRef, blocks: Range<u64>, timeout: Duration) -> bool {
        let Some(me) = self.members.me() else {
            return false;
        };
        let now = Instant::now();
        let count = blocks.end - blocks.start;
        for owner in rendezvous::owners(&blob.digest, &self.members.live(now), self.config.owners) {
            if owner == me {
                self.index.renew(now, me, &blob.digest, blocks.start, count);
                return true;
            }
            let renew = Renew {
                from: me.to_string(),
                blob: blob.digest.to_string(),
                block_size: self.block_size,
                first: blocks.start,
                count,
            };
            match self.client.renew(owner, &renew, timeout).await {
                Ok(()) => {
                    PeerCounters::add(&self.counters.renewals, 1);
                    return true;
                }
                Err(failure) => debug!(%owner, %failure, "grant renewal failed"),
            }
        }
        false
    }

    /// Asks the blob's owners (this node's own index when it is one), in rendezvous order,
    /// until one answers; the advice and the remote owner that gave it (`None` for this
    /// node's own index), or `None` when no owner answers.
    async fn lookup(
        &self,
        blob: &BlobRef,
        blocks: Range<u64>,
        deadline: Instant,
    ) -> Option<(Option<PeerAddr>, Vec<Advice>)> {
        let now = Instant::now();
        let live = self.members.live(now);
        let me = self.members.me();
        let count = blocks.end - blocks.start;
        for owner in rendezvous::owners(&blob.digest, &live, self.config.owners) {
            PeerCounters::add(&self.counters.lookups, 1);
            if Some(owner) == me {
                let excluded = Exclusions {
                    holder: &|holder| self.members.is_out(holder, now),
                    busy: &|holder| self.members.is_busy(holder, now),
                    grantee: &|grantee| self.members.is_out(grantee, now),
                };
                let advice =
                    self.index
                        .lookup(now, me, &blob.digest, blocks.start, count, &excluded);
                return Some((None, advice));
            }
            let lookup = Lookup {
                from: me.map(|me| me.to_string()),
                blob: blob.digest.to_string(),
                block_size: self.block_size,
                first: blocks.start,
                count,
            };
            // Half a budget: a loaded owner is waited for, and a dead one (which the probes
            // drop soon anyway) still leaves time for the second owner.
            let timeout = (self.config.latency_budget / 2)
                .min(deadline.saturating_duration_since(now) / 2)
                .max(Duration::from_millis(50));
            match self.client.lookup(owner, &lookup, timeout).await {
                Ok(reply) if reply.blocks.len() as u64 == count => {
                    return Some((Some(owner), reply.blocks))
                }
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

    /// Blocks of `blob` that just landed from the registry: shareable (to peers that may
    /// pull it, when the registry wanted this node's credential), and announced.
    pub(crate) fn landed(&self, blob: &BlobRef, blocks: &[u64]) {
        let mut fresh = BlockSet::new();
        for &index in blocks {
            fresh.insert(index);
        }
        if fresh.is_empty() {
            return;
        }
        let audience = self.gate.audience(&blob.image);
        self.shareable.add(&blob.digest, &fresh, audience);
        self.announcer.landed(&blob.digest, &fresh);
    }

    /// Bytes `range` of `blob` passed the reader's check against hashes from a verified
    /// index: blocks from peers that every byte of has now checked become shareable.
    pub(crate) fn verified(&self, blob: &BlobRef, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut fresh = BlockSet::new();
        let mut arrived_private = None;
        for index in range.start / self.block_size..(range.end - 1) / self.block_size + 1 {
            let key = BlockKey::new(blob.digest.clone(), index);
            let checked =
                self.shareable
                    .checked(&key, self.block_bytes(blob, index), range.clone());
            if let Some(arrived) = checked {
                if let Audience::PullersFrom(_) = arrived {
                    arrived_private = Some(arrived);
                }
                fresh.insert(index);
                PeerCounters::add(&self.counters.blocks_reshared, 1);
            }
        }
        if !fresh.is_empty() {
            // Private if the blocks arrived so, or if this node reads the blob with a
            // credential now.
            let audience = arrived_private.unwrap_or_else(|| self.gate.audience(&blob.image));
            self.shareable.add(&blob.digest, &fresh, audience);
            self.announcer.landed(&blob.digest, &fresh);
        }
    }

    /// Blocks `blocks` of `blob` failed verification and are fetched again: they stop being
    /// shared, and a peer that sent any of them is blamed and avoided.
    pub(crate) fn rejected(&self, blob: &Digest, blocks: Range<u64>) {
        for peer in self.shareable.reject(blob, blocks) {
            warn!(%peer, %blob, "bytes from a peer failed verification; avoiding it");
            self.counters.record(peer, Outcome::BadData);
            self.members
                .penalise(peer, Penalty::BadData, Instant::now());
        }
    }

    /// `blob` failed its digest: every block of `blocks` a peer sent stops being shared and
    /// its sender is blamed (however few of them lied: the digest cannot say which). The
    /// blocks a peer sent, to be dropped.
    pub(crate) fn rejected_all(&self, blob: &Digest, blocks: Range<u64>) -> Vec<u64> {
        let sent = self.shareable.reject_sent(blob, blocks);
        let senders: HashSet<PeerAddr> = sent.iter().map(|(_, peer)| *peer).collect();
        for peer in senders {
            warn!(%peer, %blob, "a blob with blocks from a peer failed its digest; avoiding it");
            self.counters.record(peer, Outcome::BadData);
            self.members
                .penalise(peer, Penalty::BadData, Instant::now());
        }
        sent.into_iter().map(|(index, _)| index).collect()
    }

    /// Whether every peer proved itself a member: mutual TLS with the cluster's CA.
    pub fn authenticated(&self) -> bool {
        self.config.tls.is_some()
    }

    fn block_bytes(&self, blob: &BlobRef, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.block_size).min(blob.size);
        start..start.saturating_add(self.block_size).min(blob.size)
    }
}

/// The peer network's background tasks (the listener, membership probes, announcements):
/// aborted when dropped, so they end with whatever started them.
#[derive(Debug)]
pub(crate) struct PeerTasks(Vec<tokio::task::AbortHandle>);

impl Drop for PeerTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Binds the peer listener and starts membership upkeep, announcements and the listener on
/// the current runtime, serving blocks from `held` and traces from `traces`. Returns the bound
/// address and the tasks, which run until it is dropped.
pub(crate) async fn start(
    peers: Arc<Peers>,
    held: Arc<dyn HeldBlocks>,
    traces: Arc<crate::traces::TraceStore>,
) -> Result<(std::net::SocketAddr, PeerTasks), PeerError> {
    let tls = peers.config.tls.as_ref().map(tls::acceptor).transpose()?;
    let listen = peers.config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| PeerError::BindPeerListener {
            address: listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| PeerError::BindPeerListener {
            address: listen,
            source,
        })?;
    info!(address = %bound, tls = tls.is_some(), node = %peers.node.0, "serving peers");
    if peers.config.insecure {
        warn!(
            address = %bound,
            "INSECURE: the peer listener speaks plain HTTP on a non-loopback address \
             (peers.insecure = true): it serves cached layer bytes to any request from a \
             member's address, including any local user of a member node; set peers.tls"
        );
    }
    let tasks = PeerTasks(vec![
        tokio::spawn(server::serve(
            listener,
            tls,
            peers.clone(),
            held.clone(),
            traces,
        ))
        .abort_handle(),
        tokio::spawn(probe::run(peers.clone())).abort_handle(),
        tokio::spawn(announce::run(peers, held)).abort_handle(),
    ]);
    Ok((bound, tasks))
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
