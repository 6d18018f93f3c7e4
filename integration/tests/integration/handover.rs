//! Restarts a running container never notices: the daemon is killed (SIGKILL) or stopped
//! (SIGTERM) while a container reads files it has never read, with the page cache dropped and
//! one read held in flight by a stalled registry; the next daemon takes the FUSE connections
//! back from the fd holder, the kernel resends what the dead daemon left unanswered, and every
//! read completes with the right bytes. Nothing is remounted and no mount leaks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::binary;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::keeper::{Keeper, READ_TIMEOUT};
use crate::lazy::{data_image, ensure_all_lazy, sums, Stack};
use crate::metrics::Scrape;
use crate::overlaybd;
use crate::proxy::Fault;

/// Kill/start cycles under one running container, with the registry reachable during the
/// restart and as many again with it stalled.
const CYCLES: usize = 10;
const FILES_PER_CYCLE: usize = 1;
/// Larger than a cache block (1 MiB), so each cycle's file needs blocks no earlier read brought.
const FILE_SIZE: usize = 1280 << 10;

/// Empties the page cache, so reads reach FUSE again.
pub(crate) fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")
}

/// What the daemon logs (at debug) for each request the kernel resends after a takeover.
const RESENT: &str = "request resent by the kernel after a takeover";

/// How a cycle ends the daemon.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Kill,
    Stop,
}

/// What the registry does while the next daemon starts.
#[derive(Clone, Copy, Debug)]
enum RegistryDuringRestart {
    /// Answers again as soon as the daemon is gone.
    Reachable,
    /// Still holds every blob request until the next daemon serves its socket: a start that
    /// needed the registry would not finish.
    Stalled,
}

/// The daemon's settings for these tests (its `/metrics`, on a loopback address of its own),
/// and that address.
pub(crate) fn watched_settings() -> (SocketAddr, String) {
    let address = crate::fixture::loopback_addr(9464);
    (address, format!("[metrics]\naddress = \"{address}\"\n"))
}

/// Waits until the daemon at `metrics` has no fill queued or running. A fill completes the
/// blocks an earlier read fetched only part of, once reads are quiet; one reaching a stalled
/// registry would pass for the read a cycle holds in flight, while that read has not even
/// reached the daemon.
fn wait_for_fills(metrics: SocketAddr) -> Result<()> {
    wait_until("the daemon's fills to finish", READ_TIMEOUT, || {
        Ok(Scrape::take(metrics)?.value("shoal_fill_pending_blocks") == 0.0)
    })
}

/// One cycle: with the page cache dropped and no fill pending (the daemon's `/metrics` at
/// `metrics`), `keeper` reads `paths` while the registry stalls every blob request, so the
/// read is certainly in flight; the daemon is ended and a new one started, the stall lifted
/// before or after that start. Returns what the reader printed and how long it was held from
/// the daemon's end.
fn cycle(
    stack: &mut Stack,
    keeper: &Keeper,
    metrics: SocketAddr,
    (exec, paths): (&str, &[&str]),
    (ending, registry): (Ending, RegistryDuringRestart),
) -> Result<(String, Duration)> {
    wait_for_fills(metrics)?;
    drop_caches()?;
    let proxy = stack.registry.proxy();
    proxy.reset();
    proxy.inject("/blobs/", Fault::Stall);
    let resent_before = stack.daemon.log().matches(RESENT).count();
    let reader = keeper.start_sums(exec, paths)?;
    // The daemon has read the container's request and waits on the registry for it.
    wait_until("a read held by the stalled registry", READ_TIMEOUT, || {
        Ok(proxy.stats().values().any(|s| s.faulted > 0))
    })
    .with_context(|| format!("{exec}, reading {paths:?}"))?;
    let ended = Instant::now();
    match ending {
        Ending::Stop => drop(stack.daemon.stop()?),
        Ending::Kill => stack.daemon.kill()?,
    }
    if let RegistryDuringRestart::Reachable = registry {
        proxy.clear_faults();
    }
    stack.daemon.launch()?;
    proxy.clear_faults();
    let out = reader
        .finish()
        .with_context(|| format!("{exec} across a {ending:?}, registry {registry:?}"))?;
    let held = ended.elapsed();
    // The read in flight reached the new daemon as a resent request, not as a new one.
    let log = stack.daemon.log();
    let resent = log.matches(RESENT).count();
    anyhow::ensure!(
        resent > resent_before,
        "{exec}: no request was resent to the new daemon"
    );
    Ok((out, held))
}

