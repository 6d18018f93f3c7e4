//! Learned prefetch between real daemons: the first start of an image on one node records
//! which chunks its container read; a peer that pulls the image fetches exactly those right
//! at mount, before any container of it runs. A trace recorded for another image, or one
//! that is damaged, is not used.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::{with_cluster, Cluster, Published};
use crate::fixture::{privileged, wait_until, Fixture};

/// Short, so a recording ends soon after the container's last read.
pub(super) const LEARN: &str = "[fetch]\nlearn_settle_secs = 1\n";

/// Runs the image on node `i` and waits until each layer it read has its trace recorded;
/// returns the learned layers (digest, chunks) from its status.
pub(super) fn record(
    cluster: &Cluster,
    i: usize,
    reference: &str,
    published: &Published,
) -> Result<Vec<(String, u64)>> {
    cluster.run_counted(&[i], reference, "record", published)?;
    let mut recorded = Vec::new();
    wait_until("traces to be recorded", Duration::from_secs(60), || {
        let status = cluster.nodes[i].status(&cluster.network)?;
        let learned = status["learned"].as_array().cloned().unwrap_or_default();
        recorded = learned
            .iter()
            .filter(|l| l["state"] == "recorded")
            .map(|l| {
                let digest = l["digest"].as_str().unwrap_or_default().to_owned();
                (digest, l["chunks"].as_u64().unwrap_or(0))
            })
            .collect();
        // Both layers (busybox, /data) are read by `sha256sum /data/blob`.
        Ok(recorded.len() == 2 && learned.len() == 2)
    })?;
    Ok(recorded)
}

/// Node `i`'s kept traces.
pub(super) fn traces(cluster: &Cluster, i: usize) -> Result<Vec<PathBuf>> {
    trace_files(&cluster.nodes[i].cache.with_file_name("traces"))
}

/// The trace files kept in a daemon's `traces` directory, sorted.
pub(crate) fn trace_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|path| path.extension().is_some_and(|e| e == "trace"));
    files.sort();
    Ok(files)
}

/// Runs the image on node `i` and fails unless its container saw the published blob and
/// fetched no byte of blob `data` (from the registry or peers) beyond what `before`, the
/// node's status before the run, shows: what the trace brought is all it reads.
pub(super) fn run_fetching_nothing_more(
    cluster: &Cluster,
    i: usize,
    reference: &str,
    published: &Published,
    data: &str,
    before: &serde_json::Value,
) -> Result<()> {
    let sum = cluster.nodes[i].run_sum(reference, "after-prefetch")?;
    anyhow::ensure!(
        sum == published.blob_sha256,
        "the peer's container saw {sum}"
    );
    let after = cluster.nodes[i].status(&cluster.network)?;
    let (was, is) = (
        layer_bytes_fetched(before, data, true),
        layer_bytes_fetched(&after, data, true),
    );
    anyhow::ensure!(
        was == is,
        "the container fetched data-layer bytes the trace should have brought: \
         {was} before, {is} after"
    );
    Ok(())
}

