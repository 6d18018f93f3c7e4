//! The shoal-snapshotter daemon under test: configured inside the fixture, started, stopped
//! with SIGTERM, killed with SIGKILL, restarted.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;

use crate::binary;
use crate::client::Snapshots;
use crate::fixture::{wait_until, Fixture};
use crate::process::Process;
use crate::service_manager::ServiceManager;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Daemon {
    binary: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// Searched before the test's own `PATH` for the tools the daemon runs (a test's shim).
    path_prefix: Option<PathBuf>,
    /// Started as this manager's service (systemd's part in it), when set.
    service_manager: Option<std::sync::Arc<ServiceManager>>,
    process: Option<Process>,
}

impl Daemon {
    /// Configures a daemon rooted in the fixture and starts it.
    pub fn start(fixture: &Fixture) -> Result<Daemon> {
        let mut daemon = Daemon::configure(fixture)?;
        daemon.launch()?;
        Ok(daemon)
    }

    /// Configures a daemon that reaches `hosts` (`host:port`) over plain HTTP, and starts it.
    pub fn start_plain_http(fixture: &Fixture, hosts: &[&str]) -> Result<Daemon> {
        let extra: String = hosts
            .iter()
            .map(|host| format!("\n[registry.hosts.\"{host}\"]\nplain_http = true\n"))
            .collect();
        let mut daemon = Daemon::configure_with(fixture, &extra)?;
        daemon.launch()?;
        Ok(daemon)
    }

    /// Writes the daemon's configuration without starting it.
    pub fn configure(fixture: &Fixture) -> Result<Daemon> {
        Daemon::configure_with(fixture, "")
    }

    /// [`Daemon::configure`] with `extra` TOML appended to the configuration.
    pub fn configure_with(fixture: &Fixture, extra: &str) -> Result<Daemon> {
        let binary = binary::daemon()?;
        let root = fixture.path("shoal");
        // The daemon must create the socket's directory itself.
        let socket = fixture.path("run/shoal.sock");
        let config = fixture.path("shoal.toml");
        let mut text = format!(
            "root = \"{}\"\nsocket = \"{}\"\n\n[log]\nlevel = \"debug\"\n{extra}",
            root.display(),
            socket.display()
        );
        // Each test's daemons keep their connections in a holder of the test's own.
        if !extra.contains("[handover]") {
            text.push_str(&format!(
                "\n[handover]\nholder_socket = \"{}\"\n",
                fixture.path("run/fdholder.sock").display()
            ));
        }
        fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let log = fixture.path("shoal-snapshotter.log");
        fixture.register_log("shoal-snapshotter", &log);
        Ok(Daemon {
            binary,
            root,
            socket,
            config,
            log,
            path_prefix: None,
            service_manager: None,
            process: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The configuration file, which `shoal --config` accepts too.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Everything every run of this daemon has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|err| format!("<unreadable log: {err}>"))
    }

    /// From the next launch on, the daemon is the program at `binary` (another build of it).
    pub fn set_binary(&mut self, binary: PathBuf) {
        self.binary = binary;
    }

    /// From the next launch on, tools the daemon runs by name are looked up in `dir` first.
    pub fn set_path_prefix(&mut self, dir: Option<PathBuf>) {
        self.path_prefix = dir;
    }

    /// From the next launch on, the daemon starts as `manager`'s service, as systemd starts
    /// one: with its notify socket and the fds its store holds.
    pub fn set_service_manager(&mut self, manager: std::sync::Arc<ServiceManager>) {
        self.service_manager = Some(manager);
    }

    /// Spawns the daemon, as a service when a manager is set, logging to `log`.
    fn spawn(&self, log: &Path) -> Result<Process> {
        match &self.service_manager {
            None => Process::spawn("shoal-snapshotter", &mut self.command(), log),
            Some(manager) => {
                let (mut service, copies) = manager.service_command(&self.command())?;
                let process = Process::spawn("shoal-snapshotter", &mut service, log);
                drop(copies);
                process
            }
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--config").arg(&self.config);
        if let Some(dir) = &self.path_prefix {
            let path =
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            command.env("PATH", format!("{}:{path}", dir.display()));
        }
        command
    }

    /// Spawns the daemon and waits until its socket accepts connections.
    pub fn launch(&mut self) -> Result<()> {
        anyhow::ensure!(self.process.is_none(), "the daemon is already running");
        let process = self.spawn(&self.log)?;
        let process = self.process.insert(process);
        let socket = self.socket.clone();
        wait_until("the daemon's socket", START_TIMEOUT, || {
            if let Some(status) = process.try_status()? {
                anyhow::bail!("shoal-snapshotter exited during start-up ({status})");
            }
            Ok(UnixStream::connect(&socket).is_ok())
        })
        .with_context(|| format!("start shoal-snapshotter; its log:\n{}", process.log()))
    }

    /// Spawns the daemon and returns once it holds its root's lock: it has its signal handlers
    /// and is still starting (it opens its store and binds its socket after that).
    pub fn launch_starting(&mut self) -> Result<()> {
        anyhow::ensure!(self.process.is_none(), "the daemon is already running");
        let process = self.spawn(&self.log)?;
        let process = self.process.insert(process);
        let lock = self.root.join("shoal.lock");
        wait_until("the daemon to lock its root", START_TIMEOUT, || {
            if let Some(status) = process.try_status()? {
                anyhow::bail!("shoal-snapshotter exited during start-up ({status})");
            }
            Ok(held(&lock))
        })
        .with_context(|| format!("start shoal-snapshotter; its log:\n{}", process.log()))
    }

    /// SIGTERM, then waits for the exit; returns its status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut process = self.process.take().context("the daemon is not running")?;
        process.signal(Signal::SIGTERM)?;
        process
            .wait_timeout(STOP_TIMEOUT)?
            .with_context(|| format!("shoal-snapshotter ignored SIGTERM for {STOP_TIMEOUT:?}"))
    }

    /// Sends `sig` to the running daemon.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        self.process
            .as_mut()
            .context("the daemon is not running")?
            .signal(sig)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) -> Result<()> {
        let mut process = self.process.take().context("the daemon is not running")?;
        process.kill()?;
        Ok(())
    }

