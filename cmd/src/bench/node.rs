//! One cold run's private node: a containerd of its own (root, state and sockets under the
//! run's folder) and, for Shoal, a `shoal-snapshotter` of its own with an empty root, so that
//! nothing the user's containerd or Shoal cache holds makes a run warm. stargz-snapshotter is
//! either a private daemon as well (`--stargz-bin`) or the user's, reached at its socket as a
//! proxy plugin (`--stargz-socket`). Everything the run made in the
//! containerd namespace is removed and the namespace deleted before the node stops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::interrupt;

/// How long a daemon may take to answer after it started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping daemon gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A `ctr` call that only cleans up.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// The snapshotter a scenario pulls into and runs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshotter {
    /// containerd's own; the layers are downloaded and unpacked.
    Overlayfs,
    /// A private `shoal-snapshotter`.
    Shoal,
    /// stargz-snapshotter.
    Stargz(Stargz),
}

/// Which stargz-snapshotter a scenario uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stargz {
    /// The user's daemon at this socket (its cache is not the bench's).
    Socket(PathBuf),
    /// A private daemon of this binary (`--address`, `--root`) with an empty root.
    Private(PathBuf),
}

impl Snapshotter {
    /// Its name in containerd (and in the table).
    pub fn name(&self) -> &'static str {
        match self {
            Snapshotter::Overlayfs => "overlayfs",
            Snapshotter::Shoal => "shoal",
            Snapshotter::Stargz(_) => "stargz",
        }
    }
}

/// The binaries a node runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub shoal: PathBuf,
    pub shoal_snapshotter: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    /// stargz-snapshotter's `ctr-remote`, when on PATH: its `rpull` is containerd's own pull
    /// with unpack (layers unpacked as they arrive), the overlayfs baseline.
    pub ctr_remote: Option<PathBuf>,
}

/// A started node; [`Node::stop`] (or dropping it) cleans up after it.
pub struct Node {
    pub dir: PathBuf,
    pub namespace: String,
    pub snapshotter: Snapshotter,
    pub address: PathBuf,
    /// Shoal's config for the daemon and for `shoal rpull` (plain HTTP to the relay).
    pub shoal_config: PathBuf,
    binaries: Binaries,
    containerd: Option<Child>,
    /// The private snapshotter daemon (Shoal's, or stargz-snapshotter's).
    daemon: Option<Child>,
    stopped: bool,
}

