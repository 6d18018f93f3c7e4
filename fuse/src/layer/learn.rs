//! Learned prefetch of eStargz layers. The first start of an image on a node records which
//! chunks of each layer its containers read, in order, until reads settle (no chunk read for
//! the first time for `settle`, or `max_bytes` of chunks); the trace is kept by image manifest
//! and layer blob digest ([`TraceBook`]). A later mount of that layer for that image (on this
//! node, or on any peer, which finds the trace through the peer network) fetches exactly those
//! chunks at once ([`super::replay`]), before the container asks.
//!
//! A trace is only ever a list of what to fetch: every chunk is checked against the verified
//! TOC like any read. One recorded for another image or layer is ignored; one that does not
//! parse is rejected with one log line. Either way the layer goes on as without a trace, and
//! records its own (which replaces a rejected one).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shoal_fetcher::{Digest, TraceBook, TraceOrigin};
use shoal_formats::estargz::{Chunk, Ino};
use shoal_formats::trace::{Trace, Unit, MAX_ENTRIES};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{ChunkReader, EstargzLayer};

/// Layers whose learning is reported, at most (the oldest forgotten first).
const MAX_REPORTED: usize = 4096;

/// When a recording ends.
#[derive(Debug, Clone, Copy)]
pub struct LearnSettings {
    /// No chunk read for the first time for this long: the start has settled.
    pub settle: Duration,
    /// Compressed bytes of chunks recorded at most.
    pub max_bytes: u64,
}

/// The daemon's learned prefetch: where traces are found and kept, and what each layer did.
pub struct Learning {
    book: Arc<dyn TraceBook>,
    settings: LearnSettings,
    layers: Mutex<BTreeMap<String, LayerLearning>>,
    counters: Counters,
}

/// What learned prefetch did for one layer blob, as status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerLearning {
    /// The image's manifest digest.
    pub image: String,
    pub state: LearnState,
    /// Chunks recorded, or fetched ahead by the replay.
    pub chunks: u64,
    /// Their compressed bytes.
    pub bytes: u64,
    /// Where the trace came from: a peer's address, `registry <host>/<repository>`, or
    /// empty for this node's own.
    #[serde(default)]
    pub peer: String,
    /// Why a trace was not used, when one was found.
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LearnState {
    /// Looking for a trace.
    Looking,
    /// No usable trace: recording this start's reads.
    Recording,
    /// This start's reads were recorded and kept.
    Recorded,
    /// A trace is being replayed.
    Replaying,
    /// A trace was replayed: its chunks were fetched ahead.
    Replayed,
}

/// Counters since start, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnStats {
    pub recorded: u64,
    pub replayed: u64,
    pub from_peers: u64,
    #[serde(default)]
    pub from_registry: u64,
    /// Traces that did not parse.
    pub rejected: u64,
    /// Traces for another image or layer.
    pub ignored: u64,
    pub prefetched_chunks: u64,
    pub prefetched_bytes: u64,
    pub prefetch_failed_chunks: u64,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    replayed: AtomicU64,
    from_peers: AtomicU64,
    from_registry: AtomicU64,
    rejected: AtomicU64,
    ignored: AtomicU64,
    prefetched_chunks: AtomicU64,
    prefetched_bytes: AtomicU64,
    prefetch_failed_chunks: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Learning {
    pub fn new(book: Arc<dyn TraceBook>, settings: LearnSettings) -> Arc<Learning> {
        Arc::new(Learning {
            book,
            settings,
            layers: Mutex::default(),
            counters: Counters::default(),
        })
    }

    /// What each layer blob's learning did, by digest.
    pub fn layers(&self) -> Vec<(String, LayerLearning)> {
        let layers = self.layers.lock();
        layers.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn stats(&self) -> LearnStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LearnStats {
            recorded: get(&c.recorded),
            replayed: get(&c.replayed),
            from_peers: get(&c.from_peers),
            from_registry: get(&c.from_registry),
            rejected: get(&c.rejected),
            ignored: get(&c.ignored),
            prefetched_chunks: get(&c.prefetched_chunks),
            prefetched_bytes: get(&c.prefetched_bytes),
            prefetch_failed_chunks: get(&c.prefetch_failed_chunks),
        }
    }

    fn report(&self, blob: &Digest, update: impl FnOnce(&mut LayerLearning)) {
        let mut layers = self.layers.lock();
        if !layers.contains_key(blob.as_str()) && layers.len() >= MAX_REPORTED {
            layers.pop_first();
        }
        let entry = layers
            .entry(blob.to_string())
            .or_insert_with(|| LayerLearning {
                image: String::new(),
                state: LearnState::Looking,
                chunks: 0,
                bytes: 0,
                peer: String::new(),
                reason: String::new(),
            });
        update(entry);
    }
}

