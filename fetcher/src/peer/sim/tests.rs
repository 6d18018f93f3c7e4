//! The simulation's invariants over many seeds of small clusters.

use std::time::Duration;

use super::{run, SimConfig};

/// A small image and cluster, varied by `seed`: node count, slow nodes, latencies, how
/// nodes read, how spread their starts are.
fn small(seed: u64) -> SimConfig {
    let mut config = SimConfig::image_start(3 + (seed % 10) as usize, seed);
    config.layers = vec![12 + seed % 7, 5, 3 + seed % 4];
    config.read_blocks = 1 + seed % 4;
    config.concurrency = 1 + (seed % 5) as usize;
    config.slow_share = 0.25;
    config.slow_factor = [1.0, 4.0, 30.0][(seed % 3) as usize];
    config.max_uploads = 2 + (seed % 4) as usize;
    config.start_spread = Duration::from_millis(seed % 200);
    config.node_latency = (
        Duration::from_micros(50),
        Duration::from_millis(1 + seed % 20),
    );
    config
}

#[test]
fn every_seed_keeps_the_invariants() {
    for seed in 0..128 {
        let report = run(&small(seed));
        let broken = report.invariants.violations();
        assert!(broken.is_empty(), "seed {seed}: {broken:?}\n{report:#?}");
        // Without slow nodes no holder times out, so no block is fetched twice at all.
        if small(seed).slow_factor == 1.0 {
            assert_eq!(
                report.registry_refetched_blocks, 0,
                "seed {seed}: {report:#?}"
            );
        }
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = run(&small(7));
    let b = run(&small(7));
    assert_eq!(
        (a.events, a.span, a.registry_bytes, a.lookups, a.p99),
        (b.events, b.span, b.registry_bytes, b.lookups, b.p99)
    );
}

#[test]
fn a_herd_takes_each_block_from_the_registry_once() {
    let mut config = SimConfig::image_start(20, 1);
    config.layers = vec![16, 8];
    let report = run(&config);
    assert!(report.invariants.violations().is_empty(), "{report:#?}");
    assert_eq!(report.registry_bytes, config.need(), "{report:#?}");
    // Peers sent the rest: each node but the registry's first reader of a block got it
    // from one.
    assert!(
        report.peer_received_mean > 0.9 * config.need() as f64,
        "{report:#?}"
    );
}

#[test]
fn a_herd_past_the_upload_slots_keeps_registry_bytes_within_a_tenth_of_the_need() {
    // 60 nodes on 16 upload slots each: every new block has far more askers than its first
    // holder can serve, and they wait for the block to spread instead of fetching it again.
    for seed in 1..4 {
        let mut config = SimConfig::image_start(60, seed);
        config.layers = vec![24, 12, 6];
        let report = run(&config);
        assert!(report.invariants.violations().is_empty(), "{report:#?}");
        assert!(
            report.registry_ratio() <= 1.1,
            "seed {seed}: {:.3}x: {report:#?}",
            report.registry_ratio()
        );
    }
}
