//! Preheat: warming the cluster with an image before a rollout, as Harbor's P2P preheat asks
//! a Dragonfly cluster to. The daemon serves the subset of Dragonfly manager's open API that
//! Harbor's Dragonfly provider calls on `[preheat] listen`; `shoal preheat` calls it too.
//!
//! - [`api`]: the JSON of the requests and answers, as Harbor's driver marshals and reads it.
//! - [`jobs`]: the jobs in memory (bounded), each PENDING until it ends once.
//! - [`run`]: one job: the manifest, then every blob through the fetcher and the peers.
//! - [`spread`]: asking other nodes (each blob's index owners first) to take the blobs.
//! - [`http`]: routes, the caller's credential, status codes.
//! - [`cli`]: `shoal preheat REF`.

pub mod api;
pub mod cli;
pub mod http;
pub mod jobs;
pub mod run;
pub mod spread;

#[cfg(test)]
mod service_tests;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use shoal_config::{PreheatAuth, PreheatConfig};
use shoal_fetcher::Fetcher;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info};

use api::{JobView, Preheat};
use jobs::{Job, Jobs, TooMany};

/// A connection is closed after this long, whatever it does (Harbor's client drops idle
/// ones after 30 s and reconnects).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// What the listener serves: the jobs and what runs them.
pub struct Preheater {
    fetcher: Fetcher,
    auth: PreheatAuth,
    jobs: Arc<Jobs>,
    /// The jobs' tasks: dropped (aborted) with the service.
    running: Mutex<JoinSet<()>>,
    /// Who the job results name as the node that did the work (the listener's address until
    /// the peers' probes found this node's own).
    hostname: String,
    ip: String,
}

impl Preheater {
    fn start(&self, preheat: Preheat) -> Result<Job, TooMany> {
        let job = self.jobs.create(preheat.image.to_string())?;
        info!(job = job.id, image = %preheat.image, "preheat job created");
        let mut running = self.running.lock();
        // Reap what ended, so the set stays as small as the jobs running.
        while running.try_join_next().is_some() {}
        running.spawn(run::run(
            self.fetcher.clone(),
            self.jobs.clone(),
            job.id,
            preheat,
        ));
        Ok(job)
    }

    fn view(&self, job: &Job) -> JobView {
        // The peer address, once the probes found it: what the other nodes know this one by.
        let ip = self
            .fetcher
            .peers()
            .and_then(|peers| peers.me())
            .map(|me| me.0.ip().to_string())
            .unwrap_or_else(|| self.ip.clone());
        JobView::of(job, &self.hostname, &ip)
    }
}

/// The preheat API, serving until dropped: dropping it ends the listener, its connections
/// and every job still running.
pub struct PreheatService {
    /// The listener and its connections, aborted when dropped.
    _tasks: JoinSet<()>,
    preheater: Arc<Preheater>,
    pub address: SocketAddr,
}

impl PreheatService {
    /// Binds `config.listen` and serves there.
    pub async fn start(config: &PreheatConfig, fetcher: Fetcher) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("bind preheat.listen {}", config.listen))?;
        let address = listener.local_addr().context("preheat listener address")?;
        let preheater = Arc::new(Preheater {
            ip: address.ip().to_string(),
            fetcher,
            auth: config.auth.clone(),
            jobs: Arc::default(),
            running: Mutex::new(JoinSet::new()),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_default(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, preheater.clone()));
        info!(%address, "serving the preheat API (Dragonfly open API subset)");
        Ok(PreheatService {
            _tasks: tasks,
            preheater,
            address,
        })
    }
}

impl Drop for PreheatService {
    /// The listener's tasks end with `tasks`; the jobs are aborted here, for the listener's
    /// connections may hold the preheater a moment longer.
    fn drop(&mut self) {
        self.preheater.running.lock().abort_all();
    }
}

async fn accept(listener: TcpListener, preheater: Arc<Preheater>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "preheat accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let preheater = preheater.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let preheater = preheater.clone();
                async move {
                    debug!(%remote, method = %request.method(), path = request.uri().path(), "preheat request");
                    Ok::<_, std::convert::Infallible>(http::answer(preheater, request).await)
                }
            });
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}
