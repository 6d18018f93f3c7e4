//! Reloading a running daemon: SIGHUP and `shoal reload` apply what can change, name what
//! needs a restart, and keep the old configuration when the new one is invalid.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

use crate::binary;
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{data_image, ensure_all_lazy, ensure_sums, mountpoints_of, Stack};

#[test]
fn sighup_reloads_and_an_invalid_file_keeps_the_old_config() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        let original = std::fs::read_to_string(daemon.config())?;
        let changed = format!(
            "{}\n[cache]\ncapacity = \"512MiB\"\nblock_size = \"4MiB\"\n",
            original.replace("level = \"debug\"", "level = \"info\"")
        );
        std::fs::write(daemon.config(), &changed)?;
        daemon.signal(Signal::SIGHUP)?;
        wait_until("the reload's log line", Duration::from_secs(20), || {
            Ok(daemon.log().contains("config reloaded"))
        })?;
        let log = daemon.log();
        let line = log
            .lines()
            .find(|line| line.contains("config reloaded"))
            .context("no reload line")?;
        anyhow::ensure!(
            line.contains("changed=log.level,cache.capacity")
                && line.contains("restart_needed=cache.block_size"),
            "{line}"
        );
        anyhow::ensure!(daemon.is_running()?, "SIGHUP ended the daemon");
        daemon.client()?.prepare("after-hup", "")?;

        std::fs::write(daemon.config(), format!("{changed}bogus = 1\n"))?;
        let output = Command::new(binary::cli()?)
            .arg("--socket")
            .arg(daemon.socket())
            .arg("reload")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(
            !output.status.success(),
            "rejected reload exited 0: {stderr}"
        );
        anyhow::ensure!(
            stderr.contains("rejected") && stderr.contains("bogus"),
            "{stderr}"
        );
        anyhow::ensure!(daemon.is_running()?, "a rejected reload ended the daemon");
        anyhow::ensure!(daemon.log().contains("config reload rejected"));
        daemon.client()?.prepare("after-rejection", "")?;
        anyhow::ensure!(
            !daemon.log().contains('\u{1b}'),
            "the daemon's log file has ANSI escapes"
        );
        daemon.stop()?;
        Ok(())
    });
}

#[test]
fn check_config_and_version_name_the_field_and_the_commit() {
    Fixture::run(|fixture| {
        let good = fixture.path("good.toml");
        std::fs::write(&good, "[cache]\ncapacity = \"1GiB\"\n")?;
        let bad = fixture.path("bad.toml");
        std::fs::write(&bad, "[cache]\nblock_size = \"3KiB\"\n")?;
        let run = |file: &std::path::Path| {
            Command::new(binary::daemon()?)
                .arg("--check-config")
                .arg(file)
                .output()
                .context("run --check-config")
        };
        anyhow::ensure!(run(&good)?.status.success(), "a valid file was refused");
        let refused = run(&bad)?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        anyhow::ensure!(
            !refused.status.success() && stderr.contains("cache.block_size"),
            "{stderr}"
        );
        for binary in [binary::daemon()?, binary::cli()?] {
            let out = Command::new(&binary).arg("--version").output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let expected = format!("shoal {} (", env!("CARGO_PKG_VERSION"));
            anyhow::ensure!(
                text.starts_with(&expected) && text.trim_end().ends_with(')'),
                "{text}"
            );
        }
        Ok(())
    });
}

/// The kernel's id of the mount at `mountpoint` (`/proc/self/mountinfo`): a remount has another.
fn mount_id(mountpoint: &Path) -> Result<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let target = mountpoint.to_string_lossy();
    // The topmost mount there is the last one listed.
    info.lines()
        .rev()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .find(|fields| fields.len() > 4 && fields[4] == target)
        .map(|fields| fields[0].to_owned())
        .with_context(|| format!("nothing is mounted at {target}"))
}

/// A reload under a live lazy mount: a reader holding a file of the mounted layer open reads
/// the right bytes on both sides of it, the layer is neither remounted nor given the new
/// prefetch, and the next layer mounted is (`fetch.background` turned on by the reload).
#[test]
fn a_reload_keeps_lazy_mounts_serving_and_applies_to_the_next_mount() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        let (layers, expected) = data_image(&[("big", 6 << 20)])?;
        let first = stack.publish(fixture, "before", &layers)?;
        ensure_all_lazy(&stack.rpull(&first.estargz)?, 2)?;
        let data_layer = &first.layers[1].digest;
        let mounted = mountpoints_of(&stack.daemon.log(), data_layer);
        let [mountpoint] = mounted.as_slice() else {
            anyhow::bail!("{data_layer} mounted at {mounted:?}");
        };
        let mounted_as = mount_id(mountpoint)?;

        // Half the file read through the lazy mount, the rest after the reload, one open file.
        let mut file = std::fs::File::open(mountpoint.join("data/big"))?;
        let mut hasher = Sha256::new();
        let mut half = vec![0u8; 3 << 20];
        file.read_exact(&mut half)?;
        hasher.update(&half);

        let config = std::fs::read_to_string(stack.daemon.config())?;
        std::fs::write(
            stack.daemon.config(),
            format!(
                "{}\n[fetch]\nbackground = true\nbackground_rate = \"64MiB\"\n",
                config.replace("level = \"debug\"", "level = \"info\"")
            ),
        )?;
        let reload = Command::new(binary::cli()?)
            .arg("--socket")
            .arg(stack.daemon.socket())
            .arg("reload")
            .output()?;
        let said = String::from_utf8_lossy(&reload.stdout);
        anyhow::ensure!(
            reload.status.success()
                && said.contains("changed: log.level, fetch.background, fetch.background_rate")
                && !said.contains("restart"),
            "shoal reload: {said}{}",
            String::from_utf8_lossy(&reload.stderr)
        );

        let mut rest = Vec::new();
        file.read_to_end(&mut rest)?;
        hasher.update(&rest);
        let sum = hex::encode(hasher.finalize());
        anyhow::ensure!(
            half.len() + rest.len() == 6 << 20 && sum == expected["/data/big"],
            "read {} bytes across the reload, sha256 {sum}",
            half.len() + rest.len()
        );
        anyhow::ensure!(
            mount_id(mountpoint)? == mounted_as
                && mountpoints_of(&stack.daemon.log(), data_layer).len() == 1,
            "the reload remounted {data_layer}"
        );
        ensure_sums(&stack, &first.estargz, "after-reload", &expected)?;

        // The next layer mounted takes the reloaded prefetch and is fetched whole unread.
        let (layers, expected) = data_image(&[("next", 2 << 20)])?;
        let second = stack.publish(fixture, "after", &layers)?;
        let out = stack.rpull(&second.estargz)?;
        let next_layer = &second.layers[1].digest;
        // rpull names a layer by its digest's short form.
        let short = &next_layer[..next_layer.len().min(19)];
        anyhow::ensure!(
            out.lines()
                .any(|line| line.contains(short) && line.contains(" lazy in ")),
            "{next_layer} not mounted lazily: {out}"
        );
        let fetched = |digest: &str| {
            let blob = format!("blob={digest} ");
            stack.daemon.log().lines().any(|line| {
                line.contains("layer fully fetched in the background") && line.contains(&blob)
            })
        };
        wait_until(
            "the next layer's background fetch",
            Duration::from_secs(60),
            || Ok(fetched(next_layer)),
        )?;
        anyhow::ensure!(
            !fetched(data_layer),
            "the layer mounted before the reload took its background fetch"
        );
        ensure_sums(&stack, &second.estargz, "next", &expected)?;
        Ok(())
    });
}
