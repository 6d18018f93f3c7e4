//! Layers opened ahead of their Prepare. containerd prepares an image's layers one after
//! another, each waiting for the one below; opening a lazy layer (its footer and index from the
//! registry) is a few round trips and the index's bytes. The first Prepare of an image knows
//! every layer from the manifest, so the layers above it are opened then, side by side, and
//! each later Prepare takes its layer ready, or waits for the open already under way (one
//! open per layer, never two).
//!
//! An open ahead only saves time; it decides nothing. It verifies exactly what an open at the
//! layer's own Prepare would (the index against the digest that Prepare's labels carry, since
//! the key includes it), and one that failed is forgotten, so the Prepare opens again and its
//! own failure is the one reported.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use shoal_fuse::tasks::Tasks;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

/// Opens running at once: an image of many layers must not open all its indexes at the same
/// moment, and the lowest layers, prepared first, start first (the permits are handed out in
/// order).
pub const CONCURRENT_OPENS: usize = 4;
/// Layers opened and not yet taken, at most: a pull that stopped leaves its layers here (the
/// layers above a prepared one are prepared next, unless the pull stops or fails).
pub const MAX_WAITING: usize = 64;
/// How long an opened layer waits for its Prepare. containerd prepares the next layer once the
/// one below is in; one below that is downloaded (not lazy) can take minutes.
pub const WAIT_FOR_PREPARE: Duration = Duration::from_secs(600);

/// Layers of kind `T` opened, or being opened, ahead of their Prepare, by key `K`.
pub struct OpenAhead<K, T> {
    runtime: Handle,
    permits: Arc<Semaphore>,
    slots: Mutex<HashMap<K, Slot<T>>>,
    /// The opens under way, ended with this (the daemon's end).
    tasks: Mutex<Tasks>,
}

/// One layer's open: its result once the open ended. The open holds the lock until then, so a
/// Prepare that comes first waits on it.
struct Slot<T> {
    started: Instant,
    result: Arc<tokio::sync::Mutex<Option<T>>>,
}

impl<K: Eq + Hash + Clone + Send + 'static, T: Send + 'static> OpenAhead<K, T> {
    pub fn new(runtime: Handle) -> OpenAhead<K, T> {
        OpenAhead {
            runtime,
            permits: Arc::new(Semaphore::new(CONCURRENT_OPENS)),
            slots: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Tasks::default()),
        }
    }

    /// Starts `open` for `key` unless it is open or opening already, or too many wait. Only
    /// successes are kept: a failed open leaves no slot's value, so its Prepare opens again.
    pub fn start<E>(&self, key: K, open: impl Future<Output = Result<T, E>> + Send + 'static) {
        let result = Arc::new(tokio::sync::Mutex::new(None));
        let Ok(mut held) = result.clone().try_lock_owned() else {
            return;
        };
        {
            let mut slots = self.slots.lock();
            slots.retain(|_, slot| slot.started.elapsed() < WAIT_FOR_PREPARE);
            if slots.contains_key(&key) || slots.len() >= MAX_WAITING {
                return;
            }
            slots.insert(
                key,
                Slot {
                    started: Instant::now(),
                    result,
                },
            );
        }
        let permits = self.permits.clone();
        self.tasks.lock().spawn(&self.runtime, async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            if let Ok(opened) = open.await {
                *held = Some(opened);
            }
        });
    }

    /// The layer opened ahead for `key`, waiting for its open if it is under way; `None` when
    /// none was started, or it failed or was given up.
    pub async fn take(&self, key: &K) -> Option<T> {
        let slot = self.slots.lock().remove(key)?;
        let mut result = slot.result.lock().await;
        result.take()
    }

    /// Layers opened, or being opened, that no Prepare has taken yet.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.slots.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn ahead() -> OpenAhead<&'static str, u32> {
        OpenAhead::new(Handle::current())
    }

    #[tokio::test]
    async fn a_prepare_that_comes_first_waits_for_the_open_under_way() {
        let ahead = ahead();
        let (open, opened) = tokio::sync::oneshot::channel::<u32>();
        ahead.start("layer", async move { opened.await.map_err(|_| "dropped") });
        let take = ahead.take(&"layer");
        tokio::pin!(take);
        // Still opening: the Prepare waits.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut take)
            .await
            .is_err());
        open.send(7).unwrap();
        assert_eq!(take.await, Some(7));
        // Taken once: a second Prepare of the same layer opens on its own.
        assert_eq!(ahead.take(&"layer").await, None);
        assert_eq!(ahead.waiting(), 0);
    }

    #[tokio::test]
    async fn a_layer_is_opened_once_and_a_failed_open_is_not_kept() {
        let ahead = ahead();
        let opens = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let opens = opens.clone();
            ahead.start("layer", async move {
                opens.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(1)
            });
        }
        assert_eq!(ahead.take(&"layer").await, Some(1));
        assert_eq!(opens.load(Ordering::SeqCst), 1);

        ahead.start("broken", async { Err::<u32, _>("registry said 500") });
        assert_eq!(ahead.take(&"broken").await, None);
        assert_eq!(ahead.take(&"never started").await, None);
    }

    #[tokio::test]
    async fn opens_beyond_the_limit_wait_for_a_permit() {
        let ahead = OpenAhead::<usize, usize>::new(Handle::current());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        for layer in 0..CONCURRENT_OPENS * 2 {
            let (running, most, mut released) = (running.clone(), most.clone(), released.clone());
            ahead.start(layer, async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let _ = released.wait_for(|go| *go).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, ()>(layer)
            });
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while running.load(Ordering::SeqCst) < CONCURRENT_OPENS {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first opens run");
        release.send(true).unwrap();
        for layer in 0..CONCURRENT_OPENS * 2 {
            assert_eq!(ahead.take(&layer).await, Some(layer));
        }
        assert_eq!(most.load(Ordering::SeqCst), CONCURRENT_OPENS);
    }

    #[tokio::test]
    async fn dropping_it_ends_the_opens_and_a_waiting_prepare_gets_nothing() {
        let ahead = Arc::new(ahead());
        ahead.start("stuck", std::future::pending::<Result<u32, ()>>());
        let take = {
            let ahead = ahead.clone();
            tokio::spawn(async move { ahead.take(&"stuck").await })
        };
        tokio::task::yield_now().await;
        ahead.tasks.lock().cancel();
        let taken = tokio::time::timeout(Duration::from_secs(10), take)
            .await
            .expect("the Prepare stops waiting")
            .unwrap();
        assert_eq!(taken, None);
    }
}