/// Bytes of blob `digest` a node's reads took from the registry (and from peers, with
/// `from_peers`), by its `shoal status --json`.
pub(crate) fn layer_bytes_fetched(
    status: &serde_json::Value,
    digest: &str,
    from_peers: bool,
) -> u64 {
    let reads = status["layer_reads"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    reads
        .iter()
        .filter(|r| r["digest"] == digest)
        .map(|r| {
            let peers = if from_peers {
                r["bytes_from_peers"].as_u64().unwrap_or(0)
            } else {
                0
            };
            r["bytes_from_registry"].as_u64().unwrap_or(0) + peers
        })
        .sum()
}

/// Adds a node without peers, with a short settle time.
/// Waits (bounded) until node `i`'s status shows `layers` layers whose traces are replayed;
/// their status entries.
pub(super) fn replayed(
    cluster: &Cluster,
    i: usize,
    layers: usize,
) -> Result<Vec<serde_json::Value>> {
    let mut learned = Vec::new();
    wait_until(
        "the traces to be prefetched",
        Duration::from_secs(60),
        || {
            let status = cluster.nodes[i].status(&cluster.network)?;
            learned = status["learned"].as_array().cloned().unwrap_or_default();
            Ok(learned.len() == layers && learned.iter().all(|l| l["state"] == "replayed"))
        },
    )?;
    Ok(learned)
}

fn add_solo(cluster: &mut Cluster, label: &str) -> Result<usize> {
    let address = cluster.network.attach(label)?;
    cluster.push_node(label, address, LEARN)
}

#[test]
fn a_trace_recorded_on_one_node_is_prefetched_by_a_peer_before_its_container_runs() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let settings = format!("latency_budget_ms = 3000\n{LEARN}");
            let nodes = cluster.add_peers("l", &[settings.as_str(); 2])?;
            let (first, second) = (nodes[0], nodes[1]);
            let recorded = record(cluster, first, &reference, published)?;

            // The peer only pulls: its layers are mounted, no container runs yet.
            cluster.nodes[second].rpull(&cluster.network, &reference)?;
            let learned = replayed(cluster, second, 2)?;
            let before = cluster.nodes[second].status(&cluster.network)?;
            for (digest, chunks) in &recorded {
                let layer = learned
                    .iter()
                    .find(|l| l["digest"] == digest.as_str())
                    .with_context(|| format!("{digest} not learned on the peer: {before:#}"))?;
                // Nothing was cached there: every recorded chunk was fetched ahead, from the
                // node that recorded them.
                anyhow::ensure!(
                    layer["chunks"].as_u64() == Some(*chunks)
                        && layer["peer"] == cluster.nodes[first].peer_name().as_str(),
                    "the peer prefetched {layer} where {chunks} chunks were recorded"
                );
            }
            anyhow::ensure!(
                before["learn"]["from_peers"].as_u64() == Some(2)
                    && before["bytes_from_peers"].as_u64().unwrap_or(0) > 0,
                "the peer's counters after its prefetch: {before:#}"
            );

            // The container then reads only what is there: the data layer (read whole,
            // so wholly in the trace) costs no byte more from anyone.
            let (data, _) = recorded
                .iter()
                .max_by_key(|(_, chunks)| *chunks)
                .context("no layer recorded")?;
            run_fetching_nothing_more(cluster, second, &reference, published, data, &before)?;
            eprintln!(
                "learned prefetch: recorded {recorded:?}; the peer prefetched {} bytes",
                before["learn"]["prefetched_bytes"]
            );
            Ok(())
        })
    });
}

#[test]
fn a_trace_for_another_image_is_ignored_and_a_damaged_one_rejected() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let recorder = add_solo(cluster, "rec")?;
            record(cluster, recorder, &reference, published)?;
            let kept = traces(cluster, recorder)?;
            anyhow::ensure!(kept.len() == 2, "traces kept: {kept:?}");

            // Node "other" finds, under this image's name, traces recorded for another image
            // (sealed anew, so only the digest inside differs); node "bad" finds them damaged.
            let other = add_solo(cluster, "other")?;
            let bad = add_solo(cluster, "bad")?;
            for (node, edit) in [(other, retarget as fn(&mut [u8])), (bad, damage)] {
                let dir = cluster.nodes[node].cache.with_file_name("traces");
                fs::create_dir_all(&dir)?;
                for path in &kept {
                    let mut bytes = fs::read(path)?;
                    edit(&mut bytes);
                    fs::write(dir.join(path.file_name().context("a file")?), bytes)?;
                }
            }
            for (node, outcome, line) in [
                (
                    other,
                    "ignored",
                    "trace was recorded for another image or layer; ignored",
                ),
                (bad, "rejected", "trace rejected: not used for prefetch"),
            ] {
                let sum = cluster.nodes[node]
                    .rpull(&cluster.network, &reference)
                    .and_then(|_| {
                        cluster.nodes[node].run_sum(&reference, &format!("{outcome}-run"))
                    })?;
                anyhow::ensure!(sum == published.blob_sha256, "{outcome}: saw {sum}");
                let status = cluster.nodes[node].status(&cluster.network)?;
                let learn = &status["learn"];
                anyhow::ensure!(
                    learn[outcome].as_u64() == Some(2)
                        && learn["replayed"].as_u64() == Some(0)
                        && learn["prefetched_chunks"].as_u64() == Some(0),
                    "{outcome}: {learn:#}"
                );
                let log = fs::read_to_string(&cluster.nodes[node].log)?;
                let lines = log.lines().filter(|l| l.contains(line)).count();
                anyhow::ensure!(lines == 2, "{outcome}: {lines} lines say {line:?}");
            }
            Ok(())
        })
    });
}

/// Makes a trace name another image, sealed with a right checksum.
fn retarget(bytes: &mut [u8]) {
    bytes[12..44].copy_from_slice(&[0x5a; 32]);
    let at = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..at]);
    bytes[at..].copy_from_slice(&sum);
}

/// Flips a byte inside a trace's entries or header.
pub(super) fn damage(bytes: &mut [u8]) {
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
}
