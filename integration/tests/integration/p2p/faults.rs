//! Peers that misbehave: one whose cache went bad, one that is busy, one that is slow, one
//! that dies mid-transfer. Containers must see only right bytes, and starts must finish.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::{ensure_all_right, peer_stat, start_together, with_cluster, Node, DATA_BYTES};
use crate::fixture::{privileged, Fixture};
use crate::process::Process;

/// The largest blob in `node`'s cache (the data layer): its data file and digest.
fn largest_cached_blob(node: &Node) -> Result<(PathBuf, String)> {
    let mut largest: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(&node.cache)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "data") {
            let size = fs::metadata(&path)?.len();
            if largest.as_ref().is_none_or(|(best, _)| size > *best) {
                largest = Some((size, path));
            }
        }
    }
    let (_, path) = largest.context("no cached blob")?;
    let hex = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .context("cache file name")?
        .to_owned();
    Ok((path, format!("sha256:{hex}")))
}

/// Overwrites `len` bytes at each of `offsets` of the largest blob in `node`'s cache (the
/// data layer), as a failing disk would: the node still believes it holds good blocks.
fn corrupt_cached_blob(node: &Node, offsets: &[u64], len: usize) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (path, _) = largest_cached_blob(node)?;
    let file = fs::OpenOptions::new().write(true).open(&path)?;
    for &at in offsets {
        file.write_all_at(&vec![0x5a; len], at)?;
    }
    file.sync_all()?;
    Ok(())
}

#[test]
fn bytes_from_a_corrupt_peer_never_reach_a_container_and_it_is_avoided() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let nodes = cluster.add_peers("c", &["latency_budget_ms = 3000"; 2])?;
            let (bad, good) = (nodes[0], nodes[1]);
            cluster.run_counted(&[bad], &reference, "prime", published)?;
            // One spot in each of /data/blob's two 4 MiB chunks.
            corrupt_cached_blob(&cluster.nodes[bad], &[(1 << 20) + 4096, 5 << 20], 4096)?;

            let (_, from_registry) =
                cluster.run_counted(&[good], &reference, "victim", published)?;
            let status = cluster.nodes[good].status(&cluster.network)?;
            let culprit = cluster.nodes[bad].peer_name();
            let blamed = peer_stat(&status, &culprit, "verify_failures");
            eprintln!(
                "p2p corrupt peer: {blamed} bad blocks from {culprit}, reader verify failures {}, \
                 registry bytes {}, peer bytes {}",
                status["verify_failures"], from_registry, status["bytes_from_peers"]
            );
            anyhow::ensure!(blamed >= 1, "the corrupt peer was not blamed: {status:#}");
            // Avoided after the first bad chunk: the second one came from the registry.
            anyhow::ensure!(
                status["verify_failures"].as_u64() == Some(1),
                "the corrupt peer was asked again after sending bad bytes: {status:#}"
            );
            Ok(())
        })
    });
}