/// FUSE mounts of type `fuse.shoal` under `dir`.
pub(crate) fn shoal_mounts_under(dir: &std::path::Path) -> Result<usize> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dir = dir.to_string_lossy();
    Ok(table
        .lines()
        .filter(|line| line.contains(" - fuse.shoal "))
        .filter(|line| line.split(' ').nth(4).is_some_and(|p| p.starts_with(&*dir)))
        .count())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

#[test]
fn a_running_container_reads_every_file_through_kills_and_restarts() {
    privileged!();
    Fixture::run(|fixture| {
        let (metrics, settings) = watched_settings();
        let mut stack = Stack::start(fixture, &settings)?;
        // The last file shares its blocks with the TOC, which opening the layer fetched: it is
        // read only at the end.
        let names: Vec<String> = (0..2 * CYCLES * FILES_PER_CYCLE)
            .map(|i| format!("f{i:02}"))
            .chain(["tail".to_owned()])
            .collect();
        let files: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), FILE_SIZE)).collect();
        let (layers, expected) = data_image(&files)?;
        let image = stack.publish(fixture, "handover", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        let keeper = Keeper::start(&stack.ctd, &image.estargz, "keeper")?;
        let mounts_before = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(
            mounts_before == 2,
            "{mounts_before} FUSE mounts, expected 2"
        );

        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let (mut reachable, mut stalled) = (Vec::new(), Vec::new());
        let cycled = paths.iter().filter(|p| !p.ends_with("tail")).copied();
        let cycled: Vec<&str> = cycled.collect();
        for (n, group) in cycled.chunks(FILES_PER_CYCLE).enumerate() {
            // Every third cycle is a deliberate stop, the others a crash; every other one
            // restarts with the registry unreachable.
            let ending = if n % 3 == 2 {
                Ending::Stop
            } else {
                Ending::Kill
            };
            let registry = if n % 2 == 1 {
                RegistryDuringRestart::Stalled
            } else {
                RegistryDuringRestart::Reachable
            };
            let exec = format!("read-{n}");
            let (out, stall) = cycle(
                &mut stack,
                &keeper,
                metrics,
                (&exec, group),
                (ending, registry),
            )?;
            match registry {
                RegistryDuringRestart::Reachable => reachable.push(stall),
                RegistryDuringRestart::Stalled => stalled.push(stall),
            }
            let want: BTreeMap<String, String> = group
                .iter()
                .map(|p| (p.to_string(), expected[*p].clone()))
                .collect();
            anyhow::ensure!(
                sums(&out) == want,
                "cycle {n} ({ending:?}, registry {registry:?}): read {out}, expected {want:#?}"
            );
        }
        stack.ctd.wait_for_snapshotter("shoal")?;

        // Every file again, through the same mounts, after twenty daemons.
        drop_caches()?;
        let all = keeper.sums("read-all", &paths)?;
        anyhow::ensure!(sums(&all) == expected, "final read: {all}");
        let mounts_after = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(
            mounts_after == mounts_before,
            "{mounts_after} FUSE mounts after {} restarts, {mounts_before} before",
            2 * CYCLES
        );
        let log = stack.daemon.log();
        let carried = log
            .matches("layer carried over from an earlier daemon")
            .count();
        let restarts = 2 * CYCLES;
        anyhow::ensure!(
            carried == 2 * restarts,
            "{carried} layers carried over, expected {}",
            2 * restarts
        );
        anyhow::ensure!(
            !log.contains("read failed"),
            "a read failed across the restarts"
        );
        for (registry, stalls) in [("reachable", &mut reachable), ("stalled", &mut stalled)] {
            stalls.sort();
            eprintln!(
                "stall across a daemon's end and start, registry {registry} during the restart, \
                 {} cycles: p50 {:?}, max {:?}",
                stalls.len(),
                percentile(stalls, 0.5),
                stalls.last().copied().unwrap_or_default()
            );
        }
        Ok(())
    });
}

