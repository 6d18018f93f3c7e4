//! The daemon: owns the root and the socket, serves the Snapshots API until SIGTERM or SIGINT,
//! and reloads its configuration on SIGHUP.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use shoal_config::Config;
use shoal_fuse::layer::{ChunkReader, LearnSettings, Learning, ReaderConfig};
use shoal_fuse::syscall::LinuxSyscall;

use crate::cri_proxy::CriProxy;
use crate::logging::LogLevel;
use crate::metrics::{self, Observed};
use crate::reload::Reloader;
use shoal_snapshotter::{
    server, tonic::transport::Server, EstargzFormat, LazyMounter, MountPolicy, MountSettings,
    OverlaybdFormat, ShoalSnapshotter,
};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

/// How long in-flight requests may run after SIGTERM before the daemon closes anyway.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a stop that hands the lazy mounts over waits for answered blocks to be cached.
const HANDOVER_LANDING_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the daemon's configuration came from, so that SIGHUP can read it again.
pub struct Started {
    pub config: Config,
    /// The `--config` file; none: the default file, if it exists.
    pub path: Option<PathBuf>,
    pub log: LogLevel,
}

/// Runs the daemon to completion.
pub async fn run(started: Started) -> anyhow::Result<()> {
    // SIGHUP's default action would end the daemon and every lazy mount with it: it is caught
    // before the socket exists, so nobody who can find the daemon can kill it that way.
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    let Started { config, path, log } = started;
    // Handled from the start: a stop asked for during start-up waits for it to finish (the
    // metadata store must not be cut off half made), then stops the daemon as usual.
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    // `shoal-snapshotter --shutdown`: a stop that ends every lazy mount.
    let mut usr1 = signal(SignalKind::user_defined1()).context("install SIGUSR1 handler")?;
    // Cached layers and every image's metadata live here: root's alone (0700), narrowed if
    // an earlier version left it open to everyone.
    let narrowed = shoal_fetcher::private::dir(&config.root)
        .with_context(|| format!("create root {}", config.root.display()))?;
    if let Some(had) = narrowed {
        info!(root = %config.root.display(), was = format!("{had:o}"), "root narrowed to 0700");
    }
    refuse_live_socket(&config.socket).await?;
    let mut lock = lock_root(&config.root)?;
    crate::handover::record_pid(&mut lock).context("record the daemon's pid in the root lock")?;

    let fetcher =
        shoal_fetcher::Fetcher::new(&config).context("open chunk cache and registry client")?;
    fetcher
        .start_peers()
        .await
        .context("start the peer listener")?;
    let reader = ChunkReader::new(
        Arc::new(fetcher.clone()),
        ReaderConfig {
            memory_bytes: config.cache.memory.0,
        },
    );
    // Read at each open and mount; a reload replaces it.
    let policy = MountPolicy::new(MountSettings::of(&config));
    let learning = Learning::new(
        Arc::new(fetcher.clone()),
        LearnSettings {
            settle: config.fetch.learn_settle,
            max_bytes: config.fetch.learn_max_bytes.0,
        },
    );
    let estargz = EstargzFormat::new(
        fetcher.clone(),
        reader.clone(),
        tokio::runtime::Handle::current(),
        policy.clone(),
        config.fetch.learn.then(|| learning.clone()),
    );
    let overlaybd = OverlaybdFormat::new(
        fetcher.clone(),
        tokio::runtime::Handle::current(),
        policy.clone(),
        reader.read_latency_histogram(),
        config.fetch.learn.then(|| learning.clone()),
    );
    // One request's deadline for the whole handshake: after that a download is faster.
    let mut mounter = LazyMounter::new(
        fetcher.clone(),
        Arc::new(LinuxSyscall),
        vec![Box::new(overlaybd), Box::new(estargz)],
        policy.clone(),
    );
    if config.handover.enabled {
        let handover = config.handover.clone();
        match tokio::task::spawn_blocking(move || crate::handover::open_store(&handover)).await? {
            Ok(store) => {
                info!(store = %store.describe(), "lazy mounts are kept across restarts");
                mounter = mounter.with_handover(store, &config.root);
            }
            Err(err) => warn!(
                error = format!("{err:#}"),
                "no fd store: lazy mounts end when this daemon stops"
            ),
        }
    }
    let mounter = Arc::new(mounter);
    let snapshotter = ShoalSnapshotter::open(&config.root, mounter.clone())
        .with_context(|| format!("open snapshotter at {}", config.root.display()))?;
    let counts = snapshotter.counts()?;
    info!(
        root = %config.root.display(),
        socket = %config.socket.display(),
        committed = counts.committed,
        active = counts.active,
        view = counts.view,
        version = crate::version::VERSION,
        "shoal-snapshotter serving"
    );

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    if let Some(address) = config.metrics.address {
        if !address.ip().is_loopback() {
            warn!(
                %address,
                "metrics.address is not on loopback: /status and /metrics tell anyone who \
                 reaches it the image names, registry hosts and layer digests of this node"
            );
        }
        let observed = Observed {
            snapshotter: snapshotter.clone(),
            fetcher: fetcher.clone(),
            reader,
            learning,
            draining: stop_rx.clone(),
        };
        metrics::serve(address, observed).await?;
    }

    // Its calls reach containerd, whose Prepares reach this daemon's socket (bound next).
    let cri_proxy = match &config.cri_proxy {
        Some(proxy) => Some(
            CriProxy::start(proxy, fetcher.pull_secrets(), stop_rx.clone())
                .await
                .context("start the CRI image-service proxy")?,
        ),
        None => None,
    };

    // Ends, with its jobs, once the socket stops serving (below).
    let preheat = match &config.preheat {
        Some(preheat) => Some(
            crate::preheat::PreheatService::start(preheat, fetcher.clone())
                .await
                .context("start the preheat API")?,
        ),
        None => None,
    };

    let landing = fetcher.clone();
    let mut reloader = Some(Reloader::new(path, config.clone(), fetcher, policy, log));
    let stopping = mounter.clone();
    let shutdown = async move {
        let name = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = usr1.recv() => {
                    stopping.end_connections_on_stop();
                    break "SIGUSR1 (shutdown: lazy mounts end)";
                }
                _ = hup.recv() => reload(&mut reloader).await,
            }
        };
        info!(
            signal = name,
            "draining in-flight requests and shutting down"
        );
        let _ = stop_tx.send(true);
    };

    // Bound last, once everything it serves is open: a client that connects is answered at
    // once. Bound earlier, containerd connected during start-up, timed out waiting for the
    // HTTP/2 handshake, and failed every Prepare for its reconnect back-off
    // ("timed out waiting for server handshake").
    let listener = crate::listener::bind_private(&config.socket, "socket").await?;
    // The socket accepts from here on (the kernel queues connections until they are served).
    crate::handover::notify_ready();
    let serve = Server::builder()
        .add_service(server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    // A client that stops reading its connection must not keep the daemon alive forever: after
    // the signal, in-flight requests get a bounded grace period.
    let deadline = async move {
        if stop_rx.wait_for(|stopped| *stopped).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DRAIN_DEADLINE).await;
    };
    let served = tokio::select! {
        served = serve => served.context("serve snapshots API"),
        () = deadline => {
            warn!(deadline = ?DRAIN_DEADLINE, "clients still connected after the drain deadline; closing");
            Ok(())
        }
    };
    // Preheat jobs are in memory only: a stopping daemon ends them (and their fetches).
    drop(preheat);
    // Reads are answered before their blocks are cached: let those already answered land,
    // within a bound, so that a restart finds them. A handover bounds it tighter: the lazy
    // mounts' readers wait for the next daemon meanwhile, and it fetches again what is lost.
    let landing_deadline = if mounter.hands_over() {
        HANDOVER_LANDING_DEADLINE
    } else {
        DRAIN_DEADLINE
    };
    if tokio::time::timeout(landing_deadline, landing.settled())
        .await
        .is_err()
    {
        warn!(deadline = ?landing_deadline, "blocks still being cached after the drain deadline; closing");
    }
    let _ = std::fs::remove_file(&config.socket);
    if let Some(proxy) = cri_proxy {
        // Its calls in flight (a pull can take minutes) get the drain's bound too.
        if let Err(err) = proxy.finish(DRAIN_DEADLINE).await {
            warn!(
                error = format!("{err:#}"),
                "CRI image-service proxy ended with an error"
            );
        }
    }
    // Leaves the lazy mounts serving for the next daemon, or ends them (`--shutdown`).
    if mounter.stop() {
        // No destructor may run from here: a FUSE reply a task still holds would answer EIO
        // when dropped, where an unanswered request is resent to the next daemon. The state on
        // disk is what a SIGKILL leaves, which a start recovers from.
        let code = i32::from(served.is_err());
        if let Err(err) = &served {
            tracing::error!(error = format!("{err:#}"), "serving ended with an error");
        }
        info!("shoal-snapshotter stopped; lazy mounts left serving for the next daemon");
        std::process::exit(code);
    }
    served?;
    info!("shoal-snapshotter stopped");
    Ok(())
}

