//! Restarts a running container never notices: the daemon is killed (SIGKILL) or stopped
//! (SIGTERM) while a container reads files it has never read, with the page cache dropped and
//! one read held in flight by a stalled registry; the next daemon takes the FUSE connections
//! back from the fd holder, the kernel resends what the dead daemon left unanswered, and every
//! read completes with the right bytes. Nothing is remounted and no mount leaks.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{data_image, ensure_all_lazy, sums, Stack};
use crate::overlaybd;
use crate::proxy::Fault;

/// Kill/start cycles under one running container.
const CYCLES: usize = 10;
const FILES_PER_CYCLE: usize = 1;
/// Larger than a cache block (1 MiB), so each cycle's file needs blocks no earlier read brought.
const FILE_SIZE: usize = 1280 << 10;
/// Bounds each wait; a correct cycle takes a second or two.
const WAIT: Duration = Duration::from_secs(60);

/// Empties the page cache, so reads reach FUSE again.
fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")
}

/// `sha256sum` of `paths` inside the running container `id`, as a child process that may block.
fn start_reader(stack: &Stack, id: &str, exec: &str, paths: &[&str]) -> Result<Child> {
    let mut command = Command::new("ctr");
    command
        .args(["--address"])
        .arg(stack.ctd.address())
        .args(["--namespace", stack.ctd.namespace()])
        .args(["task", "exec", "--exec-id", exec, id, "sha256sum"])
        .args(paths)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().context("start ctr task exec")
}

/// Waits (bounded) for the reader and returns what it printed.
fn finish_reader(mut child: Child) -> Result<String> {
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            let output = child.wait_with_output()?;
            anyhow::ensure!(
                output.status.success(),
                "reader failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            anyhow::bail!("reader still blocked after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// FUSE mounts of type `fuse.shoal` under `dir`.
fn shoal_mounts_under(dir: &std::path::Path) -> Result<usize> {
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
        let mut stack = Stack::start(fixture, "")?;
        // The last file shares its blocks with the TOC, which opening the layer fetched: it is
        // read only at the end.
        let names: Vec<String> = (0..CYCLES * FILES_PER_CYCLE)
            .map(|i| format!("f{i:02}"))
            .chain(["tail".to_owned()])
            .collect();
        let files: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), FILE_SIZE)).collect();
        let (layers, expected) = data_image(&files)?;
        let image = stack.publish(fixture, "handover", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        stack.ctd.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "shoal",
            &image.estargz,
            "keeper",
            "sleep",
            "600",
        ])?;
        let mounts_before = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(
            mounts_before == 2,
            "{mounts_before} FUSE mounts, expected 2"
        );

        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let mut stalls = Vec::new();
        let cycled = paths.iter().filter(|p| !p.ends_with("tail")).copied();
        let cycled: Vec<&str> = cycled.collect();
        for (cycle, group) in cycled.chunks(FILES_PER_CYCLE).enumerate() {
            // Every third cycle is a deliberate stop, the others a crash.
            let graceful = cycle % 3 == 2;
            drop_caches()?;
            let proxy = stack.registry.proxy();
            proxy.reset();
            proxy.inject("/blobs/", Fault::Stall);
            let reader = start_reader(&stack, "keeper", &format!("read-{cycle}"), group)?;
            // The daemon has read the container's request and waits on the registry for it.
            wait_until("a read held by the stalled registry", WAIT, || {
                Ok(proxy.stats().values().any(|s| s.faulted > 0))
            })
            .with_context(|| format!("cycle {cycle}, reading {group:?}"))?;
            let stopped = Instant::now();
            if graceful {
                stack.daemon.stop()?;
            } else {
                stack.daemon.kill()?;
            }
            proxy.clear_faults();
            stack.daemon.launch()?;
            let out = finish_reader(reader)?;
            stalls.push(stopped.elapsed());
            let want: BTreeMap<String, String> = group
                .iter()
                .map(|p| (p.to_string(), expected[*p].clone()))
                .collect();
            anyhow::ensure!(
                sums(&out) == want,
                "cycle {cycle} ({}): read {out}, expected {want:#?}",
                if graceful { "SIGTERM" } else { "SIGKILL" }
            );
        }
        stack.ctd.wait_for_snapshotter("shoal")?;

        // Every file again, through the same mounts, after ten daemons.
        drop_caches()?;
        let all = finish_reader(start_reader(&stack, "keeper", "read-all", &paths)?)?;
        anyhow::ensure!(sums(&all) == expected, "final read: {all}");
        let mounts_after = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(
            mounts_after == mounts_before,
            "{mounts_after} FUSE mounts after {CYCLES} restarts, {mounts_before} before"
        );
        let log = stack.daemon.log();
        let carried = log
            .matches("layer carried over from an earlier daemon")
            .count();
        anyhow::ensure!(
            carried == 2 * CYCLES,
            "{carried} layers carried over, expected {}",
            2 * CYCLES
        );
        anyhow::ensure!(
            !log.contains("read failed"),
            "a read failed across the restarts"
        );
        stalls.sort();
        eprintln!(
            "stall across a stop and start, {} cycles: p50 {:?}, max {:?}",
            stalls.len(),
            percentile(&stalls, 0.5),
            stalls.last().copied().unwrap_or_default()
        );
        stack
            .ctd
            .ctr(&["task", "kill", "-s", "SIGKILL", "keeper"])?;
        Ok(())
    });
}

