//! overlaybd images between peers. With the block digest table `shoal convert` writes, every
//! block a peer sends is checked on its own: nodes starting together fetch the image from
//! the registry about once, and a peer that forges blocks (CRCs recomputed, so they pass the
//! ZFile check) is caught block by block and blamed. Without a table (another converter's
//! image) peers are used only over mutual TLS, and the forgery is caught by the blob's digest
//! once the blob is complete, which drops what peers sent and blames them. A trace of the
//! blocks one node's first start read is found by a peer, which fetches them at mount.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_formats::overlaybd::zfile::{crc32c_raw, BLOCK_CRC_SEED};
use shoal_formats::overlaybd::{tar_wrapper, Window, ZFile};

use super::learned::run_fetching_nothing_more;
use super::tls::certificates;
use super::{
    ensure_all_right, peer_stat, start_together, with_cluster_of, Cluster, Published, REGISTRY_MBIT,
};
use crate::convert::manifest_layers;
use crate::fixture::{privileged, wait_until, Fixture};

/// [`super::with_cluster`] with the image converted by `shoal convert --format overlaybd` and
/// `extra` arguments.
fn with_overlaybd_cluster(
    fixture: &Fixture,
    extra: &[&str],
    body: impl FnOnce(&mut Cluster, &Published) -> Result<()>,
) -> Result<()> {
    let mut args = vec!["--format", "overlaybd"];
    args.extend_from_slice(extra);
    with_cluster_of(fixture, REGISTRY_MBIT, None, &args, body)
}

/// Every layer of the image as `shoal status` lists it on node `i`: (digest, verified).
fn verified_layers(cluster: &Cluster, i: usize) -> Result<Vec<(String, String)>> {
    let status = cluster.nodes[i].status(&cluster.network)?;
    let layers = status["layers"].as_array().context("no layers in status")?;
    Ok(layers
        .iter()
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or_default().to_owned();
            (field("digest"), field("verified"))
        })
        .collect())
}

#[test]
fn four_nodes_start_an_overlaybd_image_from_the_registry_about_once() {
    privileged!();
    Fixture::run(|fixture| {
        with_overlaybd_cluster(fixture, &[], |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let solo = vec![cluster.add_solo("solo")?];
            let (_, one_node) = cluster.run_counted(&solo, &reference, "solo", published)?;
            anyhow::ensure!(
                one_node as usize > super::DATA_BYTES,
                "one node fetched only {one_node} bytes"
            );

            let nodes = cluster.add_peers("o", &["latency_budget_ms = 5000"; 4])?;
            let (started, four_nodes) =
                cluster.run_counted(&nodes, &reference, "p2p", published)?;
            let mut from_peers = 0;
            for &i in &nodes {
                let status = cluster.nodes[i].status(&cluster.network)?;
                from_peers += status["bytes_from_peers"].as_u64().unwrap_or(0);
                let layers = verified_layers(cluster, i)?;
                anyhow::ensure!(
                    !layers.is_empty() && layers.iter().all(|(_, v)| v == "per_block"),
                    "{}: layers not verified per block: {layers:?}",
                    cluster.nodes[i].label
                );
            }
            let slowest = started.iter().map(|s| s.took).max().unwrap_or_default();
            eprintln!(
                "p2p overlaybd: registry bytes one node {one_node}, four nodes {four_nodes} \
                 ({:.2}x); peer bytes {from_peers}; slowest start {slowest:?}",
                four_nodes as f64 / one_node as f64
            );
            anyhow::ensure!(
                four_nodes * 10 <= one_node * 12,
                "four nodes made the registry send {four_nodes} bytes, one alone {one_node}"
            );
            // One node alone, reading only what it misses, may fetch some bytes twice; the
            // image itself (its layers, whole) bounds the cluster too.
            let layers =
                manifest_layers(&format!("{}/{}", cluster.host_registry(), published.path))?;
            let image: u64 = layers.iter().map(|(_, size)| size).sum();
            eprintln!("p2p overlaybd: the image's layers are {image} bytes");
            anyhow::ensure!(
                four_nodes * 10 <= image * 12,
                "four nodes made the registry send {four_nodes} bytes for an image of {image}"
            );
            anyhow::ensure!(from_peers > 0, "no block came from a peer");
            let node = &cluster.nodes[nodes[0]];
            let mut status = node.shoal(&cluster.network)?;
            status.arg("status");
            let text = crate::process::run(&mut status, Duration::from_secs(20))?;
            anyhow::ensure!(
                text.contains("verified per block (block digest table); blocks from peers too"),
                "shoal status does not say how layers are verified:\n{text}"
            );
            Ok(())
        })
    });
}