impl Node {
    /// Starts the node under `dir` (which must not exist). `plain_http_host` is the relay's
    /// `host:port`, if any.
    pub fn start(
        dir: &Path,
        namespace: &str,
        snapshotter: Snapshotter,
        binaries: &Binaries,
        plain_http_host: Option<&str>,
    ) -> anyhow::Result<Node> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let shoal_config = dir.join("shoal.toml");
        let shoal_socket = dir.join("s.sock");
        let mut text = format!(
            "root = \"{}\"\nsocket = \"{}\"\n[handover]\nenabled = false\n",
            dir.join("shoal").display(),
            shoal_socket.display()
        );
        if let Some(host) = plain_http_host {
            text.push_str(&format!("[registry.hosts.\"{host}\"]\nplain_http = true\n"));
        }
        fs::write(&shoal_config, text).context("write the bench's Shoal config")?;
        let mut node = Node {
            dir: dir.to_owned(),
            namespace: namespace.to_owned(),
            address: dir.join("c.sock"),
            snapshotter,
            shoal_config,
            binaries: binaries.clone(),
            containerd: None,
            daemon: None,
            stopped: false,
        };
        let proxy = match &node.snapshotter {
            Snapshotter::Overlayfs => None,
            Snapshotter::Shoal => {
                let mut command = Command::new(&binaries.shoal_snapshotter);
                command.arg("--config").arg(&node.shoal_config);
                node.daemon = Some(spawn(&mut command, &dir.join("shoal.log"))?);
                node.wait_for("shoal-snapshotter", &dir.join("shoal.log"), |_| {
                    shoal_socket.exists()
                })?;
                Some(("shoal", shoal_socket.clone()))
            }
            Snapshotter::Stargz(Stargz::Private(binary)) => {
                let socket = dir.join("z.sock");
                let mut command = Command::new(binary);
                command
                    .arg("--address")
                    .arg(&socket)
                    .arg("--root")
                    .arg(dir.join("stargz"));
                node.daemon = Some(spawn(&mut command, &dir.join("stargz.log"))?);
                node.wait_for("stargz-snapshotter", &dir.join("stargz.log"), |_| {
                    socket.exists()
                })?;
                Some(("stargz", socket))
            }
            Snapshotter::Stargz(Stargz::Socket(socket)) => {
                if !socket.exists() {
                    bail!(
                        "no stargz-snapshotter socket at {} (--stargz-socket)",
                        socket.display()
                    );
                }
                Some(("stargz", socket.clone()))
            }
        };
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{grpc}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            grpc = node.address.display(),
            ttrpc = dir.join("t.sock").display(),
        );
        if let Some((name, socket)) = proxy {
            config.push_str(&format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        let config_path = dir.join("containerd.toml");
        fs::write(&config_path, config).context("write the bench's containerd config")?;
        let mut command = Command::new(&binaries.containerd);
        command.arg("--config").arg(&config_path);
        node.containerd = Some(spawn(&mut command, &dir.join("containerd.log"))?);
        node.wait_for("containerd", &dir.join("containerd.log"), |node| {
            node.ctr_quiet(&["version"]).is_ok()
        })?;
        Ok(node)
    }

    fn wait_for(
        &mut self,
        what: &str,
        log: &Path,
        ready: impl Fn(&Node) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            interrupt::check()?;
            if ready(self) {
                return Ok(());
            }
            let exited = [self.daemon.as_mut(), self.containerd.as_mut()]
                .into_iter()
                .flatten()
                .any(|child| matches!(child.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                bail!(
                    "{what} did not start{}; the end of {}:\n{}",
                    if exited {
                        " (it exited)"
                    } else {
                        " within 30 s"
                    },
                    log.display(),
                    log_tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr` against this node, in its namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binaries.ctr);
        command
            .arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs `ctr` to its end (bounded); its stdout, or an error with what it printed.
    pub fn ctr_quiet(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = self.ctr_command(args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = command.spawn().context("run ctr")?;
        let output = wait_output(child, CTR_TIMEOUT)?;
        if !output.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The pid whose CPU and memory a run reports: the process that did the snapshotting work
    /// (the private daemon; containerd, which unpacks for overlayfs); none for the user's
    /// stargz-snapshotter.
    pub fn daemon_pid(&self) -> Option<u32> {
        match self.snapshotter {
            Snapshotter::Overlayfs => self.containerd.as_ref().map(Child::id),
            _ => self.daemon.as_ref().map(Child::id),
        }
    }

    /// Removes everything the run made in its namespace (tasks, containers, images, leases,
    /// content, snapshots), deletes the namespace, stops the daemons and removes the folder.
    /// The first failure is returned after every step was tried.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        let mut first_error = None;
        if self.containerd.is_some() {
            if let Err(error) = self.empty_namespace() {
                first_error = Some(error);
            }
        }
        if let Err(error) = self.shut_down() {
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn empty_namespace(&self) -> anyhow::Result<()> {
        let snapshotter = self.snapshotter.name();
        for line in self.ctr_quiet(&["tasks", "ls", "-q"])?.lines() {
            let _ = self.ctr_quiet(&["tasks", "kill", "-s", "SIGKILL", line]);
            let _ = self.ctr_quiet(&["tasks", "delete", "--force", line]);
        }
        for line in self.ctr_quiet(&["containers", "ls", "-q"])?.lines() {
            self.ctr_quiet(&["containers", "delete", line])?;
        }
        for line in self.ctr_quiet(&["images", "ls", "-q"])?.lines() {
            self.ctr_quiet(&["images", "rm", "--sync", line])?;
        }
        for line in self.ctr_quiet(&["leases", "ls", "-q"])?.lines() {
            self.ctr_quiet(&["leases", "rm", line])?;
        }
        for line in self.ctr_quiet(&["content", "ls", "-q"])?.lines() {
            self.ctr_quiet(&["content", "rm", line])?;
        }
        // Children before parents: each pass removes what has no child left.
        for _ in 0..64 {
            let listed = self.ctr_quiet(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
            let keys: Vec<String> = listed
                .lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
                .collect();
            if keys.is_empty() {
                break;
            }
            for key in keys {
                let _ = self.ctr_quiet(&["snapshots", "--snapshotter", snapshotter, "rm", &key]);
            }
        }
        // containerd refuses to delete a namespace that still holds anything.
        let mut command = Command::new(&self.binaries.ctr);
        command
            .arg("--address")
            .arg(&self.address)
            .args(["namespaces", "rm", &self.namespace])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let output = wait_output(command.spawn().context("run ctr")?, CTR_TIMEOUT)?;
        let left = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || !left.trim().is_empty() {
            bail!(
                "containerd namespace {} is not empty after the run: {}",
                self.namespace,
                left.trim()
            );
        }
        Ok(())
    }

    fn shut_down(&mut self) -> anyhow::Result<()> {
        // containerd first (it holds the snapshotter's connection), then the daemon, which
        // unmounts its layers as it stops.
        for child in [self.containerd.take(), self.daemon.take()]
            .into_iter()
            .flatten()
        {
            stop_child(child);
        }
        // A task shim outlives containerd: any process started under this folder goes too.
        kill_processes_naming(&self.dir);
        unmount_under(&self.dir);
        fs::remove_dir_all(&self.dir).with_context(|| format!("remove {}", self.dir.display()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.empty_namespace();
            let _ = self.shut_down();
        }
    }
}

/// Starts `command` in a process group of its own (a Ctrl-C on the terminal reaches only the
/// bench, which then cleans up in order), its output appended to `log`.
pub fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicate a log file")?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {program}"))
}

fn stop_child(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits (bounded, interruptible only by the timeout) for `child` and collects its output.
pub fn wait_output(mut child: Child, timeout: Duration) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("a command did not end within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills every process whose command line names a path under `dir` (the run's shims).
fn kill_processes_naming(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| point.replace("\\040", " "))
        .filter(|point| *point == prefix || point.starts_with(&format!("{prefix}/")))
        .map(PathBuf::from)
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.as_os_str().len()));
    points
}

/// Lazily unmounts whatever a killed daemon left mounted under `dir`.
fn unmount_under(dir: &Path) {
    for point in mounts_under(dir) {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The last lines of a log, for an error.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// CPU seconds (user + system) and peak RSS (VmHWM, bytes) of process `pid`.
pub fn usage(pid: u32) -> Option<(f64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks as f64 / per_second, hwm_kib * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_usage() {
        let (cpu, rss) = usage(std::process::id()).expect("usage of this process");
        assert!(cpu >= 0.0);
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
