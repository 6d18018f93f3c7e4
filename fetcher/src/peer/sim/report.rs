//! What a simulation measured, and the invariants it checks.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::time::Duration;

use super::super::WAIT_BUDGETS;
use super::cluster::Cluster;

/// Counters kept while a simulation runs.
pub(super) struct Metrics {
    pub events: u64,
    pub lookups: u64,
    pub renewals: u64,
    pub waits: u64,
    pub fallbacks: u64,
    pub hedges: u64,
    pub hedge_losers: u64,
    pub busy: u64,
    pub timeouts: u64,
    pub busy_expired: u64,
    /// Blocks a node got a second time.
    pub duplicates: u64,
    pub late_rounds: u64,
    registry_bytes: u64,
    /// Registry fetches of each block (by layer), and the nodes fetching it now.
    registry_fetches: Vec<Vec<u32>>,
    registry_open: Vec<Vec<Vec<usize>>>,
    /// Registry fetches that started while another node's fetch of the block was under way.
    overlaps: u64,
    peer_received: Vec<u64>,
    peer_sent: Vec<u64>,
    owner_requests: Vec<u64>,
    owner_per_second: HashMap<(usize, u64), u64>,
    /// The longest a read asked peers before it went to the registry.
    longest_peer_phase: Duration,
    /// The longest a request waited for an owner's CPU.
    owner_wait: Duration,
    reads: u64,
    longest_read: Duration,
}

impl Metrics {
    pub fn new(nodes: usize, layers: &[u64]) -> Metrics {
        Metrics {
            events: 0,
            lookups: 0,
            renewals: 0,
            waits: 0,
            fallbacks: 0,
            hedges: 0,
            hedge_losers: 0,
            busy: 0,
            timeouts: 0,
            busy_expired: 0,
            duplicates: 0,
            late_rounds: 0,
            registry_bytes: 0,
            registry_fetches: layers.iter().map(|&b| vec![0; b as usize]).collect(),
            registry_open: layers
                .iter()
                .map(|&b| vec![Vec::new(); b as usize])
                .collect(),
            overlaps: 0,
            peer_received: vec![0; nodes],
            peer_sent: vec![0; nodes],
            owner_requests: vec![0; nodes],
            owner_per_second: HashMap::new(),
            longest_peer_phase: Duration::ZERO,
            owner_wait: Duration::ZERO,
            reads: 0,
            longest_read: Duration::ZERO,
        }
    }

    pub fn owner_request(&mut self, owner: usize, now: Duration) {
        self.owner_requests[owner] += 1;
        *self
            .owner_per_second
            .entry((owner, now.as_secs()))
            .or_default() += 1;
    }

    pub fn peer_sent(&mut self, from: usize, _to: usize, bytes: u64) {
        self.peer_sent[from] += bytes;
    }

    pub fn peer_got(&mut self, to: usize, bytes: u64) {
        self.peer_received[to] += bytes;
    }

    /// Node `node` starts fetching `blocks` of `layer` from the registry; `granted` says
    /// whether some owner holds a grant on a block for a node fetching it now.
    pub fn registry_started(
        &mut self,
        node: usize,
        layer: usize,
        blocks: Range<u64>,
        bytes: u64,
        granted: impl Fn(u64, usize) -> bool,
    ) {
        self.registry_bytes += bytes;
        for index in blocks {
            let open = &mut self.registry_open[layer][index as usize];
            if open.iter().any(|&other| granted(index, other)) {
                self.overlaps += 1;
            }
            open.push(node);
            self.registry_fetches[layer][index as usize] += 1;
        }
    }

    pub fn registry_landed(&mut self, node: usize, layer: usize, blocks: Range<u64>) {
        for index in blocks {
            let open = &mut self.registry_open[layer][index as usize];
            if let Some(at) = open.iter().position(|&n| n == node) {
                open.swap_remove(at);
            }
        }
    }

    pub fn owner_queue(&mut self, waited: Duration) {
        self.owner_wait = self.owner_wait.max(waited);
    }

    pub fn peer_phase(&mut self, took: Duration) {
        self.longest_peer_phase = self.longest_peer_phase.max(took);
    }

    pub fn read_done(&mut self, took: Duration) {
        self.reads += 1;
        self.longest_read = self.longest_read.max(took);
    }
}

/// The invariants a run must keep; [`Invariants::violations`] names those it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invariants {
    /// Registry fetches of a block that started while another node's (granted, renewed)
    /// fetch of it was under way.
    pub overlapping_registry_fetches: u64,
    /// The longest a read asked peers before going to the registry, and the bound: the
    /// fetch's deadline (`WAIT_BUDGETS` budgets) plus the half budget a lookup may take.
    pub longest_peer_phase: Duration,
    pub peer_phase_bound: Duration,
    /// Nodes that ended without every block of the working set, and blocks got twice.
    pub nodes_short: usize,
    pub duplicate_blocks: u64,
}

