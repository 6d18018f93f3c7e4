//! overlaybd images end to end: the real overlaybd-converted hello-world image (made by the
//! reference converter, kept in the shared fixtures) is pushed to the loopback registry, pulled
//! with `shoal rpull` (every layer a remote snapshot, nothing downloaded up front) and run on
//! Shoal: its merged virtual disk is served over FUSE, loop-mounted read-only, and the container
//! prints its greeting. Removing the image releases the loop device; a restarted daemon mounts
//! the disk again without the registry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::process;
use crate::registry::Registry;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const FIXTURE_LAYOUT: &str = "/work/shared/fixtures/overlaybd/hello-world";
const FIXTURE_TAG: &str = "amd64-converted";
const GREETING: &str = "Hello from Docker!";

/// A registry (behind the counting proxy), the daemon, and containerd using it as `shoal`.
struct Stack {
    registry: Registry,
    daemon: Daemon,
    ctd: Containerd,
}

impl Stack {
    fn start(fixture: &Fixture) -> Result<Stack> {
        let registry = Registry::start(fixture)?;
        let extra = format!(
            "\n[registry.hosts.\"{}\"]\nplain_http = true\n",
            registry.host()
        );
        let mut daemon = Daemon::configure_with(fixture, &extra)?;
        daemon.launch()?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            ..containerd::Options::default()
        };
        let ctd = Containerd::start(fixture, &options)?;
        Ok(Stack {
            registry,
            daemon,
            ctd,
        })
    }

    /// Copies the OCI layout `layout` tagged `tag` to `test/<name>:latest`, digests preserved.
    fn push_layout(&self, layout: &Path, tag: &str, name: &str) -> Result<String> {
        let reference = format!("{}/test/{name}:latest", self.registry.host());
        let mut command = Command::new("skopeo");
        command
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"));
        process::run(&mut command, TOOL_TIMEOUT).context("push the image with skopeo")?;
        Ok(reference)
    }

    fn rpull(&self, reference: &str) -> Result<String> {
        let mut command = Command::new(binary::cli()?);
        command
            .arg("--config")
            .arg(self.daemon.config())
            .arg("rpull")
            .arg("--address")
            .arg(self.ctd.address())
            .args(["-n", self.ctd.namespace(), "--plain-http", reference]);
        process::run(&mut command, TOOL_TIMEOUT)
    }

    /// `ctr run --rm` on Shoal of `reference` with its own command line: the container's stdout.
    fn run_default(&self, reference: &str, id: &str) -> Result<String> {
        self.ctd
            .ctr(&["run", "--rm", "--snapshotter", "shoal", reference, id])
    }

    /// Body bytes the registry sent for layer blobs since the proxy was last reset.
    fn blob_bytes(&self) -> u64 {
        self.registry.proxy().response_bytes_for("/blobs/")
    }
}

/// Loop devices whose backing file lies under `root`.
fn loops_under(root: &Path) -> Result<Vec<String>> {
    let out = process::run(
        Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]),
        Duration::from_secs(30),
    )?;
    let root = root.to_string_lossy().into_owned();
    Ok(out
        .lines()
        .filter(|line| line.contains(&root))
        .map(str::to_owned)
        .collect())
}

/// A copy of the read-only shared fixture, so tools never write next to it.
fn fixture_layout(fixture: &Fixture) -> Result<std::path::PathBuf> {
    let copy = fixture.path("hello-world-layout");
    let status = Command::new("cp")
        .arg("-r")
        .arg(FIXTURE_LAYOUT)
        .arg(&copy)
        .status()
        .context("copy the fixture layout")?;
    anyhow::ensure!(status.success(), "cp -r {FIXTURE_LAYOUT} failed");
    Ok(copy)
}

#[test]
fn reference_converted_hello_world_runs_lazily_and_survives_a_restart() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        let layout = fixture_layout(fixture)?;
        let reference = stack.push_layout(&layout, FIXTURE_TAG, "obd-hello")?;

        stack.registry.proxy().reset();
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(
            out.contains("1 layers, 1 lazy"),
            "the overlaybd layer is not mounted lazily: {out}"
        );
        // 642,560-byte layer: only the tar header, ZFile header/trailer/jump table and the
        // LSMT header/trailer/index blocks were read (whole cache blocks of them).
        let pulled = stack.blob_bytes();
        eprintln!("rpull fetched {pulled} layer bytes");

        let out = stack.run_default(&reference, "obd-hello-1")?;
        anyhow::ensure!(out.contains(GREETING), "no greeting: {out}");
        let root = stack.daemon.root().to_owned();
        anyhow::ensure!(
            !loops_under(&root)?.is_empty(),
            "no loop device backs the mounted virtual disk"
        );

        // A restarted daemon mounts the disk again from its persisted metadata alone.
        stack.daemon.stop()?;
        stack.registry.proxy().reset();
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        let out = stack.run_default(&reference, "obd-hello-2")?;
        anyhow::ensure!(out.contains(GREETING), "no greeting after restart: {out}");
        let manifests = stack.registry.proxy().response_bytes_for("/manifests/");
        anyhow::ensure!(
            manifests == 0,
            "the restart asked the registry for manifests ({manifests} bytes)"
        );

        // Removing the image lets containerd remove the snapshots: loop devices are released.
        stack.ctd.ctr(&["images", "rm", "--sync", &reference])?;
        wait_until("loop devices released", Duration::from_secs(30), || {
            Ok(loops_under(&root)?.is_empty())
        })?;
        Ok(())
    })
}
