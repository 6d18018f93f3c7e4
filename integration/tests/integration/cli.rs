//! The `shoal` command line: `version`, and `status` against a running and a stopped daemon.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::binary;
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::process;

fn shoal(args: &[&str]) -> Result<String> {
    process::run(
        Command::new(binary::cli()?).args(args),
        Duration::from_secs(30),
    )
}

#[test]
fn version_prints_the_package_version() {
    Fixture::run(|_| {
        let out = shoal(&["version"])?;
        let version = env!("CARGO_PKG_VERSION");
        anyhow::ensure!(
            out.contains(version),
            "`shoal version` printed {out:?}, expected {version}"
        );
        Ok(())
    });
}

#[test]
fn status_reports_reachability_and_snapshot_count() {
    privileged!();
    Fixture::run(|fixture| {
        let mut daemon = Daemon::start(fixture)?;
        let api = daemon.client()?;
        api.prepare("one-active", "")?;
        api.commit("one", "one-active")?;
        api.prepare("two", "one")?;
        api.view("three", "one")?;
        let socket = daemon.socket().to_string_lossy().into_owned();
        let out = shoal(&["--socket", &socket, "status"])?;
        let lower = out.to_lowercase();
        anyhow::ensure!(
            lower.contains("running") && out.contains(&socket),
            "status does not report the daemon running at {socket}: {out}"
        );
        anyhow::ensure!(
            lower
                .lines()
                .any(|line| line.contains("snapshots") && line.contains(" 3 ")),
            "status does not count 3 snapshots: {out}"
        );
        anyhow::ensure!(
            lower.contains("disk"),
            "status does not report disk use: {out}"
        );
        // No metrics listener configured: said, with the setting to add.
        anyhow::ensure!(
            out.contains("details:    none") && out.contains("[metrics] address"),
            "status does not say where the details went: {out}"
        );

        // A typo in the config file since the daemon started: the status still shows it.
        let typo = fixture.path("typo.toml");
        std::fs::write(&typo, "[cache]\ncapacty = \"1GiB\"\n")?;
        let typo = typo.to_string_lossy().into_owned();
        let out = shoal(&["--config", &typo, "--socket", &socket, "status"])?;
        anyhow::ensure!(
            out.contains(&format!("running at {socket}")),
            "status with a broken config: {out}"
        );

        // A reader that went away (`shoal status | head`) ends the CLI quietly by SIGPIPE,
        // not with a panic: its stdout is a pipe whose reading end is already closed.
        let (reader, writer) = nix::unistd::pipe()?;
        drop(reader);
        let exited = Command::new(binary::cli()?)
            .args(["--socket", &socket, "status"])
            .stdout(std::process::Stdio::from(writer))
            .stderr(std::process::Stdio::piped())
            .output()?;
        use std::os::unix::process::ExitStatusExt;
        anyhow::ensure!(
            exited.status.signal() == Some(nix::sys::signal::Signal::SIGPIPE as i32),
            "shoal status into a closed pipe: {:?}, {}",
            exited.status,
            String::from_utf8_lossy(&exited.stderr)
        );

        daemon.stop()?;
        let down = shoal(&["--socket", &socket, "status"]);
        let unreachable = match &down {
            Err(_) => true,
            Ok(out) => {
                out.to_lowercase().contains("unreachable")
                    || out.to_lowercase().contains("not reachable")
            }
        };
        anyhow::ensure!(unreachable, "status of a stopped daemon: {down:?}");
        Ok(())
    });
}
