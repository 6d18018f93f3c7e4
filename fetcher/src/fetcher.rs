//! [`Fetcher`]: bytes of a blob, from the chunk cache when it has them, else fetched, cached
//! and shared with every concurrent reader of the same blocks (or, for reads without peers,
//! of the same bytes: [`piece`], completed to whole blocks by [`fill`]).

mod fill;
mod piece;
mod referrer;
mod run;
mod warm;

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use shoal_config::{Config, FetchConfig, RegistryConfig};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cache::{BlockGeometry, BlockKey, ChunkCache};
use crate::error::FetchError;
use crate::flight::{Flights, Joined, Lead, Waiter};
use crate::latency::FetchLatency;
use crate::peer::{self, Peers};
use crate::pieces::Pieces;
use crate::reference::BlobRef;
use crate::registry::RegistryClient;
use crate::runs::Runs;
use crate::stats::{BlobBytes, Counters, FetchStats, Source};
use crate::traces::TraceStore;
use crate::trust::Route;
use run::runs;

/// Adjacent missing blocks are fetched with one range request of at most this many bytes.
const MAX_RUN_BYTES: u64 = 16 << 20;
/// Prefetch walks a blob in windows of this many runs, so its memory stays bounded.
const PREFETCH_WINDOW_RUNS: u64 = 4;
/// For this long after a block's fetch failed, a new fetch of it is one short attempt: the
/// kernel follows a failed readahead with a read of its own, which must not wait out a second
/// registry deadline, but must still succeed if the registry answers again.
const FAILED_FETCH_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// The crate's front door: `read(blob, range)`. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced whole by [`Fetcher::reload_registry`]; a request in flight keeps the client
    /// it started with.
    /// Shared with the peers, which check peers' access to private repositories with it.
    registry: Arc<RwLock<RegistryClient>>,
    /// Shared with the peer listener and announcer, which read it through
    /// [`HeldBlocks`](crate::peer::HeldBlocks).
    cache: Arc<ChunkCache>,
    flights: Arc<Flights>,
    /// Bounds remote fetches in flight over all blobs (`fetch.max_concurrent`).
    remote: Semaphore,
    counters: Counters,
    latency: FetchLatency,
    max_run_blocks: u64,
    /// The peer network, when `[peers]` is configured.
    peers: Option<Arc<Peers>>,
    /// Fetch runs not finished yet: a read is answered before its blocks are cached.
    runs: Arc<Runs>,
    /// Byte ranges foreground reads are fetching, for readers of the same bytes to join.
    pieces: Arc<Pieces>,
    /// The partly cached blocks waiting to be completed in the background.
    fill: Arc<fill::Fill>,
    /// Learned-prefetch traces kept on this node (shared with the peer listener).
    traces: Arc<TraceStore>,
    /// `fetch.learn_push`: push recorded traces to the registry.
    learn_push: bool,
    /// Each image's trace artifact as its registry names it, looked up once.
    artifacts: crate::referrer::ArtifactMemo,
    /// One trace push at a time: each reads, modifies and writes the referrers tag.
    push_turn: tokio::sync::Mutex<()>,
    /// The peer listener, probes and announcer, once started: they end with the fetcher.
    peer_tasks: parking_lot::Mutex<Option<peer::PeerTasks>>,
}

impl Fetcher {
    /// Opens the cache under `<root>/cache/` and builds the registry client, and the peer
    /// client when `[peers]` is configured (its listener and upkeep start with
    /// [`start_peers`](Self::start_peers)).
    pub fn new(config: &Config) -> Result<Fetcher, FetchError> {
        let cache = ChunkCache::open(
            &config.root.join("cache"),
            config.cache.block_size.0,
            config.cache.capacity.0,
        )?;
        let registry = Arc::new(RwLock::new(RegistryClient::new(&config.registry)?));
        let peers = match &config.peers {
            Some(peers) => Some(Arc::new(Peers::new(
                peers,
                cache.block_size(),
                Some(config.root.join("cache").join("shareable")),
                registry.clone(),
            )?)),
            None => None,
        };
        Ok(Fetcher::build(registry, cache, &config.fetch, peers))
    }

    pub fn from_parts(
        registry: RegistryClient,
        cache: ChunkCache,
        config: &FetchConfig,
    ) -> Fetcher {
        Fetcher::build(Arc::new(RwLock::new(registry)), cache, config, None)
    }