/// The chunks a layer's reads touch, in the order first touched, while it records.
pub(crate) struct Recorder {
    active: AtomicBool,
    state: Mutex<Recording>,
    changed: Notify,
}

#[derive(Default)]
struct Recording {
    seen: HashSet<(u64, u64)>,
    order: Vec<(u64, u64)>,
    bytes: u64,
    last_new: Option<Instant>,
}

impl Recorder {
    pub(crate) fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            active: AtomicBool::new(true),
            state: Mutex::default(),
            changed: Notify::new(),
        })
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A read of `ino` touched `chunks`. Called on the FUSE thread: a lock and a set insert.
    pub(crate) fn note(&self, ino: Ino, chunks: &[Chunk]) {
        if !self.is_active() {
            return;
        }
        let mut state = self.state.lock();
        let mut new = false;
        for chunk in chunks {
            if state.order.len() >= MAX_ENTRIES {
                break;
            }
            let name = (ino.get(), chunk.file_offset);
            if state.seen.insert(name) {
                state.order.push(name);
                state.bytes += chunk.blob_end - chunk.blob_offset;
                new = true;
            }
        }
        if new {
            state.last_new = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Stops recording (a trace is used instead, or the recording is done).
    pub(crate) fn stop(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    /// Waits until reads have settled as `settings` says (at least one chunk read), then
    /// stops and returns what was recorded and its compressed bytes.
    async fn settled(&self, settings: LearnSettings) -> (Vec<(u64, u64)>, u64) {
        loop {
            let (last, bytes, full) = {
                let state = self.state.lock();
                (
                    state.last_new,
                    state.bytes,
                    state.order.len() >= MAX_ENTRIES,
                )
            };
            if bytes >= settings.max_bytes || full {
                break;
            }
            match last {
                None => self.changed.notified().await,
                Some(last) => {
                    let due = last + settings.settle;
                    if Instant::now() >= due {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                }
            }
        }
        self.stop();
        let mut state = self.state.lock();
        (std::mem::take(&mut state.order), state.bytes)
    }
}

/// One mounted layer's learning: finds a trace and replays it, or records one.
pub(crate) async fn run(
    learning: Arc<Learning>,
    image: Digest,
    layer: EstargzLayer,
    reader: Arc<ChunkReader>,
    recorder: Arc<Recorder>,
) {
    let blob = &layer.blob;
    learning.report(&blob.digest, |l| {
        l.image = image.to_string();
        l.state = LearnState::Looking;
    });
    let found = match learning.book.find(&image, blob).await {
        Ok(found) => found,
        Err(error) => {
            warn!(blob = %blob.digest, %image, error = %shoal_fetcher::with_causes(&error), "cannot read the layer's trace; recording a new one");
            None
        }
    };
    if let Some(found) = found {
        let from = found.origin.describe();
        match Trace::decode(&found.bytes) {
            Ok(trace)
                if trace.unit == Unit::EstargzChunk
                    && trace.image == image.raw().0
                    && trace.layer == blob.digest.raw().0 =>
            {
                recorder.stop();
                replay(&learning, &image, &layer, &reader, &trace, found.origin).await;
                return;
            }
            Ok(trace) => {
                add(&learning.counters.ignored, 1);
                let recorded_for = Digest::from_raw(shoal_fetcher::RawDigest(trace.image));
                info!(blob = %blob.digest, %image, %recorded_for, from, "trace was recorded for another image or layer; ignored");
                learning.report(&blob.digest, |l| {
                    l.reason = format!("a trace from {from} was recorded for another image or layer ({recorded_for})");
                });
            }
            Err(error) => {
                add(&learning.counters.rejected, 1);
                warn!(blob = %blob.digest, %image, from, %error, "trace rejected: not used for prefetch");
                learning.report(&blob.digest, |l| {
                    l.reason = format!("a trace from {from} was rejected: {error}");
                });
            }
        }
    }
    learning.report(&blob.digest, |l| l.state = LearnState::Recording);
    let (entries, bytes) = recorder.settled(learning.settings).await;
    let chunks = entries.len() as u64;
    let trace = Trace {
        unit: Unit::EstargzChunk,
        image: image.raw().0,
        layer: blob.digest.raw().0,
        entries,
    };
    let (book, image_key, blob_key) = (learning.book.clone(), image.clone(), blob.digest.clone());
    let kept =
        tokio::task::spawn_blocking(move || book.keep(&image_key, &blob_key, &trace.encode()))
            .await;
    match kept {
        Ok(Ok(())) => {
            add(&learning.counters.recorded, 1);
            info!(blob = %blob.digest, %image, chunks, bytes, "trace recorded");
            learning.report(&blob.digest, |l| {
                l.state = LearnState::Recorded;
                l.chunks = chunks;
                l.bytes = bytes;
            });
            match learning.book.publish(&image, blob).await {
                None => {}
                Some(Ok(pushed)) => {
                    info!(blob = %blob.digest, %image, artifact = %pushed.artifact, traces = pushed.traces, tag = pushed.tag.as_deref().unwrap_or(""), "traces pushed to the registry")
                }
                Some(Err(error)) => {
                    warn!(blob = %blob.digest, %image, error = %shoal_fetcher::with_causes(&error), "traces not pushed to the registry")
                }
            }
        }
        Ok(Err(error)) => {
            warn!(blob = %blob.digest, %image, error = %shoal_fetcher::with_causes(&error), "trace recorded but not kept")
        }
        Err(error) => warn!(blob = %blob.digest, %error, "keeping a trace failed"),
    }
}

async fn replay(
    learning: &Learning,
    image: &Digest,
    layer: &EstargzLayer,
    reader: &Arc<ChunkReader>,
    trace: &Trace,
    origin: TraceOrigin,
) {
    let peer = match &origin {
        TraceOrigin::Node => None,
        other => Some(other.describe()),
    };
    let blob = &layer.blob;
    learning.report(&blob.digest, |l| {
        l.state = LearnState::Replaying;
        l.peer = peer.clone().unwrap_or_default();
    });
    info!(blob = %blob.digest, %image, chunks = trace.entries.len(), from = peer.as_deref().unwrap_or("this node"), "prefetching the chunks a trace names");
    let started = Instant::now();
    let replayed = reader
        .prefetch_chunks(blob, &layer.index, &trace.entries)
        .await;
    let c = &learning.counters;
    add(&c.replayed, 1);
    add(&c.prefetched_chunks, replayed.chunks);
    add(&c.prefetched_bytes, replayed.bytes);
    add(&c.prefetch_failed_chunks, replayed.failed);
    info!(blob = %blob.digest, %image, chunks = replayed.chunks, bytes = replayed.bytes, failed = replayed.failed, unknown = replayed.unknown, seconds = started.elapsed().as_secs_f64(), "trace prefetched");
    learning.report(&blob.digest, |l| {
        l.state = LearnState::Replayed;
        l.chunks = replayed.chunks;
        l.bytes = replayed.bytes;
    });
    if let Some(peer) = peer {
        match origin {
            TraceOrigin::Registry(_) => add(&c.from_registry, 1),
            _ => add(&c.from_peers, 1),
        }
        // Kept here too, so this node can give it on.
        let bytes = trace.encode();
        let (book, image, digest) = (learning.book.clone(), image.clone(), blob.digest.clone());
        let kept = tokio::task::spawn_blocking(move || book.keep(&image, &digest, &bytes)).await;
        if let Ok(Err(error)) = kept {
            warn!(from = %peer, error = %shoal_fetcher::with_causes(&error), "trace from elsewhere not kept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_formats::estargz::Sha256Digest;

    fn chunk(file_offset: u64, blob_offset: u64) -> Chunk {
        Chunk {
            file_offset,
            size: 100,
            blob_offset,
            blob_end: blob_offset + 50,
            inner_offset: 0,
            digest: Sha256Digest::from_bytes([0; 32]),
        }
    }

    const SETTINGS: LearnSettings = LearnSettings {
        settle: Duration::from_secs(5),
        max_bytes: 1 << 20,
    };

    #[tokio::test(start_paused = true)]
    async fn a_recording_keeps_first_reads_in_order_until_they_settle() {
        let recorder = Recorder::new();
        let ino = Ino::new(7);
        let settled = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.settled(SETTINGS).await })
        };
        // Nothing read yet: a recording waits however long that takes.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!settled.is_finished());
        recorder.note(ino, &[chunk(100, 1000), chunk(0, 900)]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        // A chunk read again is not new, and does not delay the end.
        recorder.note(ino, &[chunk(0, 900)]);
        recorder.note(Ino::new(9), &[chunk(0, 5000)]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!settled.is_finished(), "a new chunk 4 s ago: not settled");
        recorder.note(ino, &[chunk(0, 900)]);
        let (entries, bytes) = settled.await.unwrap();
        assert_eq!(entries, [(7, 100), (7, 0), (9, 0)]);
        assert_eq!(bytes, 150);
        assert!(!recorder.is_active());
        // Once stopped, reads are not noted.
        recorder.note(ino, &[chunk(500, 7000)]);
        assert_eq!(recorder.state.lock().order.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recording_ends_at_its_byte_cap_without_waiting() {
        let recorder = Recorder::new();
        let settings = LearnSettings {
            max_bytes: 100,
            ..SETTINGS
        };
        let settled = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.settled(settings).await })
        };
        recorder.note(Ino::new(2), &[chunk(0, 0), chunk(100, 50)]);
        let started = Instant::now();
        let (entries, bytes) = settled.await.unwrap();
        assert_eq!((entries.len(), bytes), (2, 100));
        assert!(started.elapsed() < SETTINGS.settle);
    }
}
