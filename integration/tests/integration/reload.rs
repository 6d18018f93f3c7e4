//! Reloading a running daemon: SIGHUP and `shoal reload` apply what can change, name what
//! needs a restart, and keep the old configuration when the new one is invalid.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::binary;
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};

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
