//! Single-flight per block: the first reader of a missing block fetches it, later readers of
//! the same block wait for that fetch instead of starting their own.
//!
//! A block whose fetch failed moments ago is fetched again, not failed from memory, but its
//! lead is marked [`Lead::after_failure`] so that the fetch is one short attempt: the kernel
//! follows a failed readahead with a read of its own, which must not wait out a second
//! registry deadline, while a read after the registry has come back must succeed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cache::BlockKey;
use crate::error::FetchError;

pub type BlockResult = Result<Bytes, Arc<FetchError>>;
type Slot = watch::Receiver<Option<BlockResult>>;

/// Failures remembered at most; past it the oldest are forgotten first.
const MAX_FAILURES: usize = 4096;

/// Blocks being fetched, each with the channel its result will arrive on.
#[derive(Default)]
pub struct Flights {
    pending: Mutex<HashMap<BlockKey, Slot>>,
    /// Blocks whose full fetch failed, with when that stops counting as recent.
    failed: Mutex<HashMap<BlockKey, Instant>>,
    /// How long a failure counts as recent (zero: not at all).
    window: Duration,
}

/// How a reader takes part in a block's fetch.
pub enum Joined {
    /// Nobody was fetching the block: the caller must, and must complete the [`Lead`].
    Lead(Lead),
    /// Someone is: wait on the receiver.
    Follow(Waiter),
}

impl Flights {
    /// Flights that remember a failed fetch for `window`, so that a new fetch of the same
    /// block within it is led [`after_failure`](Lead::after_failure).
    pub fn with_failure_window(window: Duration) -> Flights {
        Flights {
            window,
            ..Flights::default()
        }
    }

    /// Joins the fetch of `key`, or leads a new one. With `after_failure`, a new fetch of a
    /// block whose fetch failed within the window is led as one after a failure; without it
    /// (opening a layer, refetching a bad chunk), every fetch is a full one.
    pub fn join(self: &Arc<Self>, key: &BlockKey, after_failure: bool) -> Joined {
        let mut pending = self.pending.lock();
        if let Some(slot) = pending.get(key) {
            return Joined::Follow(Waiter {
                key: *key,
                slot: slot.clone(),
            });
        }
        let (sender, slot) = watch::channel(None);
        pending.insert(*key, slot);
        drop(pending);
        Joined::Lead(Lead {
            key: *key,
            sender,
            after_failure: after_failure && self.failed_recently(key),
            flights: self.clone(),
        })
    }
}

impl Flights {
    /// A wait for `key`'s fetch when one is under way; never starts one.
    pub fn follow(&self, key: &BlockKey) -> Option<Waiter> {
        let slot = self.pending.lock().get(key).cloned()?;
        Some(Waiter { key: *key, slot })
    }

    /// Whether every block of `keys` failed its full fetch within the window: a fetch of
    /// bytes within them gets one short attempt.
    pub fn all_failed_recently(&self, keys: &[BlockKey]) -> bool {
        !keys.is_empty() && keys.iter().all(|key| self.failed_recently(key))
    }

    /// Records the outcome of a fetch of bytes within `keys` that was not led as a block:
    /// as [`Lead::publish`] does for a block's. A short attempt's failure is not recorded.
    pub fn fetched(&self, keys: &[BlockKey], ok: bool, after_failure: bool) {
        for key in keys {
            match (ok, after_failure) {
                (true, _) => self.forget_failure(key),
                (false, false) => self.remember_failure(key),
                (false, true) => {}
            }
        }
    }

    /// Waits until nobody fetches `key` any more: its lead has cached the block, or failed.
    /// A refetch waits for this, so that it neither joins a flight whose bytes it rejected
    /// nor has those bytes land in the cache after it dropped them.
    pub async fn ended(&self, key: &BlockKey) {
        let slot = self.pending.lock().get(key).cloned();
        if let Some(mut slot) = slot {
            // Only the lead's drop closes the channel; its result may already be in.
            while slot.changed().await.is_ok() {}
        }
    }

    fn failed_recently(&self, key: &BlockKey) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let mut failed = self.failed.lock();
        match failed.get(key) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                failed.remove(key);
                false
            }
            None => false,
        }
    }

    fn forget_failure(&self, key: &BlockKey) {
        if !self.window.is_zero() {
            let mut failed = self.failed.lock();
            failed.remove(key);
        }
    }

    fn remember_failure(&self, key: &BlockKey) {
        if self.window.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut failed = self.failed.lock();
        if failed.len() >= MAX_FAILURES {
            failed.retain(|_, until| now < *until);
        }
        if failed.len() >= MAX_FAILURES {
            let oldest = failed
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                failed.remove(&oldest);
            }
        }
        failed.insert(*key, now + self.window);
    }
}

/// The duty to fetch one block. Dropping it ends the flight: waiters who got no result then
/// see the fetch as abandoned, and the next reader starts a new one.
pub struct Lead {
    key: BlockKey,
    sender: watch::Sender<Option<BlockResult>>,
    after_failure: bool,
    flights: Arc<Flights>,
}

impl Lead {
    pub fn key(&self) -> &BlockKey {
        &self.key
    }