#[test]
fn an_overlaybd_container_reads_through_a_kill_and_a_stop() {
    privileged!();
    Fixture::run(|fixture| {
        let (metrics, settings) = watched_settings();
        let mut obd = overlaybd::Stack::start_settings(fixture, &settings)?;
        let files: Vec<(String, Vec<u8>)> = (0..3)
            .map(|i| Ok((format!("/data/f{i}"), overlaybd::random_bytes(FILE_SIZE)?)))
            .collect::<Result<_>>()?;
        let data: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        let reference = overlaybd::publish_converted(fixture, &obd, "obd-handover", &data)?;
        let stack: &mut Stack = &mut obd;
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(out.contains("2 layers, 2 lazy"), "not all lazy: {out}");
        let keeper = Keeper::start(&stack.ctd, &reference, "keeper")?;
        let root = stack.daemon.root().to_owned();
        let loops = overlaybd::loops_under(&root)?;
        anyhow::ensure!(!loops.is_empty(), "no loop device backs the disk");

        // The last file lies beside the disk's metadata, which the pull fetched.
        for (n, (path, bytes)) in files.iter().take(2).enumerate() {
            let ending = [Ending::Kill, Ending::Stop][n];
            let registry = [
                RegistryDuringRestart::Stalled,
                RegistryDuringRestart::Reachable,
            ][n];
            let exec = format!("read-{n}");
            let (out, _) = cycle(
                stack,
                &keeper,
                metrics,
                (&exec, &[path]),
                (ending, registry),
            )?;
            anyhow::ensure!(
                out.contains(&overlaybd::sha256_hex(bytes)),
                "cycle {n} ({ending:?}): read {out}"
            );
        }
        drop_caches()?;
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        let out = keeper.sums("read-all", &paths)?;
        for (path, bytes) in &files {
            anyhow::ensure!(
                out.contains(&format!("{}  {path}", overlaybd::sha256_hex(bytes))),
                "{path}: {out}"
            );
        }
        anyhow::ensure!(
            overlaybd::loops_under(&root)? == loops,
            "the loop devices changed across the restarts"
        );
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.matches("virtual disk carried over from an earlier daemon")
                .count()
                >= 2,
            "the disks were not carried over"
        );
        anyhow::ensure!(!log.contains("read failed"), "a read failed");
        Ok(())
    });
}

/// The pids of `shoal-fdholder` processes serving `socket`.
fn holders_at(socket: &std::path::Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let holder = args.first().is_some_and(|a| a.ends_with(b"shoal-fdholder"));
        let ours = args.contains(&socket.as_os_str().as_encoded_bytes());
        if holder && ours {
            pids.push(pid);
        }
    }
    Ok(pids)
}

#[test]
fn with_the_holder_killed_too_running_containers_lose_their_layers_and_new_ones_work() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture, "")?;
        let names = ["a", "b", "tail"];
        let files: Vec<(&str, usize)> = names.iter().map(|n| (*n, FILE_SIZE)).collect();
        let (layers, expected) = data_image(&files)?;
        let image = stack.publish(fixture, "holderless", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        let keeper = Keeper::start(&stack.ctd, &image.estargz, "keeper")?;
        let socket = fixture.path("run/fdholder.sock");
        let holders = holders_at(&socket)?;
        anyhow::ensure!(holders.len() == 1, "holders at the socket: {holders:?}");

        // What the README says: with both gone, the connections end.
        stack.daemon.kill()?;
        for pid in &holders {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        wait_until("the holder gone", READ_TIMEOUT, || {
            Ok(holders_at(&socket)?.is_empty())
        })?;
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        drop_caches()?;
        // The running container lost its layers: a read fails, or the container is gone
        // already (its own binary's pages fault on the ended connection).
        let stale = keeper.sums("read-a", &["/data/a"]);
        let err = format!(
            "{:#}",
            stale.expect_err("a read through a connection that ended succeeded")
        );
        anyhow::ensure!(
            err.contains("Input/output error")
                || err.contains("not connected")
                || err.contains("stopped state"),
            "{err}"
        );
        // A new container is served by the layers mounted anew.
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let out = stack.run(
            &image.estargz,
            "fresh",
            &format!("sha256sum {}", paths.join(" ")),
        )?;
        anyhow::ensure!(sums(&out) == expected, "fresh container read {out}");
        let log = stack.daemon.log();
        anyhow::ensure!(
            !log.contains("layer carried over from an earlier daemon"),
            "nothing can have been carried over"
        );
        Ok(())
    });
}

