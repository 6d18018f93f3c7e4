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
use crate::lazy;
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

/// Starts the fd holder's container as the `shoal-fdholder` DaemonSet runs it (`shoal-run-holder`,
/// on a host without systemd the holder itself), listening on `holder` (its directory mounted
/// at the same path).
fn start_holder(fixture: &Fixture, ctd: &Containerd, holder: &Path) -> Result<()> {
    let log = fixture.path("holder-container.log");
    fixture.register_log("holder container", &log);
    let run = holder
        .parent()
        .context("the holder socket has no directory")?;
    ctd.ctr(&[
        "run",
        "-d",
        "--privileged",
        "--net-host",
        "--log-uri",
        &format!("file://{}", log.display()),
        "--mount",
        &same_path(run, "rw"),
        "--env",
        &format!("HOLDER_SOCKET={}", holder.display()),
        IMAGE,
        "holder",
        "shoal-run-holder",
    ])?;
    Ok(())
}

/// Starts the fd holder's container, then the daemon's, as the two DaemonSets run them on a
/// node without systemd; the daemon container's log.
fn start_pods(fixture: &Fixture, ctd: &Containerd, mounts: &DaemonMounts) -> Result<PathBuf> {
    start_holder(fixture, ctd, mounts.holder)?;
    start_daemon(fixture, ctd, mounts)
}

/// The host paths the daemon's container gets, as the DaemonSet's volumes give them.
struct DaemonMounts<'a> {
    config: &'a Path,
    holder: &'a Path,
    root: &'a Path,
    run: &'a Path,
    health: std::net::SocketAddr,
}

/// Starts the daemon's container (`shoal-run-daemon`, the image's command) as container
/// `daemon`; its output goes to the returned log.
fn start_daemon(fixture: &Fixture, ctd: &Containerd, mounts: &DaemonMounts) -> Result<PathBuf> {
    let log = fixture.path("daemon-container.log");
    fixture.register_log("daemon container", &log);
    let etc = mounts
        .config
        .parent()
        .context("the config has no directory")?;
    let containerd_dir = ctd.address().parent().context("no socket directory")?;
    ctd.ctr(&[
        "run",
        "-d",
        "--privileged",
        "--net-host",
        "--log-uri",
        &format!("file://{}", log.display()),
        "--env",
        &format!("SHOAL_CONFIG={}", mounts.config.display()),
        "--env",
        &format!("HOLDER_SOCKET={}", mounts.holder.display()),
        "--env",
        &format!("HEALTH_URL=http://{}/health", mounts.health),
        // The watchdog's pace shortened for the test (the manifest keeps 10 s and 6 checks).
        "--env",
        "HEALTH_INTERVAL=1",
        "--env",
        "HEALTH_FAILURES=2",
        "--env",
        "STOP_GRACE=2",
        "--env",
        "START_GRACE=3",
        "--mount",
        &same_path(etc, "ro"),
        // Bidirectional, as containerd's CRI sets it up: the FUSE mounts the daemon makes
        // reach the host's containerd.
        "--rootfs-propagation",
        "rshared",
        "--mount",
        &same_path(mounts.root, "rshared:rw"),
        "--mount",
        &same_path(mounts.run, "rw"),
        "--mount",
        &same_path(containerd_dir, "rw"),
        "--mount",
        "type=bind,src=/dev/fuse,dst=/dev/fuse,options=rbind:rw",
        IMAGE,
        "daemon",
    ])?;
    Ok(log)
}