#[test]
fn busy_and_killed_peers_only_delay_a_start() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            // A holder that uploads one request at a time, at 128 KiB/s; two nodes that wait
            // on peers briefly, and a late one that would wait long.
            let holder_settings =
                "upload_rate = \"128KiB\"\nmax_uploads = 1\nlatency_budget_ms = 1500";
            let brief = "latency_budget_ms = 1500";
            let long = "latency_budget_ms = 30000";
            let nodes = cluster.add_peers("s", &[holder_settings, brief, brief, long])?;
            let (holder, late) = (nodes[0], nodes[3]);
            cluster.run_counted(&[holder], &reference, "prime", published)?;
            cluster.wait_announced(holder)?;

            // The holder's one upload slot is taken by a request for 6 MiB of the data layer
            // (48 s at its rate), sent from the late node's address: so the first of the two
            // askers to want a block certainly hears "busy" for a whole budget, there being
            // no other holder yet, and fetches it from the registry.
            let (_, blob) = largest_cached_blob(&cluster.nodes[holder])?;
            let mut hog = cluster
                .network
                .command(&cluster.nodes[late].label, "busybox")?;
            hog.args([
                "wget",
                "-q",
                "-O",
                "/dev/null",
                "--header",
                &format!("Range: bytes=0-{}", (6 << 20) - 1),
                &format!(
                    "http://{}/v1/blobs/{blob}",
                    cluster.nodes[holder].peer_name()
                ),
            ]);
            let mut hog = Process::spawn("hog", &mut hog, &fixture.path("hog.log"))?;
            cluster.nodes[holder].wait_uploads(&cluster.network, 1, Duration::from_secs(20))?;
            let (started, from_registry) =
                cluster.run_counted(&nodes[1..3], &reference, "busy", published)?;
            let mut busy = 0;
            let mut fallbacks = 0;
            for &i in &nodes[1..3] {
                let status = cluster.nodes[i].status(&cluster.network)?;
                busy += status["peers"]["busy_answers"].as_u64().unwrap_or(0);
                fallbacks += status["peers"]["fallbacks"].as_u64().unwrap_or(0);
            }
            let slowest = started.iter().map(|s| s.took).max().unwrap_or_default();
            eprintln!(
                "p2p busy: {busy} busy answers, {fallbacks} fallbacks, {from_registry} bytes \
                 from the registry, slowest {slowest:?}"
            );
            anyhow::ensure!(busy >= 1, "nobody was told busy");
            anyhow::ensure!(
                from_registry as usize >= DATA_BYTES,
                "the registry sent only {from_registry} bytes while the only holder was busy"
            );
            anyhow::ensure!(fallbacks >= 1, "nobody fell back to the registry");
            anyhow::ensure!(slowest < Duration::from_secs(60), "took {slowest:?}");
            // Hanging up ends the upload, which frees the slot at once (or, at the latest,
            // when the holder has slept off the hog's charge).
            hog.kill()?;
            cluster.nodes[holder].wait_uploads(&cluster.network, 0, Duration::from_secs(90))?;

            // The two leave, so the late node's only holder is the holder, which is killed
            // while it sends: its uploads are still paying off the hog's charge, so a request
            // it has taken stays under way for seconds.
            for &i in &nodes[1..3] {
                cluster.nodes[i].daemon.kill()?;
            }
            cluster.wait_live(&[holder, late], 2)?;
            let holder_pid = Pid::from_raw(i32::try_from(cluster.nodes[holder].daemon.pid())?);
            let (holder_node, network) = (&cluster.nodes[holder], &cluster.network);
            let (started, taken) = std::thread::scope(|scope| {
                let killer = scope.spawn(move || -> Result<()> {
                    let taken = holder_node.wait_uploads(network, 1, Duration::from_secs(60));
                    signal::kill(holder_pid, Signal::SIGKILL).context("kill the holder")?;
                    taken.context("the late node never asked the holder")
                });
                let started = start_together(cluster, &[late], &reference, "late");
                let taken = killer
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("killer thread panicked")));
                (started, taken)
            });
            taken?;
            ensure_all_right(&started, &published.blob_sha256)?;
            let status = cluster.nodes[late].status(&cluster.network)?;
            let holder_name = cluster.nodes[holder].peer_name();
            eprintln!(
                "p2p killed holder: took {:?}, from peers {}, from registry {}, errors {}",
                started[0].took,
                status["bytes_from_peers"],
                status["bytes_from_registry"],
                peer_stat(&status, &holder_name, "errors")
            );
            anyhow::ensure!(
                peer_stat(&status, &holder_name, "errors") >= 1,
                "no request to the holder was cut short by its death: {status:#}"
            );
            anyhow::ensure!(
                started[0].took < Duration::from_secs(60),
                "took {:?}",
                started[0].took
            );
            Ok(())
        })
    });
}

#[test]
fn a_slow_holder_is_hedged_with_another_holder() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            // The slow holder has the lowest address, so the owner names it first for every
            // other block (ties in load go by address); each 1 MiB it sends takes about 3 s.
            // No learned prefetch: the asker's trace discovery at mount is a lookup too, and
            // counts as load on the holder it names first, so that, depending on when it
            // came, the owner named the fast holder first for every block and nothing was
            // hedged (seen under load).
            let slow = "upload_rate = \"256KiB\"\nlatency_budget_ms = 4000\n[fetch]\nlearn = false";
            let fast = "latency_budget_ms = 4000\n[fetch]\nlearn = false";
            let nodes = cluster.add_peers("h", &[slow, fast, fast])?;
            let (slow, fast, asker) = (nodes[0], nodes[1], nodes[2]);
            // The fast node fetches from the registry; the slow one gets the image from it
            // and, having checked it, holds it too.
            for (node, tag) in [(fast, "fast"), (slow, "slow")] {
                cluster.run_counted(&[node], &reference, tag, published)?;
                // The asker must find both holders at the owner.
                cluster.wait_announced(node)?;
            }
            let slow_status = cluster.nodes[slow].status(&cluster.network)?;
            anyhow::ensure!(
                slow_status["peers"]["blocks_reshared"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0,
                "the slow node holds nothing to share: {slow_status:#}"
            );

            let (started, _) = cluster.run_counted(&[asker], &reference, "asker", published)?;
            let status = cluster.nodes[asker].status(&cluster.network)?;
            let hedges = status["peers"]["hedges"].as_u64().unwrap_or(0);
            let from_fast = peer_stat(&status, &cluster.nodes[fast].peer_name(), "bytes");
            let from_slow = peer_stat(&status, &cluster.nodes[slow].peer_name(), "bytes");
            eprintln!(
                "p2p hedge: {hedges} hedged requests; {from_fast} bytes from the fast holder, \
                 {from_slow} from the slow one; took {:?}",
                started[0].took
            );
            anyhow::ensure!(hedges >= 1, "no request was hedged: {status:#}");
            anyhow::ensure!(
                from_fast > from_slow,
                "the slow holder sent more than the fast one: {status:#}"
            );
            Ok(())
        })
    });
}