#[test]
fn an_overlaybd_container_reads_through_a_kill_and_a_stop() {
    privileged!();
    Fixture::run(|fixture| {
        let mut obd = overlaybd::Stack::start(fixture)?;
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
        stack.ctd.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "shoal",
            &reference,
            "keeper",
            "sleep",
            "600",
        ])?;
        let root = stack.daemon.root().to_owned();
        let loops = overlaybd::loops_under(&root)?;
        anyhow::ensure!(!loops.is_empty(), "no loop device backs the disk");

        // The last file lies beside the disk's metadata, which the pull fetched.
        for (cycle, (path, bytes)) in files.iter().take(2).enumerate() {
            let graceful = cycle == 1;
            drop_caches()?;
            let proxy = stack.registry.proxy();
            proxy.reset();
            proxy.inject("/blobs/", Fault::Stall);
            let reader = start_reader(stack, "keeper", &format!("read-{cycle}"), &[path])?;
            wait_until("a disk read held by the stalled registry", WAIT, || {
                Ok(proxy.stats().values().any(|s| s.faulted > 0))
            })
            .with_context(|| format!("cycle {cycle}, reading {path}"))?;
            if graceful {
                stack.daemon.stop()?;
            } else {
                stack.daemon.kill()?;
            }
            proxy.clear_faults();
            stack.daemon.launch()?;
            let out = finish_reader(reader)?;
            anyhow::ensure!(
                out.contains(&overlaybd::sha256_hex(bytes)),
                "cycle {cycle}: read {out}"
            );
        }
        drop_caches()?;
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        let out = finish_reader(start_reader(stack, "keeper", "read-all", &paths)?)?;
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
        stack
            .ctd
            .ctr(&["task", "kill", "-s", "SIGKILL", "keeper"])?;
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
        stack.ctd.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "shoal",
            &image.estargz,
            "keeper",
            "sleep",
            "600",
        ])?;
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
        wait_until("the holder gone", WAIT, || {
            Ok(holders_at(&socket)?.is_empty())
        })?;
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        drop_caches()?;
        // The running container lost its layers: a read fails, or the container is gone
        // already (its own binary's pages fault on the ended connection).
        let stale = finish_reader(start_reader(&stack, "keeper", "read-a", &["/data/a"])?);
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
        let _ = stack.ctd.ctr(&["task", "kill", "-s", "SIGKILL", "keeper"]);
        Ok(())
    });
}