impl Invariants {
    pub fn violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if self.overlapping_registry_fetches > 0 {
            broken.push(format!(
                "{} registry fetches of a block while another node's grant held",
                self.overlapping_registry_fetches
            ));
        }
        if self.longest_peer_phase > self.peer_phase_bound {
            broken.push(format!(
                "a read waited on peers for {:?}, past {:?}",
                self.longest_peer_phase, self.peer_phase_bound
            ));
        }
        if self.nodes_short > 0 {
            broken.push(format!(
                "{} nodes without the working set",
                self.nodes_short
            ));
        }
        if self.duplicate_blocks > 0 {
            broken.push(format!(
                "{} blocks got twice by one node",
                self.duplicate_blocks
            ));
        }
        broken
    }
}

/// One simulation's results.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub nodes: usize,
    pub seed: u64,
    /// Bytes one node reads.
    pub need: u64,
    pub registry_bytes: u64,
    /// Blocks fetched from the registry more than once (over the whole run).
    pub registry_refetched_blocks: u64,
    pub peer_received_mean: f64,
    pub peer_sent_max: u64,
    pub lookups: u64,
    pub renewals: u64,
    /// Requests (lookups, announcements, renewals) the busiest owner answered, in all and
    /// in its busiest second; owners that answered any.
    pub owner_requests_max: u64,
    pub owner_peak_per_second: u64,
    pub owners_used: usize,
    /// The longest a request waited for an owner's CPU.
    pub owner_wait: Duration,
    pub waits: u64,
    pub fallbacks: u64,
    pub hedges: u64,
    pub busy: u64,
    /// Requests to holders that ran past the requester's deadline.
    pub timeouts: u64,
    /// Blocks sent to the registry because their holders were all busy for a budget.
    pub busy_expired: u64,
    /// Time from a node's start to its having the working set, by percentile.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Virtual time the run covered, and events it took.
    pub span: Duration,
    pub events: u64,
    pub invariants: Invariants,
}

impl SimReport {
    pub(super) fn new(cluster: &Cluster) -> SimReport {
        let metrics = &cluster.metrics;
        let config = &cluster.config;
        let total: u64 = config.layers.iter().sum();
        let mut times: Vec<Duration> = cluster
            .nodes
            .iter()
            .filter_map(|node| node.finished.map(|at| at - node.started))
            .collect();
        times.sort_unstable();
        let percentile = |p: f64| {
            let at = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len().max(1));
            times.get(at - 1).copied().unwrap_or(Duration::MAX)
        };
        let nodes_short = cluster
            .nodes
            .iter()
            .filter(|node| node.finished.is_none() || node.blocks_had != total)
            .count();
        let budget = config.latency_budget;
        SimReport {
            nodes: config.nodes,
            seed: config.seed,
            need: config.need(),
            registry_bytes: metrics.registry_bytes,
            registry_refetched_blocks: metrics
                .registry_fetches
                .iter()
                .flatten()
                .map(|&n| u64::from(n.saturating_sub(1)))
                .sum(),
            peer_received_mean: metrics.peer_received.iter().sum::<u64>() as f64
                / config.nodes.max(1) as f64,
            peer_sent_max: metrics.peer_sent.iter().copied().max().unwrap_or(0),
            lookups: metrics.lookups,
            renewals: metrics.renewals,
            owner_requests_max: metrics.owner_requests.iter().copied().max().unwrap_or(0),
            owner_peak_per_second: metrics
                .owner_per_second
                .values()
                .copied()
                .max()
                .unwrap_or(0),
            owners_used: metrics.owner_requests.iter().filter(|&&n| n > 0).count(),
            owner_wait: metrics.owner_wait,
            waits: metrics.waits,
            fallbacks: metrics.fallbacks,
            hedges: metrics.hedges,
            busy: metrics.busy,
            timeouts: metrics.timeouts,
            busy_expired: metrics.busy_expired,
            p50: percentile(0.50),
            p99: percentile(0.99),
            max: times.last().copied().unwrap_or(Duration::MAX),
            span: cluster.queue.now(),
            events: metrics.events,
            invariants: Invariants {
                overlapping_registry_fetches: metrics.overlaps,
                longest_peer_phase: metrics.longest_peer_phase,
                peer_phase_bound: budget * WAIT_BUDGETS + budget / 2,
                nodes_short,
                duplicate_blocks: metrics.duplicates,
            },
        }
    }

    /// Registry bytes as a multiple of one node's need.
    pub fn registry_ratio(&self) -> f64 {
        self.registry_bytes as f64 / self.need.max(1) as f64
    }

    /// The table's header, in Markdown.
    pub fn table_header() -> String {
        "| nodes | registry bytes (x need) | peer bytes per node | owner requests, busiest owner (peak/s) | lookups per node | hedges | p50 | p99 | max |\n\
         |---|---|---|---|---|---|---|---|---|\n"
            .to_string()
    }

    /// This run as a row of the table.
    pub fn table_row(&self) -> String {
        let mut row = String::new();
        let _ = writeln!(
            row,
            "| {} | {:.3}x | {:.0} MiB | {} ({}/s) | {:.0} | {} | {:.2} s | {:.2} s | {:.2} s |",
            self.nodes,
            self.registry_ratio(),
            self.peer_received_mean / f64::from(1 << 20),
            self.owner_requests_max,
            self.owner_peak_per_second,
            self.lookups as f64 / self.nodes.max(1) as f64,
            self.hedges,
            self.p50.as_secs_f64(),
            self.p99.as_secs_f64(),
            self.max.as_secs_f64(),
        );
        row
    }
}
