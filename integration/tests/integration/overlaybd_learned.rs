//! Learned prefetch of overlaybd images end to end, through real containerd, the loopback
//! registry and FUSE: the first start of a converted image records, for each blob of its top
//! layer's disk, the ZFile blocks the container's reads needed, and pushes the traces to the
//! registry; a node with nothing but the registry, and then one that lost its cache but kept
//! the traces, fetches exactly those blocks at mount, before any container runs, so the
//! container's reads of the data layer cost the registry nothing; a damaged trace, and one
//! naming blocks the blob does not have, change nothing but a log line each.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::convert::manifest_layers;
use crate::fixture::{loopback_addr, privileged, wait_until, Fixture};
use crate::overlaybd::{loops_under, publish_converted, random_bytes, sha256_hex, Stack};
use crate::p2p::trace_files;

/// A trace's header: magic, version, unit, reserved, two digests, entry count.
const HEADER_LEN: usize = 80;

/// The daemon's `/status`.
fn status(address: SocketAddr) -> Result<serde_json::Value> {
    let (code, body) = crate::metrics::get_answer(address, "/status")?;
    anyhow::ensure!(code == 200, "/status answered {code}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// Waits (bounded) until `/status` lists learned prefetch for exactly `layers` blobs, all in
/// `state`; their entries.
fn learned(address: SocketAddr, layers: usize, state: &str) -> Result<Vec<serde_json::Value>> {
    let mut learned = Vec::new();
    wait_until(
        &format!("{layers} layers' learned prefetch to be {state}"),
        Duration::from_secs(60),
        || {
            let status = status(address)?;
            learned = status["learned"].as_array().cloned().unwrap_or_default();
            Ok(learned.len() == layers && learned.iter().all(|l| l["state"] == state))
        },
    )?;
    Ok(learned)
}

/// The daemon's kept traces.
fn traces(stack: &Stack) -> Result<Vec<PathBuf>> {
    trace_files(&stack.daemon.root().join("traces"))
}

/// Removes the image (its snapshots, disks and loop devices go), stops the daemon, drops its
/// chunk cache (traces stay) and starts it again: a node that has the traces and nothing else.
fn restart_without_cache(stack: &mut Stack, reference: &str) -> Result<()> {
    stack.ctd.ctr(&["images", "rm", "--sync", reference])?;
    let root = stack.daemon.root().to_owned();
    wait_until("loop devices released", Duration::from_secs(30), || {
        Ok(loops_under(&root)?.is_empty())
    })?;
    stack.daemon.stop()?;
    fs::remove_dir_all(root.join("cache")).context("drop the chunk cache")?;
    stack.daemon.launch()?;
    stack.ctd.wait_for_snapshotter("shoal")?;
    stack.registry.proxy().reset();
    Ok(())
}

/// `shoal rpull` after a restart: containerd redials the daemon with a back-off, so its first
/// calls may still fail as unavailable, and only those are tried again (bounded).
fn rpull_after_restart(stack: &Stack, reference: &str) -> Result<()> {
    wait_until(
        "rpull after the restart",
        Duration::from_secs(120),
        || match stack.rpull(reference) {
            Ok(_) => Ok(true),
            Err(err) if format!("{err:#}").contains("(Unavailable)") => Ok(false),
            Err(err) => Err(err),
        },
    )
}

/// After a restart: pulls the image and waits until both blobs of its top disk replayed their
/// traces (from `origin`: `registry ` for the registry's, empty for this node's), checking
/// that the data layer's replay fetched every block of /data/read; the bytes prefetched of
/// the data layer and those the registry sent of it.
fn replayed_start(
    stack: &Stack,
    address: SocketAddr,
    reference: &str,
    data: &str,
    origin: &str,
) -> Result<(u64, u64)> {
    rpull_after_restart(stack, reference)?;
    let replayed = learned(address, 2, "replayed")?;
    anyhow::ensure!(
        replayed.iter().all(|l| match origin {
            "" => l["peer"] == "",
            prefix => l["peer"].as_str().is_some_and(|p| p.starts_with(prefix)),
        }),
        "traces not from {origin:?}: {replayed:#?}"
    );
    let data_learned = replayed
        .iter()
        .find(|l| l["digest"] == data)
        .context("the data layer did not replay")?;
    let prefetched = data_learned["bytes"].as_u64().unwrap_or(0);
    let sent = stack.registry.proxy().response_bytes_for(data);
    // The mount reads none of /data/read: the replay fetched every block of it.
    anyhow::ensure!(
        data_learned["chunks"].as_u64().unwrap_or(0) >= 1024
            && prefetched > 0
            && sent >= prefetched,
        "the replay of the data layer: {data_learned}, the registry sent {sent} bytes of it"
    );
    let learn = &status(address)?["learn"];
    let from_registry = u64::from(!origin.is_empty()) * 2;
    anyhow::ensure!(
        learn["replayed"].as_u64() == Some(2)
            && learn["from_registry"].as_u64() == Some(from_registry)
            && learn["prefetched_bytes"].as_u64().unwrap_or(0) >= prefetched,
        "counters after the replay: {learn:#}"
    );
    Ok((prefetched, sent))
}

/// Makes a trace name a block far past the end of any blob, sealed with a right checksum.
fn past_the_end(bytes: &mut [u8]) {
    bytes[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let at = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..at]);
    bytes[at..].copy_from_slice(&sum);
}

#[test]
fn a_trace_of_the_first_start_is_prefetched_at_mount_after_the_cache_is_lost() {
    privileged!();
    Fixture::run(|fixture| {
        let address = loopback_addr(9464);
        // 64 KiB cache blocks: a read's fetch (64 KiB aligned) fills whole blocks, so no
        // background fill of partial ones adds registry bytes while the test counts them.
        let settings = format!(
            "[metrics]\naddress = \"{address}\"\n[cache]\nblock_size = \"64KiB\"\n\
             [fetch]\nlearn_settle_secs = 2\nlearn_push = true\n"
        );
        let mut stack = Stack::start_settings(fixture, &settings)?;
        let read = random_bytes(4 << 20)?;
        let unread = random_bytes(16 << 20)?;
        let reference = publish_converted(
            fixture,
            &stack,
            "obd-learn",
            &[("/data/read", &read), ("/data/unread", &unread)],
        )?;
        let layers = manifest_layers(&reference)?;
        let (data, _) = layers.last().context("no layers")?.clone();
        let run = |stack: &Stack, id: &str| -> Result<()> {
            let out = stack.ctd.ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "shoal",
                &reference,
                id,
                "sha256sum",
                "/data/read",
            ])?;
            anyhow::ensure!(out.contains(&sha256_hex(&read)), "{id}: wrong sum: {out}");
            Ok(())
        };

        // The first start records a trace of both blobs of the top layer's disk (the disk of
        // the layer below is mounted too, and learns nothing).
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(out.contains("2 layers, 2 lazy"), "not all lazy: {out}");
        run(&stack, "record")?;
        let recorded = learned(address, 2, "recorded")?;
        let recorded_blocks = |digest: &str| {
            recorded
                .iter()
                .find(|l| l["digest"] == digest)
                .and_then(|l| l["chunks"].as_u64())
                .unwrap_or(0)
        };
        // /data/read is 4 MiB in 4 KiB blocks: at least that many were recorded of it, and
        // far fewer than the 20 MiB of the layer.
        let data_blocks = recorded_blocks(&data);
        anyhow::ensure!(
            (1024..2048).contains(&data_blocks),
            "recorded {data_blocks} blocks of the data layer: {recorded:#?}"
        );
        let kept = traces(&stack)?;
        anyhow::ensure!(kept.len() == 2, "traces kept: {kept:?}");

        // The traces are pushed to the registry as a referrer artifact of the image.
        wait_until("traces to be pushed", Duration::from_secs(60), || {
            let log = stack.daemon.log();
            Ok(log.matches("traces pushed to the registry").count() == 2)
        })?;

        // A new node (no cache, no traces, no peers) finds them in the registry; then the
        // node loses its cache but keeps the traces (the registry's, kept on replay). Each
        // time the next mount fetches the recorded blocks at once, before the container runs.
        for (keep_traces, origin) in [(false, "registry "), (true, "")] {
            restart_without_cache(&mut stack, &reference)?;
            if !keep_traces {
                fs::remove_dir_all(stack.daemon.root().join("traces"))?;
            }
            let (prefetched, sent) = replayed_start(&stack, address, &reference, &data, origin)?;
            let before = stack.registry.proxy().response_bytes_for(&data);
            // Then the container reads only what is there: not one byte more of the data layer.
            run(&stack, &format!("replayed-{keep_traces}"))?;
            let after = stack.registry.proxy().response_bytes_for(&data);
            anyhow::ensure!(
                after == before,
                "the container fetched {} bytes of the data layer the trace should have brought",
                after - before
            );
            eprintln!(
                "overlaybd learned prefetch (trace from {origin:?}): {data_blocks} blocks \
                 recorded of the data layer, {prefetched} bytes prefetched at mount, {sent} \
                 sent by the registry"
            );
        }

        // A damaged trace and one naming blocks past the blob's end: each is rejected with one
        // log line, nothing is prefetched, and the start records its own again.
        restart_without_cache(&mut stack, &reference)?;
        for path in traces(&stack)? {
            let mut bytes = fs::read(&path)?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(&format!("-{}.trace", data.trim_start_matches("sha256:"))) {
                past_the_end(&mut bytes);
            } else {
                let at = bytes.len() / 2;
                bytes[at] ^= 0x01;
            }
            fs::write(&path, bytes)?;
        }
        rpull_after_restart(&stack, &reference)?;
        run(&stack, "rejected")?;
        learned(address, 2, "recorded")?;
        let learn = &status(address)?["learn"];
        anyhow::ensure!(
            learn["rejected"].as_u64() == Some(2)
                && learn["replayed"].as_u64() == Some(0)
                && learn["prefetched_chunks"].as_u64() == Some(0),
            "after damaged traces: {learn:#}"
        );
        let log = stack.daemon.log();
        let rejections: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("trace rejected: not used for prefetch"))
            .collect();
        anyhow::ensure!(
            rejections.len() == 2 && rejections.iter().any(|l| l.contains("blocks")),
            "rejections logged: {rejections:#?}"
        );
        Ok(())
    })
}