/// One reload at a time, off the runtime's threads (it reads files and may evict); the
/// reloader comes back with its outcome.
async fn reload(slot: &mut Option<Reloader>) {
    let Some(mut reloader) = slot.take() else {
        return;
    };
    match tokio::task::spawn_blocking(move || {
        reloader.reload();
        reloader
    })
    .await
    {
        Ok(reloader) => *slot = Some(reloader),
        // A panic in a reload must not take the daemon down; later SIGHUPs are refused.
        Err(error) => warn!(%error, "config reload failed; restart to reload again"),
    }
}

/// One daemon per root: a second one would corrupt nothing (redb locks too) but would fight
/// over mounts and the socket, so it is refused up front with a clear message.
fn lock_root(root: &Path) -> anyhow::Result<Flock<File>> {
    let path = root.join(crate::handover::LOCK_FILE);
    // Not truncated before the lock is ours: it names the running daemon.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "root {} is in use by another shoal-snapshotter ({errno})",
            root.display()
        )
    })
}

async fn refuse_live_socket(socket: &Path) -> anyhow::Result<()> {
    if socket.exists() && UnixStream::connect(socket).await.is_ok() {
        bail!(
            "socket {} is held by a live daemon; stop it first or choose another socket",
            socket.display()
        );
    }
    Ok(())
}