    fn build(
        registry: Arc<RwLock<RegistryClient>>,
        cache: ChunkCache,
        config: &FetchConfig,
        peers: Option<Arc<Peers>>,
    ) -> Fetcher {
        let max_run_blocks = (MAX_RUN_BYTES / cache.block_size()).max(1);
        // Beside the cache: `<root>/traces/`.
        let traces = Arc::new(TraceStore::new(cache.dir().with_file_name("traces")));
        Fetcher {
            inner: Arc::new(Inner {
                registry,
                cache: Arc::new(cache),
                flights: Arc::new(Flights::with_failure_window(FAILED_FETCH_WINDOW)),
                remote: Semaphore::new(config.max_concurrent.max(1)),
                counters: Counters::default(),
                latency: FetchLatency::default(),
                max_run_blocks,
                peers,
                runs: Arc::default(),
                pieces: Arc::default(),
                fill: Arc::default(),
                traces,
                learn_push: config.learn_push,
                artifacts: Default::default(),
                push_turn: tokio::sync::Mutex::new(()),
                peer_tasks: parking_lot::Mutex::new(None),
            }),
        }
    }

    /// The registry client now in force (cheap: clones share connections and tokens).
    pub fn registry(&self) -> RegistryClient {
        self.inner.registry.read().clone()
    }

    /// Replaces the registry client with one built from `config` (hosts, mirrors, TLS,
    /// retries, and the credentials `docker_config` names, read again). On error the old
    /// client stays.
    pub fn reload_registry(&self, config: &RegistryConfig) -> Result<(), FetchError> {
        // The pull secrets outlive the client: they come from CRI pulls, not the config.
        let client = RegistryClient::with_pull_secrets(config, self.pull_secrets())?;
        *self.inner.registry.write() = client;
        Ok(())
    }

    /// The pull secrets every registry client of this fetcher asks first (the CRI proxy
    /// records them).
    pub fn pull_secrets(&self) -> crate::PullSecrets {
        self.inner.registry.read().pull_secrets().clone()
    }

    /// Where the registry client in force gets its credentials, without a secret.
    pub fn credential_sources(&self) -> crate::CredentialSources {
        self.inner.registry.read().credential_sources()
    }