    /// Whether the daemon is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> Result<bool> {
        match self.process.as_mut() {
            Some(process) => Ok(process.try_status()?.is_none()),
            None => Ok(false),
        }
    }

    /// Runs another daemon with this configuration and waits (bounded) for it to exit, as it
    /// should when it refuses to start; returns its status and output.
    pub fn run_expecting_exit(&self, fixture: &Fixture, tag: &str) -> Result<(ExitStatus, String)> {
        let log = fixture.path(&format!("shoal-snapshotter-{tag}.log"));
        fixture.register_log(&format!("shoal-snapshotter ({tag})"), &log);
        let mut process = self.spawn(&log)?;
        match process.wait_timeout(START_TIMEOUT)? {
            Some(status) => Ok((status, process.log())),
            None => anyhow::bail!(
                "shoal-snapshotter ({tag}) was expected to refuse to start but still runs after \
                 {START_TIMEOUT:?}; its log:\n{}",
                process.log()
            ),
        }
    }

    pub fn client(&self) -> Result<Snapshots> {
        Snapshots::connect(&self.socket)
    }

    /// Every `<root>/snapshots/<id>/fs` directory.
    pub fn snapshot_dirs(&self) -> Result<Vec<PathBuf>> {
        let base = self.root.join("snapshots");
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&base).with_context(|| format!("read {}", base.display()))? {
            let fs_dir = entry?.path().join("fs");
            if fs_dir.is_dir() {
                dirs.push(fs_dir);
            }
        }
        dirs.sort();
        Ok(dirs)
    }
}

/// Whether someone holds the `flock` on `path` (a daemon's root lock).
fn held(path: &Path) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_unlocked_on_drop) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}
