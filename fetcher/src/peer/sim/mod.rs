//! A deterministic discrete-event simulation of the peer protocol: N nodes start one image
//! together, on a virtual clock, over a simulated network (each node's uplink and downlink
//! with its own rate, per-node latency, a registry behind its own uplink).
//!
//! What is the daemon's code and what is simulated:
//! - The daemon's: each node's decisions per round ([`PeerFetchPlan`](super::plan)), grant
//!   renewal ([`Renewals`](super::plan::Renewals)), hedge timing ([`Pace`](super::pace)),
//!   grouping of blocks by holder ([`runs_by_holder`](super::hedge::runs_by_holder)), how an
//!   answer is noted and a failure penalised ([`Hedged`](super::hedge::Hedged)), the owners'
//!   [`OwnerIndex`](super::index::OwnerIndex) (leases, grants, waits, holder choice),
//!   [`rendezvous`](super::rendezvous) placement and each node's
//!   [`Membership`](super::member::Membership) (busy and avoided peers).
//! - Simulated: the transport (a request or answer takes its link's latency; bytes go
//!   through the sender's uplink and the receiver's downlink, each a queue at a fixed rate),
//!   an owner's CPU (each request it answers takes a fixed time, one after another), the
//!   upload limiter (a node's uplink rate is `peers.upload_rate`, and more than
//!   `peers.max_uploads` uploads at once are answered busy), and the reader: each node reads
//!   the image's blocks in order, `concurrency` reads of `read_blocks` blocks at once, as the
//!   fetcher's rounds do ([`fetch_remote`](crate::fetcher)): ask peers, fetch from the
//!   registry what they cannot send (renewing the grant meanwhile), ask again about the rest.
//!   Announcements go out as blocks land (the daemon batches them); bytes from peers are
//!   taken as verified on arrival. Members do not die or join during a run.
//! - The same order of the virtual clock's events for the same seed: a run is replayed
//!   exactly.

mod clock;
mod cluster;
mod report;
#[cfg(test)]
mod tests;
mod transfer;

use std::time::Duration;

pub use report::{Invariants, SimReport};

/// One simulated start of an image on a cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Blocks of each layer of the image, all of which every node reads.
    pub layers: Vec<u64>,
    pub block_size: u64,
    /// Blocks one read asks for (adjacent blocks of one layer).
    pub read_blocks: u64,
    /// Reads each node has in flight at once.
    pub concurrency: usize,
    /// A node's downlink, bytes a second; its uplink is `upload_rate`.
    pub node_down: f64,
    /// One-way latency between a node and the switch: a message between two nodes takes
    /// the sum of theirs. Each node draws its own between the two.
    pub node_latency: (Duration, Duration),
    /// Nodes this much slower (uplink and downlink), the others' share `slow_share`.
    pub slow_factor: f64,
    pub slow_share: f64,
    pub registry_up: f64,
    /// One-way latency from the registry to any node.
    pub registry_latency: Duration,
    /// An owner's CPU time per request it answers (lookup, announcement, renewal).
    pub owner_service: Duration,
    /// Nodes start within this long of each other.
    pub start_spread: Duration,
    /// The daemon's settings (`peers.*`).
    pub owners: usize,
    pub upload_rate: f64,
    pub max_uploads: usize,
    pub latency_budget: Duration,
    pub lease: Duration,
}

impl SimConfig {
    /// A 300 MiB image in five layers, 1 MiB blocks (the cache's default), the daemon's
    /// default peer settings, nodes on 10 Gbit/s links in one data centre, a registry
    /// behind 2 Gbit/s 10 ms away.
    pub fn image_start(nodes: usize, seed: u64) -> SimConfig {
        use shoal_config::defaults;
        SimConfig {
            seed,
            nodes,
            layers: vec![120, 80, 50, 30, 20],
            block_size: defaults::CACHE_BLOCK_SIZE,
            read_blocks: 4,
            concurrency: 8,
            node_down: 1.25e9,
            node_latency: (Duration::from_micros(50), Duration::from_micros(250)),
            slow_factor: 1.0,
            slow_share: 0.0,
            registry_up: 250e6,
            registry_latency: Duration::from_millis(10),
            owner_service: Duration::from_micros(20),
            start_spread: Duration::from_millis(50),
            owners: defaults::PEERS_OWNERS,
            upload_rate: defaults::PEERS_UPLOAD_RATE as f64,
            max_uploads: defaults::PEERS_MAX_UPLOADS,
            latency_budget: Duration::from_millis(defaults::PEERS_LATENCY_BUDGET_MS),
            lease: Duration::from_secs(defaults::PEERS_LEASE_SECS),
        }
    }

    /// Bytes of the image one node reads.
    pub fn need(&self) -> u64 {
        self.layers.iter().sum::<u64>() * self.block_size
    }
}

/// Runs one simulation to its end: every node has the working set, or the run stopped at
/// its bounds (which [`SimReport::invariants`] then reports).
pub fn run(config: &SimConfig) -> SimReport {
    cluster::Cluster::new(config.clone()).run()
}
