//! Learned prefetch, for every lazy format. The first start of an image on a node records
//! which parts of each layer blob its containers read, in order, until reads settle (no part
//! read for the first time for `settle`, or `max_bytes` of them); the trace is kept by image
//! manifest and layer blob digest ([`TraceBook`]). A later mount of that blob for that image
//! (on this node, or on any peer, which finds the trace through the peer network or the
//! registry) fetches exactly those parts at once, before the container asks.
//!
//! What a part is belongs to the format, behind [`TraceTarget`]: an eStargz chunk
//! (`layer/replay.rs`), overlaybd ZFile blocks (`vdisk/replay.rs`). A trace is only ever a list
//! of what to fetch: every part is checked like any read. One recorded for another image,
//! layer or format is ignored; one that does not parse, or names parts the blob does not
//! have, is rejected with one log line. Either way the layer goes on as without a trace, and
//! records its own (which replaces the unusable one).

mod recorder;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shoal_fetcher::{BlobRef, Digest, TraceBook, TraceOrigin};
use shoal_formats::trace::{Trace, Unit};
use tracing::{info, warn};

pub(crate) use recorder::Recorder;

/// Layers whose learning is reported, at most (the oldest forgotten first).
const MAX_REPORTED: usize = 4096;

/// When a recording ends.
#[derive(Debug, Clone, Copy)]
pub struct LearnSettings {
    /// No chunk read for the first time for this long: the start has settled.
    pub settle: Duration,
    /// Compressed bytes of parts recorded at most.
    pub max_bytes: u64,
}

/// Learned prefetch for a layer mounted for an image: replay its trace, or record one.
pub struct Learn {
    pub learning: Arc<Learning>,
    /// The image's manifest digest, which keys the trace with the layer's blob digest.
    pub image: Digest,
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
    /// Chunks (eStargz) or ZFile blocks (overlaybd) recorded, or fetched ahead by the replay.
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

/// What one format does with the trace of one layer blob.
pub(crate) trait TraceTarget: Send + Sync {
    /// The unit its traces name.
    fn unit(&self) -> Unit;

    /// Why `entries` cannot name parts of this blob, if they cannot: the trace is rejected.
    fn check(&self, entries: &[(u64, u64)]) -> Result<(), String>;

    /// The entries a recording noted, as the trace keeps them.
    fn recorded(&self, entries: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        entries
    }

    /// Fetches the parts `entries` name (in the order first read), each checked as any read.
    fn replay<'a>(&'a self, entries: &'a [(u64, u64)]) -> BoxFuture<'a, Replayed>;
}

/// What a replay fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Parts (chunks, blocks) fetched and checked (not in memory or the cache before).
    pub chunks: u64,
    /// Their compressed bytes.
    pub bytes: u64,
    /// Parts whose fetch failed (a container's read fetches them again).
    pub failed: u64,
    /// Trace entries the layer does not have.
    pub unknown: u64,
}

