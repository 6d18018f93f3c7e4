//! Blocks travel on: a node that got blocks from a peer and checked them shares them in
//! turn, also after a restart, so the first holder is not the only source for long.

use std::time::Duration;

use super::{peer_stat, with_cluster, DATA_BYTES};
use crate::fixture::{privileged, wait_until, Fixture};

#[test]
fn verified_peer_blocks_are_shared_on_and_still_after_a_restart() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let nodes = cluster.add_peers("r", &["latency_budget_ms = 3000"; 3])?;
            let (first, second, third) = (nodes[0], nodes[1], nodes[2]);

            // The first node fetches the image from the registry.
            let (_, one_node) = cluster.run_counted(&[first], &reference, "first", published)?;

            // The second gets it from the first; its container reads all of /data/blob, so
            // every chunk of it is checked on the way, and those blocks become its own to share.
            cluster.run_counted(&[second], &reference, "second", published)?;
            let status = cluster.nodes[second].status(&cluster.network)?;
            let reshared = status["peers"]["blocks_reshared"].as_u64().unwrap_or(0);
            // All but the data layer's first block (a directory's header before any chunk)
            // and the last (which ends in the TOC and footer) are whole chunks.
            let data_blocks = (DATA_BYTES >> 20) as u64;
            anyhow::ensure!(
                reshared >= data_blocks - 1,
                "the second node shares only {reshared} of the blocks it checked: {status:#}"
            );

            // What it shares outlives a SIGKILL once saved (within seconds), and the first
            // node, the only one that fetched from the registry, goes away.
            wait_until(
                "the shareable blocks to be saved",
                Duration::from_secs(30),
                || {
                    let status = cluster.nodes[second].status(&cluster.network)?;
                    Ok(status["peers"]["shareable_unsaved"].as_bool() == Some(false))
                },
            )?;
            cluster.restart_daemon(second)?;
            cluster.nodes[first].daemon.kill()?;
            cluster.wait_live(&[second, third], 2)?;

            let (_, from_registry) =
                cluster.run_counted(&[third], &reference, "third", published)?;
            let status = cluster.nodes[third].status(&cluster.network)?;
            let from_second = peer_stat(&status, &cluster.nodes[second].peer_name(), "bytes");
            eprintln!(
                "p2p reshare: second node shares {reshared} checked blocks; third node got \
                 {from_second} bytes from it and {from_registry} from the registry (one node \
                 alone: {one_node})"
            );
            anyhow::ensure!(
                from_second >= (DATA_BYTES / 2) as u64,
                "the third node got only {from_second} bytes from the restarted second: {status:#}"
            );
            // What still comes from the registry: blocks holding bytes no hash covers (tar
            // headers before a layer's first chunk) or chunks the second node never read.
            anyhow::ensure!(
                from_registry * 2 <= one_node,
                "the third node still fetched {from_registry} of {one_node} bytes from the registry"
            );
            Ok(())
        })
    });
}