/// Waits until the daemon answers at `socket` and `/ready` at `metrics`.
fn wait_serving(what: &str, socket: &Path, metrics: std::net::SocketAddr) -> Result<()> {
    wait_until(what, Duration::from_secs(60), || {
        let listed = Snapshots::connect(socket).and_then(|client| {
            client
                .list(&[])
                .map_err(|status| anyhow::anyhow!("{status}"))
        });
        Ok(listed.is_ok() && get_answer(metrics, "/ready").is_ok_and(|(status, _)| status == 200))
    })
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
        let address = ctd.address().to_string_lossy().into_owned();

        // containerd lists the snapshotter, but no daemon answers: not ready (the image's
        // CLI is this run's, asked from here).
        let unready = process::run(
            Command::new(binary::cli()?)
                .args(["node-setup", "ready", "--address"])
                .arg(ctd.address()),
            Duration::from_secs(30),
        );
        let error = format!(
            "{:#}",
            unready.err().context("ready with no daemon running")?
        );
        anyhow::ensure!(error.contains("does not answer"), "{error}");

        // The pod's `containerd-config` container, started before the daemon: it must wait
        // for it before touching containerd's config (restarting containerd is recorded).
        let host_etc = fixture.mkdir("host-etc-containerd")?;
        std::fs::write(host_etc.join("config.toml"), "version = 2\n")?;
        let switch_log = fixture.path("containerd-config-container.log");
        fixture.register_log("containerd-config container", &switch_log);
        ctd.ctr(&[
            "run",
            "-d",
            "--log-uri",
            &format!("file://{}", switch_log.display()),
            "--mount",
            &same_path(&run, "rw"),
            "--mount",
            &format!(
                "type=bind,src={},dst=/host/etc/containerd,options=rbind:rw",
                host_etc.display()
            ),
            "--env",
            &format!("SHOAL_SOCKET={}", socket.display()),
            "--env",
            "RESTART_CONTAINERD=echo restarted >> /host/etc/containerd/restarts",
            IMAGE,
            "containerd-config",
            "shoal-node-setup",
            "containerd",
        ])?;
        wait_until(
            "the containerd-config container to wait for the daemon",
            Duration::from_secs(30),
            || {
                let log = std::fs::read_to_string(&switch_log).unwrap_or_default();
                Ok(log.contains("waiting for the daemon"))
            },
        )?;
        anyhow::ensure!(
            !host_etc.join("restarts").exists(),
            "containerd restarted before the daemon answered"
        );
        let daemon_log = start_pods(
            fixture,
            &ctd,
            &DaemonMounts {
                config: &config,
                holder: &holder,
                root: &root,
                run: &run,
                health: metrics,
            },
        )?;
        let serving = |what: &str| wait_serving(what, &socket, metrics);
        serving("the daemon's socket and /ready to answer")?;
        wait_until(
            "the containerd-config container to switch containerd",
            Duration::from_secs(30),
            || Ok(host_etc.join("restarts").exists()),
        )?;
        let switched = std::fs::read_to_string(host_etc.join("config.toml"))?;
        anyhow::ensure!(switched.contains("snapshotter = \"shoal\""), "{switched}");
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

        // It serves containerd: its own image unpacked into it, and run from it. containerd
        // dialed the socket at its start, before any daemon answered, and redials with a
        // growing backoff (grpc's, up to 120 s): the run is tried until it gets through.
        let mut version = String::new();
        wait_until(
            "containerd to reach the daemon",
            Duration::from_secs(150),
            || {
                version = ctd.ctr(&[
                    "run",
                    "--rm",
                    "--snapshotter",
                    "shoal",
                    IMAGE,
                    "from-shoal",
                    "shoal",
                    "--version",
                ])?;
                Ok(true)
            },
        )?;
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

        // A daemon that stops answering /health (stopped, as a hung one would be) is killed
        // and started again, in the same container.
        ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "stop-1",
            "daemon",
            "sh",
            "-c",
            "kill -STOP $(pidof shoal-snapshotter)",
        ])?;
        wait_until(
            "the watchdog to restart the hung daemon",
            Duration::from_secs(60),
            || {
                let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
                Ok(log.contains("times in a row; restarting the daemon")
                    && log.matches("started shoal-snapshotter").count() >= 3)
            },
        )?;
        serving("the daemon started after the hang to serve")?;
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

#[test]
fn a_lazy_image_runs_from_the_containerized_daemon() {
    privileged!();
    Fixture::run(|fixture| {
        // The registry, containerd and an eStargz image, published with the suite's own daemon,
        // which then stops and leaves its root to the image's.
        let mut stack = lazy::Stack::start(fixture, "")?;
        let (layers, expected) = lazy::data_image(&[("blob", 3 << 20)])?;
        let published = stack.publish(fixture, "in-image", &layers)?;
        stack.daemon.stop()?;
        import(&stack.ctd)?;

        let root = stack.daemon.root().to_owned();
        let socket = stack.daemon.socket().to_owned();
        let run = socket.parent().context("no socket directory")?.to_owned();
        // A holder of the containers' own, beside any the suite's daemon left.
        let holder = run.join("holder-image.sock");
        let metrics = loopback_addr(9464);
        let etc = fixture.mkdir("image-etc")?;
        let config = etc.join("config.toml");
        let text = std::fs::read_to_string(stack.daemon.config())?;
        let text = text.replace(
            &fixture.path("run/fdholder.sock").display().to_string(),
            &holder.display().to_string(),
        );
        std::fs::write(
            &config,
            format!("{text}\n[metrics]\naddress = \"{metrics}\"\n"),
        )?;
        // What kubelet needs for Bidirectional propagation: the host's side is a shared mount.
        let root_arg = root.to_string_lossy().into_owned();
        process::run(
            Command::new("mount").args(["--bind", &root_arg, &root_arg]),
            Duration::from_secs(30),
        )?;
        process::run(
            Command::new("mount").args(["--make-shared", &root_arg]),
            Duration::from_secs(30),
        )?;

        start_pods(
            fixture,
            &stack.ctd,
            &DaemonMounts {
                config: &config,
                holder: &holder,
                root: &root,
                run: &run,
                health: metrics,
            },
        )?;
        wait_serving("the image's daemon to serve", &socket, metrics)?;

        // containerd dialed the suite's daemon at its start and redials with a backoff that
        // grows while no daemon answers (grpc's, up to 120 s): the pull is tried again
        // until containerd's connection reaches the image's daemon.
        let mut pulled = String::new();
        wait_until(
            "containerd to reach the image's daemon",
            Duration::from_secs(150),
            || {
                pulled = stack.rpull(&published.estargz)?;
                Ok(true)
            },
        )?;
        anyhow::ensure!(
            pulled.contains(&format!(
                "{} layers, {} lazy",
                published.layers.len(),
                published.layers.len()
            )),
            "not every layer mounted lazily: {pulled}"
        );
        let out = stack.run(&published.estargz, "lazy-in-image", "sha256sum /data/blob")?;
        assert_eq!(
            lazy::sums(&out),
            expected,
            "the container reads the right bytes"
        );
        Ok(())
    });
}
