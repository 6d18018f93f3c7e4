//! A daemon run as a systemd service keeps its lazy mounts' FUSE connections in systemd's fd
//! store instead of the fd holder: `READY=1` once it serves, each connection stored as it is
//! mounted, handed back by the next start (`LISTEN_FDS`) and taken over with the read that was
//! in flight, and removed from the store by `--shutdown`. systemd is not PID 1 here:
//! [`ServiceManager`] is the part of it that does this.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::binary;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::handover::{drop_caches, shoal_mounts_under};
use crate::keeper::{Keeper, READ_TIMEOUT};
use crate::lazy::{data_image, ensure_all_lazy, sums, Stack};
use crate::process;
use crate::proxy::Fault;
use crate::service_manager::ServiceManager;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn under_systemd_connections_wait_in_its_fd_store_across_a_kill() {
    privileged!();
    Fixture::run(|fixture| {
        let manager = Arc::new(ServiceManager::bind(&fixture.path("notify.sock"), 64)?);
        let holder_socket = fixture.path("run/fdholder.sock");
        let mut stack = Stack::start_with(fixture, "", |daemon| {
            daemon.set_service_manager(manager.clone())
        })?;
        wait_until("READY=1 from the daemon", WAIT, || Ok(manager.ready() == 1))?;

        let files: Vec<(String, usize)> = (0..3).map(|i| (format!("f{i}"), 1280 << 10)).collect();
        let files: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let (layers, expected) = data_image(&files)?;
        let image = stack.publish(fixture, "systemd", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        let keeper = Keeper::start(&stack.ctd, &image.estargz, "keeper")?;
        let mounts = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(mounts == 2, "{mounts} FUSE mounts, expected 2");
        let stored = manager.stored();
        anyhow::ensure!(
            stored.len() == 2 && stored.iter().all(|name| name.ends_with("/fs")),
            "systemd's store holds {stored:?}, expected the two layers' mountpoints"
        );
        anyhow::ensure!(
            !holder_socket.exists(),
            "an fd holder was started beside systemd's fd store"
        );

        // A read held in flight by the stalled registry while the daemon is killed.
        drop_caches()?;
        let proxy = stack.registry.proxy();
        proxy.inject("/blobs/", Fault::Stall);
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let reader = keeper.start_sums("read", &paths)?;
        wait_until("a read held by the stalled registry", READ_TIMEOUT, || {
            Ok(proxy.stats().values().any(|s| s.faulted > 0))
        })?;
        stack.daemon.kill()?;
        proxy.clear_faults();
        stack.daemon.launch()?;
        let out = reader.finish().context("the read across the kill")?;
        anyhow::ensure!(sums(&out) == expected, "read {out}, expected {expected:#?}");
        wait_until("READY=1 from the second daemon", WAIT, || {
            Ok(manager.ready() == 2)
        })?;

        let log = stack.daemon.log();
        let carried = log
            .matches("layer carried over from an earlier daemon")
            .count();
        anyhow::ensure!(carried == 2, "{carried} layers carried over, expected 2");
        anyhow::ensure!(
            !log.contains("read failed"),
            "a read failed across the kill"
        );
        anyhow::ensure!(
            log.contains("systemd's fd store"),
            "the daemon does not say it keeps its connections in systemd's fd store"
        );
        let after = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(
            after == 2,
            "{after} FUSE mounts after the restart, 2 before"
        );
        anyhow::ensure!(
            manager.stored().len() == 2,
            "systemd's store holds {:?} after the restart",
            manager.stored()
        );

        // `--shutdown` ends the mounts and empties the store.
        let mut shutdown = std::process::Command::new(binary::daemon()?);
        shutdown
            .arg("--config")
            .arg(stack.daemon.config())
            .arg("--shutdown");
        process::run(&mut shutdown, WAIT).context("shoal-snapshotter --shutdown")?;
        wait_until("the daemon's exit", WAIT, || {
            Ok(!stack.daemon.is_running()?)
        })?;
        wait_until("systemd's store to be emptied", WAIT, || {
            Ok(manager.stored().is_empty())
        })?;
        let left = shoal_mounts_under(stack.daemon.root())?;
        anyhow::ensure!(left == 0, "{left} FUSE mounts left after --shutdown");
        drop(keeper);
        Ok(())
    });
}
