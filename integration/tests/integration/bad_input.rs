//! Misuse and damage: gRPC calls that must fail with containerd's status codes, a corrupt
//! metadata database, a second daemon on a live socket, and a crash in the middle of commits.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1::Kind;
use containerd_snapshots::tonic::Code;

use crate::client::{expect_code, kind, Snapshots};
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::mount;

#[test]
fn grpc_errors_carry_containerd_codes() {
    privileged!();
    Fixture::run(|fixture| {
        let daemon = Daemon::start(fixture)?;
        let api = daemon.client()?;
        api.prepare("base-active", "")?;
        api.commit("base", "base-active")?;
        api.prepare("child", "base")?;
        api.view("view", "base")?;

        expect_code(
            "prepare on an unknown parent",
            api.prepare("orphan", "no-such-parent"),
            Code::NotFound,
        )?;
        expect_code(
            "view of an unknown parent",
            api.view("orphan-view", "no-such-parent"),
            Code::NotFound,
        )?;
        expect_code(
            "prepare of an existing key",
            api.prepare("child", "base"),
            Code::AlreadyExists,
        )?;
        expect_code(
            "view under a committed name",
            api.view("base", ""),
            Code::AlreadyExists,
        )?;
        expect_code(
            "commit of a view",
            api.commit("view-committed", "view"),
            Code::FailedPrecondition,
        )?;
        expect_code(
            "commit onto an existing name",
            api.commit("base", "child"),
            Code::AlreadyExists,
        )?;
        expect_code(
            "commit of a missing key",
            api.commit("never", "missing"),
            Code::NotFound,
        )?;
        expect_code(
            "remove of a parent",
            api.remove("base"),
            Code::FailedPrecondition,
        )?;
        expect_code(
            "remove of a missing key",
            api.remove("missing"),
            Code::NotFound,
        )?;
        expect_code("stat of a missing key", api.stat("missing"), Code::NotFound)?;
        expect_code(
            "mounts of a missing key",
            api.mounts("missing"),
            Code::NotFound,
        )?;
        expect_code(
            "mounts of a committed snapshot",
            api.mounts("base"),
            Code::FailedPrecondition,
        )?;
        expect_code(
            "usage of a missing key",
            api.usage("missing"),
            Code::NotFound,
        )?;
        for filter in [r#"labels."unterminated"#, "==value", "name~=(", "name==a,,"] {
            expect_code(
                &format!("filter {filter:?}"),
                api.list(&[filter]),
                Code::InvalidArgument,
            )?;
        }

        // Failed calls changed nothing.
        let names = api.list_names(&[])?;
        anyhow::ensure!(
            names == ["base", "child", "view"],
            "after the failures: {names:?}"
        );
        anyhow::ensure!(
            kind(&api.stat("view")?) == Kind::View,
            "the view changed kind"
        );
        Ok(())
    });
}

#[test]
fn corrupt_metadata_db_refuses_to_start() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        daemon.client()?.prepare("something", "")?;
        anyhow::ensure!(daemon.stop()?.success(), "SIGTERM exit was not clean");
        let db = daemon.root().join("metadata.db");
        let size = fs::metadata(&db)
            .with_context(|| format!("stat {}", db.display()))?
            .len();
        // Garbage over the whole file, headers included.
        let garbage: Vec<u8> = (0..size.max(8192)).map(|i| (i * 7 + 13) as u8).collect();
        fs::write(&db, garbage)?;
        let (status, output) = daemon.run_expecting_exit(fixture, "corrupt-db")?;
        anyhow::ensure!(
            !status.success(),
            "started on a corrupt metadata.db: {status}\n{output}"
        );
        anyhow::ensure!(
            output.contains("metadata"),
            "the refusal does not name the metadata database:\n{output}"
        );
        Ok(())
    });
}

/// Peers on an address other hosts can reach, without mutual TLS and without asking for it
/// in so many words: the daemon does not start, and says which setting to change.
#[test]
fn open_peers_without_tls_refuse_to_start_naming_the_setting() {
    privileged!();
    Fixture::run(|fixture| {
        let daemon = Daemon::configure_with(
            fixture,
            "\n[peers]\nlisten = \"0.0.0.0:7420\"\nstatic = [\"10.0.0.2:7420\"]\n",
        )?;
        let (status, output) = daemon.run_expecting_exit(fixture, "open-peers")?;
        anyhow::ensure!(
            !status.success(),
            "started with an open peer port: {status}\n{output}"
        );
        anyhow::ensure!(
            output.contains("peers.listen") && output.contains("insecure = true"),
            "the refusal does not name the setting:\n{output}"
        );
        Ok(())
    });
}

#[test]
fn second_daemon_on_a_live_socket_refuses_to_start() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        daemon.client()?.prepare("first", "")?;
        let (status, output) = daemon.run_expecting_exit(fixture, "second")?;
        anyhow::ensure!(
            !status.success(),
            "a second daemon started: {status}\n{output}"
        );
        anyhow::ensure!(
            output.contains("socket"),
            "the refusal does not mention the socket:\n{output}"
        );
        anyhow::ensure!(daemon.is_running()?, "the first daemon died");
        let names = daemon.client()?.list_names(&[])?;
        anyhow::ensure!(
            names == ["first"],
            "the first daemon lost its state: {names:?}"
        );
        Ok(())
    });
}

