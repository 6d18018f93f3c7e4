//! A herd behind a slow registry: nodes that miss the same blocks at once wait for the one
//! node fetching them for as long as that fetch runs, even far past one latency budget,
//! instead of all going to the registry when the budget runs out.

use super::with_shaped_cluster;
use crate::fixture::{privileged, Fixture};

/// Slow enough that fetching the image takes several latency budgets.
const SLOW_MBIT: u32 = 8;

#[test]
fn nodes_wait_out_a_slow_registry_fetch_instead_of_joining_it() {
    privileged!();
    Fixture::run(|fixture| {
        with_shaped_cluster(fixture, SLOW_MBIT, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let solo = vec![cluster.add_solo("solo")?];
            let (alone, one_node) = cluster.run_counted(&solo, &reference, "solo", published)?;

            // A budget of 1 s against a fetch of about 7 s: only renewals keep the waiting.
            let nodes = cluster.add_peers("h", &["latency_budget_ms = 1000"; 3])?;
            let (_, three_nodes) = cluster.run_counted(&nodes, &reference, "herd", published)?;
            let mut renewals = 0;
            for &i in &nodes {
                let status = cluster.nodes[i].status(&cluster.network)?;
                renewals += status["peers"]["renewals"].as_u64().unwrap_or(0);
            }
            eprintln!(
                "p2p herd at {SLOW_MBIT} Mbit/s: one node {one_node} bytes in {:?}; three \
                 nodes {three_nodes} ({:.2}x), {renewals} renewals to remote owners",
                alone[0].took,
                three_nodes as f64 / one_node as f64
            );
            anyhow::ensure!(
                three_nodes * 10 <= one_node * 12,
                "three nodes made the registry send {three_nodes} bytes, one alone {one_node}"
            );
            Ok(())
        })
    });
}
