//! The peer benchmark behind `scripts/bench-p2p.sh`: for each node count, that many fresh
//! nodes start the image at the same moment; it prints registry bytes, peer bytes, and the
//! median and slowest time to the container's first output (from the start of the pull).
//! Built only with the integration crate's `bench` feature: it takes minutes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{with_cluster, Cluster, Node};
use crate::fixture::{privileged, Fixture};
use crate::netns::Network;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Pulls and runs the image on `node`; returns the time to the container's first line and
/// the sha256 it printed.
fn first_output(
    network: &Network,
    node: &Node,
    reference: &str,
    id: &str,
) -> Result<(Duration, String)> {
    let started = Instant::now();
    node.rpull(network, reference)?;
    let mut ctr = Command::new("ctr");
    ctr.arg("--address")
        .arg(node.ctd.address())
        .args([
            "-n",
            node.ctd.namespace(),
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
        ])
        .args([reference, id, "busybox", "sh", "-c"])
        .arg("head -c 1 /data/blob >/dev/null && echo ready && busybox sha256sum /data/blob")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = ctr.spawn().context("spawn ctr run")?;
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        // The run is bounded: a hung container is killed, and its missing output fails it.
        // A run that ended in time says so first, so that no reused pid is ever killed.
        if finished.recv_timeout(RUN_TIMEOUT).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let stdout = child.stdout.take().context("ctr without stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().context("no output")??;
    let to_first = started.elapsed();
    anyhow::ensure!(first.trim() == "ready", "first line {first:?}");
    let sum = lines.next().context("no sha256 line")??;
    let status = child.wait();
    let _ = done.send(());
    let _ = watchdog.join();
    let status = status?;
    anyhow::ensure!(status.success(), "ctr run: {status}");
    let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
    Ok((to_first, sum))
}

#[test]
fn bench_nodes_starting_together() {
    privileged!();
    let counts: Vec<usize> = std::env::var("SHOAL_P2P_BENCH_NODES")
        .unwrap_or_else(|_| "1 2 4 8".into())
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            println!(
                "bench-p2p: peers  nodes  registry_bytes  peer_bytes  first_output_p50  first_output_max"
            );
            for (round, &count) in counts.iter().enumerate() {
                for peers in [true, false] {
                    let prefix = format!("b{round}{}", if peers { "p" } else { "s" });
                    let nodes = if peers {
                        cluster.add_peers(&prefix, &vec!["latency_budget_ms = 5000"; count])?
                    } else {
                        (0..count)
                            .map(|i| cluster.add_solo(&format!("{prefix}{i}")))
                            .collect::<Result<_>>()?
                    };
                    round_of(cluster, &nodes, &reference, &published.blob_sha256, peers)?;
                    // The next round starts cold, without these nodes.
                    for &i in &nodes {
                        cluster.nodes[i].daemon.kill()?;
                    }
                }
            }
            Ok(())
        })
    });
}

/// Starts the image on `nodes` at once and prints one line of the table.
fn round_of(
    cluster: &Cluster,
    nodes: &[usize],
    reference: &str,
    expected: &str,
    peers: bool,
) -> Result<()> {
    let before = cluster.registry_blob_bytes();
    let barrier = Arc::new(Barrier::new(nodes.len()));
    let results: Vec<Result<(Duration, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|&i| {
                let barrier = barrier.clone();
                let network = &cluster.network;
                let node = &cluster.nodes[i];
                scope.spawn(move || {
                    barrier.wait();
                    first_output(network, node, reference, &format!("bench-{}", node.label))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let mut times = Vec::new();
    for result in results {
        let (took, sum) = result?;
        anyhow::ensure!(sum == expected, "wrong bytes: {sum}");
        times.push(took);
    }
    times.sort();
    let mut from_peers = 0;
    for &i in nodes {
        let status = cluster.nodes[i].status(&cluster.network)?;
        from_peers += status["bytes_from_peers"].as_u64().unwrap_or(0);
    }
    println!(
        "bench-p2p: {:>5}  {:>5}  {:>14}  {from_peers:>10}  {:>15.2}s  {:>15.2}s",
        if peers { "on" } else { "off" },
        nodes.len(),
        cluster.registry_blob_bytes() - before,
        times[times.len() / 2].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
    );
    Ok(())
}