#[test]
fn stale_socket_is_replaced_after_kill() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        daemon.client()?.prepare("kept", "")?;
        daemon.kill()?;
        anyhow::ensure!(
            daemon.socket().exists(),
            "no stale socket left by SIGKILL to test with"
        );
        daemon.launch()?;
        let names = daemon.client()?.list_names(&[])?;
        anyhow::ensure!(names == ["kept"], "after restart: {names:?}");
        Ok(())
    });
}

/// Commits a chain `c-0 <- c-1 <- ...`, each with a file `/<i>`, counting the commits
/// acknowledged; stops at the first error (the daemon died) or after `limit`.
fn commit_burst(socket: &Path, acknowledged: &AtomicUsize, limit: usize) -> Result<()> {
    let api = Snapshots::connect(socket)?;
    for i in 0..limit {
        let key = format!("k-{i}");
        let parent = if i == 0 {
            String::new()
        } else {
            format!("c-{}", i - 1)
        };
        let mounts = api.prepare(&key, &parent)?;
        let upper = mounts
            .first()
            .and_then(|entry| {
                entry
                    .options
                    .iter()
                    .find_map(|option| option.strip_prefix("upperdir="))
                    .map(str::to_owned)
                    .or_else(|| (entry.r#type == "bind").then(|| entry.source.clone()))
            })
            .context("no writable directory in the mounts")?;
        // Writing into the upper directory is what a mount of it would do.
        fs::write(Path::new(&upper).join(i.to_string()), i.to_string())?;
        api.commit(&format!("c-{i}"), &key)?;
        acknowledged.store(i + 1, Ordering::SeqCst);
    }
    Ok(())
}

#[test]
fn kill_during_commits_keeps_every_acknowledged_commit() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let burst = {
            let socket = daemon.socket().to_owned();
            let acknowledged = Arc::clone(&acknowledged);
            std::thread::spawn(move || commit_burst(&socket, &acknowledged, 120))
        };
        wait_until("20 acknowledged commits", Duration::from_secs(60), || {
            Ok(acknowledged.load(Ordering::SeqCst) >= 20)
        })?;
        daemon.kill()?;
        let outcome = burst
            .join()
            .map_err(|_| anyhow::anyhow!("the burst thread panicked"))?;
        let done = acknowledged.load(Ordering::SeqCst);
        anyhow::ensure!(
            outcome.is_err() || done == 120,
            "the burst ended cleanly early"
        );

        daemon.launch()?;
        let api = daemon.client()?;
        let listed = api.list(&[])?;
        for i in 0..done {
            let info = api
                .stat(&format!("c-{i}"))
                .with_context(|| format!("acknowledged c-{i} lost"))?;
            anyhow::ensure!(kind(&info) == Kind::Committed, "c-{i} is {:?}", kind(&info));
        }
        for info in &listed {
            let (prefix, index) = info
                .name
                .split_once('-')
                .map_or(("", None), |(prefix, index)| {
                    (prefix, index.parse::<usize>().ok())
                });
            // An unacknowledged commit may have landed; only the key in flight may be active.
            let well_formed = match (prefix, kind(info), index) {
                ("c", Kind::Committed, Some(i)) => i <= done,
                ("k", Kind::Active, Some(i)) => i == done,
                _ => false,
            };
            anyhow::ensure!(
                well_formed,
                "half-made or stray snapshot listed after the crash: {info:?}"
            );
            api.stat(&info.name)
                .with_context(|| format!("listed {} but cannot stat it", info.name))?;
        }

        // The newest acknowledged commit still holds every file of the chain.
        let top = format!("c-{}", done - 1);
        let view = fixture.mkdir("top-view")?;
        mount::mount_all(&api.view("top-view", &top)?, &view)?;
        let missing: Vec<usize> = (0..done)
            .filter(|i| !view.join(i.to_string()).exists())
            .collect();
        mount::unmount(&view)?;
        anyhow::ensure!(
            missing.is_empty(),
            "{top} lacks the files of layers {missing:?}"
        );
        Ok(())
    });
}

/// Clients that connected and then hung must not keep the daemon from shutting down: the drain
/// on SIGTERM has to be bounded.
#[test]
fn sigterm_exits_despite_hung_clients() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        // One hung after a completed call, one after the HTTP/2 preface, one before a byte.
        let after_call = Snapshots::connect_hung(daemon.socket())?;
        after_call.prepare("before", "")?;
        let mut after_preface = std::os::unix::net::UnixStream::connect(daemon.socket())?;
        after_preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")?;
        let _silent = std::os::unix::net::UnixStream::connect(daemon.socket())?;
        let status = daemon.stop()?;
        anyhow::ensure!(status.success(), "SIGTERM exit status {status}");
        anyhow::ensure!(!daemon.socket().exists(), "the socket outlived SIGTERM");
        Ok(())
    });
}

/// A stop that arrives while the daemon is still starting (it holds its root but has not
/// opened its store nor bound its socket) waits for the start-up: the daemon exits cleanly,
/// and a store it was creating is whole at the next start.
#[test]
fn sigterm_during_start_up_leaves_a_daemon_that_starts_again() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        let store = daemon.root().join("metadata.db");
        for round in 0..5 {
            daemon.stop()?;
            // The next start creates the store afresh, and is stopped at once.
            std::fs::remove_file(&store)?;
            daemon.launch_starting()?;
            let status = daemon.stop()?;
            anyhow::ensure!(
                status.success(),
                "round {round}: SIGTERM exit status {status}"
            );
            daemon.launch()?;
        }
        Ok(())
    });
}