    /// The learned-prefetch traces kept on this node.
    pub fn traces(&self) -> &Arc<TraceStore> {
        &self.inner.traces
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    pub fn stats(&self) -> FetchStats {
        self.inner.counters.snapshot()
    }

    /// Bytes served per blob, by source, for the blobs read most recently (a bounded set).
    pub fn blob_stats(&self) -> Vec<(crate::Digest, BlobBytes)> {
        self.inner.counters.blobs()
    }

    /// The peer network, when configured.
    pub fn peers(&self) -> Option<&Peers> {
        self.inner.peers.as_deref()
    }

    /// Binds the peer listener and starts membership probing and announcements on the
    /// current runtime, until the last clone of this fetcher is dropped (a second start
    /// ends the first's); the bound address, or `None` when peers are not configured.
    pub async fn start_peers(&self) -> Result<Option<std::net::SocketAddr>, FetchError> {
        let Some(peers) = self.inner.peers.clone() else {
            return Ok(None);
        };
        peers.set_warmer(self.warmer());
        let (bound, tasks) =
            peer::start(peers, self.inner.cache.clone(), self.inner.traces.clone()).await?;
        *self.inner.peer_tasks.lock() = Some(tasks);
        Ok(Some(bound))
    }

    /// Waits until every fetch started so far has cached its blocks (or failed to). Reads
    /// return as soon as their bytes are in hand, before those are durable in the cache;
    /// this is for whoever reports on the cache, or needs it caught up.
    pub async fn settled(&self) {
        self.inner.runs.settled().await
    }

    /// How long cache reads and remote fetches took, by source.
    pub fn latency(&self) -> &FetchLatency {
        &self.inner.latency
    }

    /// Bytes `range` of `blob`, from the cache or the registry, unchecked: what containers
    /// read goes through [`BlobRead`](crate::BlobRead), which checks it.
    pub async fn read(&self, blob: &BlobRef, range: Range<u64>) -> Result<Bytes, FetchError> {
        self.read_as(blob, range, Mode::Read { peers: false }).await
    }

    /// Bytes `range` of `blob`, unchecked, from the cache or the tiers `route` allows.
    pub(crate) async fn read_routed(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> Result<Bytes, FetchError> {
        self.read_as(blob, range, Mode::from(route)).await
    }

    /// `range` of `blob` from the cache, else fetched as `mode` allows.
    async fn read_as(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        mode: Mode,
    ) -> Result<Bytes, FetchError> {
        check_bounds(blob, &range)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // No whole-range cache lookup first: callers (the trust layer) come here after
        // theirs missed, and `blocks` looks at each block anyway.
        if self.fetches_pieces(mode) {
            return self.read_pieces(blob, &range).await;
        }
        let (parts, _runs) = self.blocks(blob, &range, mode).await?;
        Ok(assemble(parts))
    }

    /// Bytes `range` of `blob` if the cache holds all of them; never waits on the network.
    pub fn read_cached(&self, blob: &BlobRef, range: Range<u64>) -> Option<Bytes> {
        if check_bounds(blob, &range).is_err() {
            return None;
        }
        let started = std::time::Instant::now();
        let bytes = self.inner.cache.read(&blob.digest, range.clone())?;
        self.inner.latency.observe(Source::Cache, started.elapsed());
        let counters = &self.inner.counters;
        counters.hits(self.geometry(blob).covering(&range).count() as u64);
        counters.served(&blob.digest, Source::Cache, bytes.len() as u64);
        Some(bytes)
    }

    /// Drops the cached blocks under `range` and fetches them again from the registry: for
    /// bytes that failed their check. A peer that had sent any of those blocks is blamed and
    /// avoided.
    pub async fn refetch(&self, blob: &BlobRef, range: Range<u64>) -> Result<Bytes, FetchError> {
        check_bounds(blob, &range)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.inner.counters.verify_failure();
        if let Some(peers) = &self.inner.peers {
            peers.rejected(&blob.digest, self.geometry(blob).covering(&range));
        }
        for index in self.geometry(blob).covering(&range) {
            self.inner
                .flights
                .ended(&BlockKey::new(&blob.digest, index))
                .await;
        }
        self.inner.pieces.ended(blob.digest.raw(), &range).await;
        let fetcher = self.clone();
        let digest = blob.digest.clone();
        let dropped = range.clone();
        tokio::task::spawn_blocking(move || fetcher.inner.cache.invalidate(&digest, dropped))
            .await
            .map_err(|e| FetchError::CacheTask {
                block: BlockKey::new(&blob.digest, self.geometry(blob).block_of(range.start)),
                reason: e.to_string(),
            })??;
        let (parts, _runs) = self.blocks(blob, &range, Mode::Refetch).await?;
        Ok(assemble(parts))
    }

    /// Brings `range` of `blob` into the cache from the registry without returning it:
    /// whole blocks, as prefetches always are.
    pub async fn prefetch(&self, blob: &BlobRef, range: Range<u64>) -> Result<(), FetchError> {
        self.prefetch_routed(blob, range, Route::Registry).await
    }

    /// Brings `range` of `blob` into the cache from the tiers `route` allows.
    pub(crate) async fn prefetch_routed(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> Result<(), FetchError> {
        check_bounds(blob, &range)?;
        let geometry = self.geometry(blob);
        let blocks = geometry.covering(&range);
        let window = self.inner.max_run_blocks * PREFETCH_WINDOW_RUNS;
        let mut start = blocks.start;
        while start < blocks.end {
            let end = blocks.end.min(start + window);
            let span = geometry.start(start)..geometry.span(end - 1).end;
            // A window's blocks are cached before the next is fetched: that bounds the
            // bytes held in memory.
            let (_, runs) = self.blocks(blob, &span, Mode::from(route)).await?;
            for run in runs {
                if let Err(error) = run.await {
                    tracing::warn!(%error, "block fetch task failed");
                }
            }
            start = end;
        }
        Ok(())
    }

    /// How `blob` divides into the cache's blocks.
    fn geometry(&self, blob: &BlobRef) -> BlockGeometry {
        self.inner.cache.geometry(blob.size)
    }

    /// The parts of `range` of `blob`, block by block: present ones from the cache (unless
    /// refreshing), missing ones joined to a fetch already under way or fetched now, adjacent
    /// ones together. Returns once every part is in hand, with the runs it started, which
    /// go on to cache their blocks: the caller may wait for them or let them finish alone.
    async fn blocks(
        &self,
        blob: &BlobRef,
        range: &Range<u64>,
        mode: Mode,
    ) -> Result<(Vec<Bytes>, Vec<JoinHandle<()>>), FetchError> {
        enum Part {
            Ready(Bytes),
            /// The whole block will arrive; the part wanted is `wanted` within it.
            Waiting(Waiter, Range<usize>),
        }
        let inner = &self.inner;
        let geometry = self.geometry(blob);
        let blocks = geometry.covering(range);
        let mut parts = Vec::with_capacity((blocks.end - blocks.start) as usize);
        let mut leads: Vec<Lead> = Vec::new();
        let mut from_cache = 0;
        for index in blocks {
            let span = geometry.span(index);
            let wanted = span.start.max(range.start)..span.end.min(range.end);
            let cached = (mode != Mode::Refetch)
                .then(|| inner.cache.read(&blob.digest, wanted.clone()))
                .flatten();
            if let Some(bytes) = cached {
                inner.counters.hits(1);
                from_cache += bytes.len() as u64;
                parts.push(Part::Ready(bytes));
                continue;
            }
            inner.counters.misses(1);
            let within = (wanted.start - span.start) as usize..(wanted.end - span.start) as usize;
            // Only plain reads of a block that just failed get one short attempt: opening a
            // layer (its footer and TOC) or a refetch after a bad chunk gets a full fetch.
            let key = BlockKey::new(&blob.digest, index);
            match inner.flights.join(&key, matches!(mode, Mode::Read { .. })) {
                Joined::Follow(waiter) => parts.push(Part::Waiting(waiter, within)),
                Joined::Lead(lead) => {
                    parts.push(Part::Waiting(lead.waiter(), within));
                    leads.push(lead);
                }
            }
        }
        inner
            .counters
            .served(&blob.digest, Source::Cache, from_cache);
        // Each run is a task of its own: the fetch must finish for the other waiters even if
        // this reader gives up (a FUSE request interrupted, a caller's timeout), and it
        // caches the blocks after their readers have them. The runs end on their own (every
        // fetch has a deadline); [`Fetcher::settled`] waits for them.
        let tasks: Vec<_> = runs(leads, inner.max_run_blocks)
            .into_iter()
            .map(|run| {
                let guard = self.inner.runs.start();
                let fetch = self.clone().fetch_run(blob.clone(), run, mode);
                tokio::spawn(async move {
                    fetch.await;
                    drop(guard);
                })
            })
            .collect();
        let mut got = Vec::with_capacity(parts.len());
        for part in parts {
            got.push(match part {
                Part::Ready(bytes) => bytes,
                Part::Waiting(waiter, within) => waiter.wait().await?.slice(within),
            });
        }
        Ok((got, tasks))
    }
}

/// Consecutive parts of one range, joined.
fn assemble(parts: Vec<Bytes>) -> Bytes {
    if let [only] = parts.as_slice() {
        return only.clone();
    }
    let mut joined = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for part in &parts {
        joined.extend_from_slice(part);
    }
    joined.freeze()
}

fn check_bounds(blob: &BlobRef, range: &Range<u64>) -> Result<(), FetchError> {
    if range.start > range.end || range.end > blob.size {
        return Err(FetchError::RangeOutOfBounds {
            digest: blob.digest.clone(),
            range: range.clone(),
            size: blob.size,
        });
    }
    Ok(())
}

/// Where the blocks of a read may come from ([`Route`] as the trust module chose it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The cache, then peers if `peers`, then the registry; a block that failed moments ago
    /// gets one short attempt.
    Read { peers: bool },
    /// The cache, then peers, then the registry, always a full fetch: opening a layer.
    Index,
    /// The registry alone, whatever the cache holds: the bytes failed their check.
    Refetch,
}

impl From<Route> for Mode {
    fn from(route: Route) -> Mode {
        match route {
            Route::Peers => Mode::Read { peers: true },
            Route::Registry => Mode::Read { peers: false },
            Route::Index => Mode::Index,
        }
    }
}
