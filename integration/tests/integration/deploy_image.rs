//! The DaemonSet's image (`scripts/build-image.sh`), built once per test run from this run's
//! binaries, run under a real containerd as `deploy/kubernetes/shoal.yaml` runs it: the fd
//! holder and the daemon in containers of their own, privileged, on the host network, with the
//! host's containerd socket, the daemon's root, its run directory and /dev/fuse mounted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::client::Snapshots;
use crate::containerd::{self, Containerd};
use crate::fixture::{loopback_addr, privileged, wait_until, Fixture};
use crate::metrics::get_answer;
use crate::process;

/// The image's name once imported.
pub const IMAGE: &str = "localhost/shoal:0.1.0";
/// A first build strips three debug binaries and packs them (later runs reuse it).
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds the image from the binaries this test run uses into `target/image-test/` (skipped
/// by the script when nothing changed), once per test process; the OCI archive's path.
pub fn archive() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow::anyhow!("build the image: {err}"))
}

fn build() -> Result<PathBuf> {
    let cli = binary::cli()?;
    let profile = cli.parent().context("the CLI has no directory")?;
    let target = profile.parent().context("no target directory")?;
    let out = target.join("image-test");
    let archive = out.join("shoal.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-image.sh");
    let mut command = Command::new("bash");
    command
        .arg(script)
        .arg("--from")
        .arg(profile)
        .arg("--out")
        .arg(out.join("oci"))
        .arg("--archive")
        .arg(&archive);
    process::run(&mut command, BUILD_TIMEOUT)?;
    Ok(archive)
}

/// Imports the image into `ctd` (as [`IMAGE`], unpacked with overlayfs).
pub fn import(ctd: &Containerd) -> Result<()> {
    let archive = archive()?;
    let archive = archive.to_string_lossy();
    ctd.ctr(&[
        "images",
        "import",
        "--base-name",
        "localhost/shoal",
        &archive,
    ])?;
    Ok(())
}

/// `--mount` for a host directory at the same path inside (the manifest's hostPath volumes
/// are mounted where the host has them, so paths containerd reports work inside too).
fn same_path(dir: &Path, options: &str) -> String {
    format!(
        "type=bind,src={0},dst={0},options=rbind:{options}",
        dir.display()
    )
}

#[test]
fn the_image_runs_the_daemon_and_holder_under_containerd_and_serves() {
    privileged!();
    Fixture::run(|fixture| {
        let run = fixture.mkdir("run")?;
        let root = fixture.mkdir("shoal")?;
        let etc = fixture.mkdir("etc")?;
        let socket = run.join("shoal.sock");
        let holder = run.join("fdholder.sock");
        let metrics = loopback_addr(9464);
        let config = etc.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\nsocket = \"{}\"\n[log]\nlevel = \"debug\"\n\
                 [metrics]\naddress = \"{metrics}\"\n[handover]\nholder_socket = \"{}\"\n",
                root.display(),
                socket.display(),
                holder.display()
            ),
        )?;
        let ctd = Containerd::start(
            fixture,
            &containerd::Options {
                shoal_socket: Some(socket.clone()),
                ..containerd::Options::default()
            },
        )?;
        import(&ctd)?;
        let containerd_dir = ctd.address().parent().context("no socket directory")?;
        let address = ctd.address().to_string_lossy().into_owned();

        // containerd lists the snapshotter, but no daemon answers: not ready.
        let unready = ctd.ctr(&[
            "run",
            "--rm",
            "--net-host",
            "--mount",
            &same_path(containerd_dir, "ro"),
            IMAGE,
            "probe-before",
            "shoal",
            "node-setup",
            "ready",
            "--address",
            &address,
        ]);
        let error = format!(
            "{:#}",
            unready.err().context("ready with no daemon running")?
        );
        anyhow::ensure!(error.contains("does not answer"), "{error}");

        let holder_log = fixture.path("holder-container.log");
        fixture.register_log("holder container", &holder_log);
        ctd.ctr(&[
            "run",
            "-d",
            "--privileged",
            "--net-host",
            "--log-uri",
            &format!("file://{}", holder_log.display()),
            "--mount",
            &same_path(&run, "rw"),
            IMAGE,
            "holder",
            "shoal-fdholder",
            "--socket",
            &holder.to_string_lossy(),
            "--idle-exit-secs",
            "0",
        ])?;
        let daemon_log = fixture.path("daemon-container.log");
        fixture.register_log("daemon container", &daemon_log);
        ctd.ctr(&[
            "run",
            "-d",
            "--privileged",
            "--net-host",
            "--log-uri",
            &format!("file://{}", daemon_log.display()),
            "--env",
            &format!("SHOAL_CONFIG={}", config.display()),
            "--env",
            &format!("HOLDER_SOCKET={}", holder.display()),
            "--env",
            &format!("HEALTH_URL=http://{metrics}/health"),
            "--mount",
            &same_path(&etc, "ro"),
            "--mount",
            &same_path(&root, "rshared:rw"),
            "--mount",
            &same_path(&run, "rw"),
            "--mount",
            &same_path(containerd_dir, "rw"),
            "--mount",
            "type=bind,src=/dev/fuse,dst=/dev/fuse,options=rbind:rw",
            IMAGE,
            "daemon",
        ])?;

        let serving = |what: &str| {
            wait_until(what, Duration::from_secs(60), || {
                Ok(Snapshots::connect(&socket)
                    .and_then(|client| {
                        client
                            .list(&[])
                            .map_err(|status| anyhow::anyhow!("{status}"))
                    })
                    .is_ok()
                    && get_answer(metrics, "/ready").is_ok_and(|(status, _)| status == 200))
            })
        };
        serving("the daemon's socket and /ready to answer")?;
        let ready = ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "ready-1",
            "daemon",
            "shoal",
            "node-setup",
            "ready",
            "--address",
            &address,
        ])?;
        anyhow::ensure!(ready.starts_with("ready: "), "{ready}");

        // It serves containerd: its own image unpacked into it, and run from it.
        let version = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            IMAGE,
            "from-shoal",
            "shoal",
            "--version",
        ])?;
        anyhow::ensure!(version.starts_with("shoal 0.1.0"), "{version}");

        // A daemon that dies is started again in the same container, which a new container
        // could not be (its snapshot would need the daemon).
        ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "kill-1",
            "daemon",
            "sh",
            "-c",
            "kill -9 $(pidof shoal-snapshotter)",
        ])?;
        wait_until(
            "the container to start the daemon again",
            Duration::from_secs(30),
            || {
                let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
                Ok(log.matches("started shoal-snapshotter").count() >= 2)
            },
        )?;
        serving("the restarted daemon to serve")?;
        let tasks = ctd.ctr(&["task", "ls"])?;
        let daemon_task = tasks
            .lines()
            .find(|line| line.starts_with("daemon "))
            .with_context(|| format!("no daemon task: {tasks}"))?;
        anyhow::ensure!(daemon_task.contains("RUNNING"), "{tasks}");

        // SIGTERM to the container ends the daemon and the container.
        ctd.ctr(&["task", "kill", "--signal", "SIGTERM", "daemon"])?;
        wait_until(
            "the daemon container to stop",
            Duration::from_secs(60),
            || {
                let tasks = ctd.ctr(&["task", "ls"])?;
                Ok(tasks
                    .lines()
                    .any(|line| line.starts_with("daemon ") && line.contains("STOPPED")))
            },
        )?;
        let log = std::fs::read_to_string(&daemon_log)?;
        anyhow::ensure!(log.contains("shoal-run-daemon: stopped"), "{log}");
        Ok(())
    });
}
