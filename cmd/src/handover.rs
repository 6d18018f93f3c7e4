//! The daemon's side of handover: the fd holder its lazy mounts' connections wait in between
//! daemons, and `shoal-snapshotter --shutdown`, the one stop that ends them.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use shoal_config::{Config, HandoverConfig, HandoverStore};
use shoal_fuse::handover::{
    systemd_notify, FdStore, HolderClient, SystemdEnvironment, SystemdStore,
};
use shoal_fuse::syscall::{LinuxSyscall, Syscall};

/// The lock file in the root; it holds the pid of the daemon that has it.
pub const LOCK_FILE: &str = "shoal.lock";

/// How long `--shutdown` waits for the daemon to finish its stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

/// The program installed beside this one.
fn holder_program() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("find this program's path")?;
    Ok(exe.with_file_name("shoal-fdholder"))
}

/// What systemd told this process, if it runs as a systemd service.
fn systemd_environment() -> SystemdEnvironment {
    let var = |name| std::env::var(name).ok();
    SystemdEnvironment {
        notify_socket: var("NOTIFY_SOCKET"),
        fdstore: var("FDSTORE"),
        listen_pid: var("LISTEN_PID"),
        listen_fds: var("LISTEN_FDS"),
        listen_fdnames: var("LISTEN_FDNAMES"),
    }
}

/// The store the lazy mounts' connections are kept in: systemd's fd store (taking back the
/// fds it passed this start) or the fd holder, attached to, or started when none answers.
pub fn open_store(config: &HandoverConfig) -> anyhow::Result<Arc<dyn FdStore>> {
    let systemd = systemd_environment();
    let use_systemd = match config.store {
        HandoverStore::Holder => false,
        HandoverStore::Systemd => true,
        HandoverStore::Auto => systemd.offers_fd_store(),
    };
    if use_systemd {
        let store = SystemdStore::adopt(&systemd)
            .map_err(|err| anyhow::anyhow!(shoal_fetcher::with_causes(&err)))
            .context("handover.store: systemd's fd store")?;
        return Ok(Arc::new(store));
    }
    let program = holder_program()?;
    let client =
        HolderClient::connect_or_start(&config.holder_socket, &program, config.orphan_after)
            .map_err(|err| anyhow::anyhow!(shoal_fetcher::with_causes(&err)))?;
    Ok(Arc::new(client))
}

/// Tells systemd the daemon serves (`READY=1`, for a `Type=notify` unit); nothing when it does
/// not run as a systemd service.
pub fn notify_ready() {
    if let Ok(socket) = std::env::var("NOTIFY_SOCKET") {
        if let Err(err) = systemd_notify(&socket, "READY=1", None) {
            tracing::warn!(error = %shoal_fetcher::with_causes(&err), "could not tell systemd the daemon is ready");
        }
    }
}

/// Writes this process's pid into the root's lock, so `--shutdown` can find the daemon.
pub fn record_pid(lock: &mut File) -> anyhow::Result<()> {
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(())
}

/// `shoal-snapshotter --shutdown`: stops the daemon of `config.root` and ends every lazy
/// mount's connection (SIGUSR1 asks the daemon for exactly that). With no daemon running, the
/// connections the fd holder keeps for this node are released and their mounts detached.
pub fn shutdown(config: &Config) -> anyhow::Result<String> {
    let path = config.root.join(LOCK_FILE);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return release_held(config);
        }
        Err(err) => return Err(err).with_context(|| format!("open {}", path.display())),
    };
    let mut pid = String::new();
    file.read_to_string(&mut pid)
        .with_context(|| format!("read {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Nobody holds the lock: no daemon runs.
        Ok(_unlocked) => return release_held(config),
        Err((file, _)) => drop(file),
    }
    let pid: i32 = pid
        .trim()
        .parse()
        .with_context(|| format!("{} names no daemon pid", path.display()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGUSR1)
        .with_context(|| format!("signal the daemon (pid {pid})"))?;
    let asked = Instant::now();
    while asked.elapsed() < SHUTDOWN_WAIT {
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
            return Ok(format!("daemon {pid} stopped and its lazy mounts ended"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "daemon {pid} was asked to shut down but still runs after {} s",
        SHUTDOWN_WAIT.as_secs()
    )
}

/// Releases every connection the holder keeps for mounts under the root, detaching each mount.
fn release_held(config: &Config) -> anyhow::Result<String> {
    let socket = &config.handover.holder_socket;
    if !socket.exists() {
        return Ok("no daemon runs and no fd holder keeps connections".into());
    }
    let holder = HolderClient::at(socket);
    let kept = holder
        .kept()
        .map_err(|err| anyhow::anyhow!(shoal_fetcher::with_causes(&err)))?;
    let ours: Vec<String> = kept
        .into_iter()
        .map(|(name, _fd)| name)
        .filter(|name| Path::new(name).starts_with(&config.root))
        .collect();
    let count = ours.len();
    for name in ours {
        let path = Path::new(&name);
        LinuxSyscall
            .unmount(path)
            .with_context(|| format!("unmount {name}"))?;
        holder
            .release(&name)
            .map_err(|err| anyhow::anyhow!(shoal_fetcher::with_causes(&err)))?;
    }
    Ok(format!(
        "no daemon runs; {count} connections the fd holder kept were released"
    ))
}
