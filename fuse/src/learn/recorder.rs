//! The parts a layer blob's reads touch, in the order first touched, while it records: what a
//! trace is made of. A part is named by two numbers the format chooses (an eStargz chunk's
//! inode and file offset, an overlaybd block's index and 1).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use shoal_formats::trace::MAX_ENTRIES;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::LearnSettings;

/// One layer blob's recording.
pub(crate) struct Recorder {
    active: AtomicBool,
    /// Whether a new part starts the settle clock again; off while reads are not yet the
    /// start's own (a disk's filesystem being mounted).
    clock: AtomicBool,
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
            clock: AtomicBool::new(true),
            state: Mutex::default(),
            changed: Notify::new(),
        })
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A read touched `parts`: each a name and its compressed bytes. Called on the FUSE
    /// thread: a lock and a set insert per part.
    pub(crate) fn note(&self, parts: impl IntoIterator<Item = ((u64, u64), u64)>) {
        if !self.is_active() {
            return;
        }
        let mut state = self.state.lock();
        let mut new = false;
        for (name, bytes) in parts {
            if state.order.len() >= MAX_ENTRIES {
                break;
            }
            if state.seen.insert(name) {
                state.order.push(name);
                state.bytes += bytes;
                new = true;
            }
        }
        if new && self.clock.load(Ordering::Relaxed) {
            state.last_new = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Parts noted from now on are kept, but start no settle clock until
    /// [`start_clock`](Self::start_clock).
    pub(crate) fn hold_clock(&self) {
        self.clock.store(false, Ordering::Relaxed);
    }

    /// The start's own reads begin: the next new part starts the settle clock.
    pub(crate) fn start_clock(&self) {
        self.clock.store(true, Ordering::Relaxed);
    }

    /// Stops recording (a trace is used instead, or the recording is done).
    pub(crate) fn stop(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    /// Waits until reads have settled as `settings` says (at least one part read), then
    /// stops and returns what was recorded, how many parts and their compressed bytes.
    pub(crate) async fn settled(&self, settings: LearnSettings) -> (Vec<(u64, u64)>, u64, u64) {
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
        let order = std::mem::take(&mut state.order);
        let parts = order.len() as u64;
        (order, parts, state.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A part named (`a`, `b`) of 50 compressed bytes.
    fn part(a: u64, b: u64) -> ((u64, u64), u64) {
        ((a, b), 50)
    }

    const SETTINGS: LearnSettings = LearnSettings {
        settle: Duration::from_secs(5),
        max_bytes: 1 << 20,
    };

    #[tokio::test(start_paused = true)]
    async fn a_recording_keeps_first_reads_in_order_until_they_settle() {
        let recorder = Recorder::new();
        let settled = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.settled(SETTINGS).await })
        };
        // Nothing read yet: a recording waits however long that takes.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!settled.is_finished());
        recorder.note([part(7, 100), part(7, 0)]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        // A part read again is not new, and does not delay the end.
        recorder.note([part(7, 0)]);
        recorder.note([part(9, 0)]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!settled.is_finished(), "a new part 4 s ago: not settled");
        recorder.note([part(7, 0)]);
        let (entries, parts, bytes) = settled.await.unwrap();
        assert_eq!(entries, [(7, 100), (7, 0), (9, 0)]);
        assert_eq!((parts, bytes), (3, 150));
        assert!(!recorder.is_active());
        // Once stopped, reads are not noted.
        recorder.note([part(7, 500)]);
        assert_eq!(recorder.state.lock().order.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn parts_noted_before_the_clock_starts_are_kept_but_do_not_end_the_recording() {
        let recorder = Recorder::new();
        recorder.hold_clock();
        let settled = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.settled(SETTINGS).await })
        };
        recorder.note([part(1, 0)]);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!settled.is_finished(), "a mount's reads alone end nothing");
        recorder.start_clock();
        recorder.note([part(1, 0), part(2, 0)]);
        let (entries, _, _) = settled.await.unwrap();
        assert_eq!(entries, [(1, 0), (2, 0)]);
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
        recorder.note([part(2, 0), part(2, 100)]);
        let started = Instant::now();
        let (entries, _, bytes) = settled.await.unwrap();
        assert_eq!((entries.len(), bytes), (2, 100));
        assert!(started.elapsed() < SETTINGS.settle);
    }
}