    /// Whether the block's full fetch failed within the window: this fetch should be one
    /// short attempt, and its failure does not make the block's failure recent again (so a
    /// registry slower than that attempt gets a full fetch once the window has passed).
    pub fn after_failure(&self) -> bool {
        self.after_failure
    }

    pub fn waiter(&self) -> Waiter {
        Waiter {
            key: self.key,
            slot: self.sender.subscribe(),
        }
    }

    /// Hands `result` to every waiter. The flight stays joinable, answering at once, until
    /// the lead drops, which lets the leader finish caching first.
    pub fn publish(&self, result: BlockResult) {
        match &result {
            Err(_) if !self.after_failure => self.flights.remember_failure(&self.key),
            Err(_) => {}
            Ok(_) => self.flights.forget_failure(&self.key),
        }
        self.sender.send_replace(Some(result));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.flights.pending.lock().remove(&self.key);
    }
}

/// A reader's end of one block's flight.
pub struct Waiter {
    key: BlockKey,
    slot: Slot,
}

impl Waiter {
    pub async fn wait(mut self) -> Result<Bytes, FetchError> {
        let result = match self.slot.wait_for(Option::is_some).await {
            Ok(result) => result.clone(),
            Err(_) => return Err(FetchError::AbandonedFetch { block: self.key }),
        };
        match result {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(cause)) => Err(FetchError::JoinFetch {
                block: self.key,
                cause,
            }),
            None => Err(FetchError::AbandonedFetch { block: self.key }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[tokio::test]
    async fn followers_share_the_leaders_result() {
        let flights = Arc::new(Flights::default());
        let key = BlockKey::new(Digest::of(b"blob"), 3);
        let Joined::Lead(lead) = flights.join(&key, true) else {
            panic!("first reader leads");
        };
        let Joined::Follow(follower) = flights.join(&key, true) else {
            panic!("second reader follows");
        };
        let own = lead.waiter();
        lead.publish(Ok(Bytes::from_static(b"data")));
        assert_eq!(follower.wait().await.unwrap(), Bytes::from_static(b"data"));
        assert_eq!(own.wait().await.unwrap(), Bytes::from_static(b"data"));
        drop(lead);
        assert!(matches!(flights.join(&key, true), Joined::Lead(_)));
    }

    fn fail(lead: &Lead) {
        lead.publish(Err(Arc::new(FetchError::AbandonedFetch {
            block: *lead.key(),
        })));
    }

    fn lead(flights: &Arc<Flights>, key: &BlockKey, after_failure: bool) -> Lead {
        match flights.join(key, after_failure) {
            Joined::Lead(lead) => lead,
            Joined::Follow(_) => panic!("nobody is fetching {key}"),
        }
    }

    #[tokio::test]
    async fn a_fetch_soon_after_a_failure_is_led_again_and_marked() {
        let flights = Arc::new(Flights::with_failure_window(Duration::from_secs(3600)));
        let key = BlockKey::new(Digest::of(b"blob"), 1);
        let first = lead(&flights, &key, true);
        assert!(!first.after_failure(), "nothing failed yet");
        fail(&first);
        drop(first);

        // The next reader fetches again (it is never answered from memory), briefly.
        let second = lead(&flights, &key, true);
        assert!(second.after_failure());
        let Joined::Follow(joined) = flights.join(&key, true) else {
            panic!("a reader of a block being fetched joins that fetch");
        };
        fail(&second);
        assert!(matches!(
            joined.wait().await,
            Err(FetchError::JoinFetch { .. })
        ));
        drop(second);
        assert!(
            !lead(&flights, &key, false).after_failure(),
            "opening a layer or refetching is always a full fetch"
        );
        let other = BlockKey::new(Digest::of(b"blob"), 2);
        assert!(!lead(&flights, &other, true).after_failure());

        // A success forgets the failure.
        let third = lead(&flights, &key, true);
        third.publish(Ok(Bytes::from_static(b"data")));
        drop(third);
        assert!(!lead(&flights, &key, true).after_failure());
    }

    #[tokio::test]
    async fn a_short_fetch_that_fails_does_not_renew_the_failure() {
        let flights = Arc::new(Flights::with_failure_window(Duration::from_secs(3600)));
        let key = BlockKey::new(Digest::of(b"blob"), 1);
        let until = |flights: &Flights| flights.failed.lock().get(&key).copied();
        let first = lead(&flights, &key, true);
        fail(&first);
        drop(first);
        let recent_until = until(&flights).expect("the full fetch's failure is remembered");
        let short = lead(&flights, &key, true);
        assert!(short.after_failure());
        fail(&short);
        drop(short);
        // The window still ends where the full fetch's failure put it: once it has passed,
        // the next fetch is a full one again, however often short ones failed meanwhile.
        assert_eq!(until(&flights), Some(recent_until));
    }

    #[tokio::test]
    async fn dropped_lead_abandons_waiters() {
        let flights = Arc::new(Flights::default());
        let key = BlockKey::new(Digest::of(b"blob"), 0);
        let Joined::Lead(lead) = flights.join(&key, true) else {
            panic!("first reader leads");
        };
        let waiter = lead.waiter();
        drop(lead);
        assert!(matches!(
            waiter.wait().await,
            Err(FetchError::AbandonedFetch { .. })
        ));
    }
}