/// The image's top layer (the one holding `/data/blob`): its digest and its bytes, read from
/// the registry's storage.
fn top_layer(
    cluster: &Cluster,
    fixture: &Fixture,
    published: &Published,
) -> Result<(String, Vec<u8>)> {
    let layers = manifest_layers(&format!("{}/{}", cluster.host_registry(), published.path))?;
    let (digest, _) = layers.last().context("an image without layers")?.clone();
    let hex = digest.strip_prefix("sha256:").context("a sha256 layer")?;
    let path = fixture.path(&format!(
        "registry/data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    Ok((digest, bytes))
}

/// `blob` with every ZFile block rewritten (its last compressed byte, a literal in LZ4) and
/// its CRC32C recomputed: each passes its CRC and decodes to other bytes.
fn forged(blob: &[u8]) -> Result<Vec<u8>> {
    let size = blob.len() as u64;
    let payload = tar_wrapper::locate(&blob[..tar_wrapper::PROBE_LEN.min(blob.len())], size)?;
    let window = Window::new(blob, payload.offset, payload.len)?;
    let zfile = ZFile::open(&window)?;
    let mut forged = blob.to_vec();
    for index in 0..zfile.block_count() {
        let block = zfile.block_range(index)?;
        let start = (payload.offset + block.start) as usize;
        let end = (payload.offset + block.end) as usize;
        forged[end - 5] ^= 0x01;
        let crc = crc32c_raw(BLOCK_CRC_SEED, &forged[start..end - 4]);
        forged[end - 4..end].copy_from_slice(&crc.to_le_bytes());
    }
    Ok(forged)
}

/// Writes `bytes` over node `i`'s cached copy of `digest` in place: the blocks it holds and
/// shares are now forged, and it serves them as they are.
fn tamper_cache(cluster: &Cluster, i: usize, digest: &str, bytes: &[u8]) -> Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").context("a sha256 layer")?;
    let path = cluster.nodes[i].cache.join(format!("{hex}.data"));
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    file.write_all_at(bytes, 0)?;
    file.sync_all()?;
    Ok(path)
}

/// A node pulls and runs the image, its cached copy of the top layer is forged in place, and
/// two more nodes then start the image from it. What the nodes were configured with, and
/// which ran with what, is `settings` for all three.
fn forger_then_two(
    cluster: &mut Cluster,
    fixture: &Fixture,
    published: &Published,
    settings: &str,
) -> Result<(usize, Vec<usize>, Vec<super::Started>, String)> {
    let reference = format!("{}/{}", cluster.registry_host()?, published.path);
    let nodes = cluster.add_peers("f", &[settings; 3])?;
    let forger = nodes[0];
    ensure_all_right(
        &start_together(cluster, &[forger], &reference, "forger"),
        &published.blob_sha256,
    )?;
    let (digest, blob) = top_layer(cluster, fixture, published)?;
    tamper_cache(cluster, forger, &digest, &forged(&blob)?)?;
    let started = start_together(cluster, &nodes[1..], &reference, "fed");
    Ok((forger, nodes[1..].to_vec(), started, digest))
}

#[test]
fn a_peer_forging_blocks_with_their_crcs_is_caught_by_the_block_digest_table() {
    privileged!();
    Fixture::run(|fixture| {
        with_overlaybd_cluster(fixture, &[], |cluster, published| {
            let (forger, fed, started, _) =
                forger_then_two(cluster, fixture, published, "latency_budget_ms = 3000")?;
            // Every forged block was found out before any container saw it.
            ensure_all_right(&started, &published.blob_sha256)?;
            let liar = cluster.nodes[forger].peer_name();
            let mut blamed = 0;
            for &i in &fed {
                let status = cluster.nodes[i].status(&cluster.network)?;
                blamed += peer_stat(&status, &liar, "verify_failures");
            }
            let uploaded = cluster.nodes[forger].status(&cluster.network)?["peers"]
                ["bytes_uploaded"]
                .as_u64()
                .unwrap_or(0);
            eprintln!(
                "p2p overlaybd forger: uploaded {uploaded} forged bytes, blamed {blamed} times"
            );
            anyhow::ensure!(
                uploaded > 0,
                "nobody asked the forger: the test proves nothing"
            );
            anyhow::ensure!(blamed >= 1, "the forger was never blamed");
            Ok(())
        })
    });
}

#[test]
fn without_a_table_a_forged_blob_is_caught_by_its_digest_over_mutual_tls() {
    privileged!();
    Fixture::run(|fixture| {
        let tls = certificates(fixture)?;
        with_overlaybd_cluster(fixture, &["--no-block-digests"], |cluster, published| {
            let settings = format!(
                "latency_budget_ms = 3000\ntls = {{ ca = \"{0}/ca.pem\", cert = \"{0}/node.pem\", \
                 key = \"{0}/node.key\" }}",
                tls.display()
            );
            let (forger, fed, started, digest) =
                forger_then_two(cluster, fixture, published, &settings)?;
            // The CRCs passed, so what the containers saw is not asserted: forged file bytes,
            // or a forged ext4 block its checksum refused (EBADMSG). The blob's digest, once
            // the blob is complete, is the check.
            for start in &started {
                eprintln!(
                    "p2p overlaybd without a table: {} saw {:?}",
                    start.label, start.sum
                );
            }
            let liar = cluster.nodes[forger].peer_name();
            for &i in &fed {
                let layers = verified_layers(cluster, i)?;
                anyhow::ensure!(
                    layers.iter().all(|(_, v)| v == "per_blob"),
                    "{}: {layers:?}",
                    cluster.nodes[i].label
                );
            }
            // The background completion starts at once (peers may send CRC-checked blocks),
            // finds the digest wrong, drops the peer's blocks, blames it, and completes the
            // blob from elsewhere.
            let logs = || -> Vec<String> {
                fed.iter()
                    .map(|&i| fs::read_to_string(&cluster.nodes[i].log).unwrap_or_default())
                    .collect()
            };
            wait_until(
                "the blob's digest to verify",
                Duration::from_secs(120),
                || {
                    Ok(logs().iter().all(|log| {
                        log.lines().any(|line| {
                            line.contains("fetched and its digest verified")
                                && line.contains(&digest)
                        })
                    }))
                },
            )?;
            let mut blamed = 0;
            let mut uploaded_to = 0;
            for &i in &fed {
                let status = cluster.nodes[i].status(&cluster.network)?;
                blamed += peer_stat(&status, &liar, "verify_failures");
                uploaded_to += peer_stat(&status, &liar, "bytes");
            }
            eprintln!("p2p overlaybd without a table: {uploaded_to} bytes from the forger, blamed {blamed} times");
            anyhow::ensure!(
                uploaded_to > 0,
                "nobody took the forger's blocks: the test proves nothing"
            );
            anyhow::ensure!(blamed >= 1, "the forger was never blamed");
            anyhow::ensure!(
                logs()
                    .iter()
                    .any(|log| log.contains("failed its digest; dropped the blocks peers sent")),
                "no node dropped the peer's blocks"
            );
            Ok(())
        })
    });
}

#[test]
fn an_overlaybd_trace_recorded_on_one_node_is_prefetched_by_a_peer_at_mount() {
    privileged!();
    Fixture::run(|fixture| {
        with_overlaybd_cluster(fixture, &[], |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let settings = format!("latency_budget_ms = 3000\n{}", super::learned::LEARN);
            let nodes = cluster.add_peers("t", &[settings.as_str(); 2])?;
            let (first, second) = (nodes[0], nodes[1]);
            // Both blobs of the top layer's disk are read by `sha256sum /data/blob`.
            let recorded = super::learned::record(cluster, first, &reference, published)?;

            // The peer only pulls: its disks are mounted, no container runs yet.
            cluster.nodes[second].rpull(&cluster.network, &reference)?;
            let learned = super::learned::replayed(cluster, second, 2)?;
            let from = cluster.nodes[first].peer_name();
            let replay_of = |digest: &str| learned.iter().find(|l| l["digest"] == digest);
            anyhow::ensure!(
                recorded.iter().all(|(digest, _)| {
                    replay_of(digest).is_some_and(|l| l["peer"] == from.as_str())
                }),
                "traces not from {from}: {learned:#?}"
            );
            // The data layer's blocks were fetched ahead (the base layer's may all have come
            // with the reads that mounted the disk, which fetch whole cache blocks).
            let (data, blocks) = recorded
                .iter()
                .max_by_key(|(_, blocks)| *blocks)
                .context("no layer recorded")?;
            let data_replay = replay_of(data).context("the data layer did not replay")?;
            anyhow::ensure!(
                data_replay["chunks"].as_u64().unwrap_or(0) > 0,
                "the peer's replay {data_replay} where {blocks} blocks were recorded"
            );
            // Then the container reads only what is there: no byte more of the data layer.
            let before = cluster.nodes[second].status(&cluster.network)?;
            run_fetching_nothing_more(cluster, second, &reference, published, data, &before)?;
            Ok(())
        })
    });
}