/// One mounted layer blob's learning: finds a trace and replays it into `target`, or records
/// one with `recorder`, which the layer's reads note their parts to.
pub(crate) async fn run(
    learning: Arc<Learning>,
    image: Digest,
    blob: BlobRef,
    target: impl TraceTarget,
    recorder: Arc<Recorder>,
) {
    let blob = &blob;
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
        match judge(&found.bytes, &image, blob, &target) {
            Judged::Usable(trace) => {
                recorder.stop();
                replay(&learning, &image, blob, &target, &trace, found.origin).await;
                return;
            }
            Judged::Elsewhere(trace) => {
                add(&learning.counters.ignored, 1);
                let recorded_for = Digest::from_raw(shoal_fetcher::RawDigest(trace.image));
                info!(blob = %blob.digest, %image, %recorded_for, from, "trace was recorded for another image or layer; ignored");
                learning.report(&blob.digest, |l| {
                    l.reason = format!("a trace from {from} was recorded for another image or layer ({recorded_for})");
                });
            }
            Judged::Rejected(error) => {
                add(&learning.counters.rejected, 1);
                warn!(blob = %blob.digest, %image, from, %error, "trace rejected: not used for prefetch");
                learning.report(&blob.digest, |l| {
                    l.reason = format!("a trace from {from} was rejected: {error}");
                });
            }
        }
    }
    learning.report(&blob.digest, |l| l.state = LearnState::Recording);
    let (entries, chunks, bytes) = recorder.settled(learning.settings).await;
    let entries = target.recorded(entries);
    let trace = Trace {
        unit: target.unit(),
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

/// What a found trace is to a blob.
#[derive(Debug, PartialEq)]
enum Judged {
    /// Recorded for this image and blob, in the target's unit, naming parts the blob has.
    Usable(Trace),
    /// Recorded for another image, blob or format.
    Elsewhere(Trace),
    /// Not a trace (why), or one for this blob naming parts it does not have: damaged,
    /// however well sealed.
    Rejected(String),
}

fn judge(bytes: &[u8], image: &Digest, blob: &BlobRef, target: &impl TraceTarget) -> Judged {
    let trace = match Trace::decode(bytes) {
        Ok(trace) => trace,
        Err(error) => return Judged::Rejected(error.to_string()),
    };
    let ours = trace.unit == target.unit()
        && trace.image == image.raw().0
        && trace.layer == blob.digest.raw().0;
    if !ours {
        return Judged::Elsewhere(trace);
    }
    match target.check(&trace.entries) {
        Ok(()) => Judged::Usable(trace),
        Err(why) => Judged::Rejected(why),
    }
}

async fn replay(
    learning: &Learning,
    image: &Digest,
    blob: &BlobRef,
    target: &impl TraceTarget,
    trace: &Trace,
    origin: TraceOrigin,
) {
    let peer = match &origin {
        TraceOrigin::Node => None,
        other => Some(other.describe()),
    };
    learning.report(&blob.digest, |l| {
        l.state = LearnState::Replaying;
        l.peer = peer.clone().unwrap_or_default();
    });
    info!(blob = %blob.digest, %image, entries = trace.entries.len(), from = peer.as_deref().unwrap_or("this node"), "prefetching what a trace names");
    let started = Instant::now();
    let replayed = target.replay(&trace.entries).await;
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
    use shoal_fetcher::ImageRef;

    /// A blob of 10 parts, named (index, 1).
    struct TenParts;

    impl TraceTarget for TenParts {
        fn unit(&self) -> Unit {
            Unit::OverlaybdBlocks
        }

        fn check(&self, entries: &[(u64, u64)]) -> Result<(), String> {
            match entries.iter().all(|&(at, _)| at < 10) {
                true => Ok(()),
                false => Err("past the end".into()),
            }
        }

        fn replay<'a>(&'a self, _: &'a [(u64, u64)]) -> BoxFuture<'a, Replayed> {
            Box::pin(async { Replayed::default() })
        }
    }

    #[test]
    fn a_trace_is_used_only_for_its_image_blob_and_unit_and_only_when_it_fits() {
        let image = Digest::of(b"image");
        let blob = BlobRef::new(
            ImageRef::parse("registry.test/img:1").unwrap(),
            Digest::of(b"blob"),
            100,
        );
        let trace = Trace {
            unit: Unit::OverlaybdBlocks,
            image: image.raw().0,
            layer: blob.digest.raw().0,
            entries: vec![(3, 1), (0, 1)],
        };
        let judged = |trace: &Trace| judge(&trace.encode(), &image, &blob, &TenParts);
        assert_eq!(judged(&trace), Judged::Usable(trace.clone()));
        for other in [
            Trace {
                unit: Unit::EstargzChunk,
                ..trace.clone()
            },
            Trace {
                image: [7; 32],
                ..trace.clone()
            },
            Trace {
                layer: [7; 32],
                ..trace.clone()
            },
        ] {
            assert_eq!(judged(&other), Judged::Elsewhere(other.clone()));
        }
        let outside = Trace {
            entries: vec![(3, 1), (10, 1)],
            ..trace.clone()
        };
        assert_eq!(judged(&outside), Judged::Rejected("past the end".into()));
        let mut damaged = trace.encode();
        damaged[90] ^= 1;
        assert!(matches!(
            judge(&damaged, &image, &blob, &TenParts),
            Judged::Rejected(_)
        ));
    }
}