#[test]
fn an_upgrade_from_the_oldest_supported_release_keeps_running_containers_reading() {
    privileged!();
    let base = binary::upgrade_base_daemon().expect("locate the binaries");
    let Some(base) = base else {
        let test = crate::fixture::test_name();
        if crate::fixture::in_ci() {
            panic!("{test} must run under CI=true but target/upgrade-base/ was not built");
        }
        eprintln!("SKIP: {test} needs scripts/build-upgrade-base.sh run first");
        return;
    };
    Fixture::run(|fixture| {
        let current = binary::daemon()?;
        let (metrics, settings) = watched_settings();
        let mut stack = Stack::start_with(fixture, &settings, |d| d.set_binary(base.clone()))?;
        let names = ["a", "b", "c", "tail"];
        let files: Vec<(&str, usize)> = names.iter().map(|n| (*n, FILE_SIZE)).collect();
        let (layers, expected) = data_image(&files)?;
        let image = stack.publish(fixture, "upgrade", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        let keeper = Keeper::start(&stack.ctd, &image.estargz, "keeper")?;
        let mounts_before = shoal_mounts_under(stack.daemon.root())?;
        let socket = fixture.path("run/fdholder.sock");
        let holders = holders_at(&socket)?;
        anyhow::ensure!(holders.len() == 1, "holders at the socket: {holders:?}");

        // The upgrade: the old release stops (SIGTERM) with a read in flight and the new one
        // starts while the registry still stalls; then a crash of the new one, for good measure.
        stack.daemon.set_binary(current.clone());
        let steps = [
            (Ending::Stop, RegistryDuringRestart::Stalled),
            (Ending::Kill, RegistryDuringRestart::Reachable),
        ];
        for (n, (step, path)) in steps.into_iter().zip(["/data/a", "/data/b"]).enumerate() {
            let (out, stall) = cycle(
                &mut stack,
                &keeper,
                metrics,
                (&format!("read-{n}"), &[path]),
                step,
            )?;
            anyhow::ensure!(
                sums(&out).get(path) == expected.get(path),
                "{step:?}: read {out}"
            );
            eprintln!("stall across {step:?}: {stall:?}");
        }
        drop_caches()?;
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let all = keeper.sums("read-all", &paths)?;
        anyhow::ensure!(sums(&all) == expected, "final read: {all}");
        anyhow::ensure!(
            shoal_mounts_under(stack.daemon.root())? == mounts_before,
            "the mounts changed across the upgrade"
        );
        // The old release's holder kept the connections and still does: a holder is never
        // upgraded with the daemon.
        anyhow::ensure!(
            holders_at(&socket)? == holders,
            "the holder changed across the upgrade"
        );
        let exe = std::fs::read_link(format!("/proc/{}/exe", holders[0]))?;
        anyhow::ensure!(
            exe == base.with_file_name("shoal-fdholder"),
            "the holder is {}",
            exe.display()
        );
        let log = stack.daemon.log();
        let started: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("shoal-snapshotter serving"))
            .collect();
        let commit = std::fs::read_to_string(base.with_file_name("commit"))?;
        let old = format!("({})", &commit.trim()[..7]);
        anyhow::ensure!(
            started.len() == 3
                && started[0].contains(&old)
                && !started[1].contains(&old)
                && !started[2].contains(&old),
            "expected the old release's start {old} and two of the new one's: {started:#?}"
        );
        anyhow::ensure!(
            log.matches("layer carried over from an earlier daemon")
                .count()
                == 4,
            "both layers carried over twice"
        );
        Ok(())
    });
}
