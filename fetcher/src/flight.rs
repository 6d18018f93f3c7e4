//! Single-flight per block: the first reader of a missing block fetches it, later readers of
//! the same block wait for that fetch instead of starting their own. A fetch that failed keeps
//! answering with its error for a short hold, so that a reader arriving right after it (the
//! kernel retrying a failed readahead with a read of its own) does not wait a second deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
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
    /// Blocks whose fetch failed, with the error and when it stops being the answer.
    failed: Mutex<HashMap<BlockKey, (Arc<FetchError>, Instant)>>,
    /// How long a failure stays the answer (zero: not at all).
    hold: Duration,
}

/// How a reader takes part in a block's fetch.
pub enum Joined {
    /// Nobody was fetching the block: the caller must, and must complete the [`Lead`].
    Lead(Lead),
    /// Someone is: wait on the receiver.
    Follow(Waiter),
}

impl Flights {
    /// Flights whose failures stay the answer for `hold`.
    pub fn with_failure_hold(hold: Duration) -> Flights {
        Flights {
            hold,
            ..Flights::default()
        }
    }

    /// Joins the fetch of `key`, or leads a new one. With `reuse_failure`, a fetch of it that
    /// failed within the hold answers again instead.
    pub fn join(self: &Arc<Self>, key: &BlockKey, reuse_failure: bool) -> Joined {
        if let Some(cause) = reuse_failure.then(|| self.recent_failure(key)).flatten() {
            let (_sender, slot) = watch::channel(Some(Err(cause)));
            return Joined::Follow(Waiter {
                key: key.clone(),
                slot,
            });
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = pending.get(key) {
            return Joined::Follow(Waiter {
                key: key.clone(),
                slot: slot.clone(),
            });
        }
        let (sender, slot) = watch::channel(None);
        pending.insert(key.clone(), slot);
        Joined::Lead(Lead {
            key: key.clone(),
            sender,
            flights: self.clone(),
        })
    }
}

impl Flights {
    fn recent_failure(&self, key: &BlockKey) -> Option<Arc<FetchError>> {
        if self.hold.is_zero() {
            return None;
        }
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failed.get(key) {
            Some((cause, until)) if Instant::now() < *until => Some(cause.clone()),
            Some(_) => {
                failed.remove(key);
                None
            }
            None => None,
        }
    }

    fn forget_failure(&self, key: &BlockKey) {
        if !self.hold.is_zero() {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            failed.remove(key);
        }
    }

    fn remember_failure(&self, key: &BlockKey, cause: Arc<FetchError>) {
        if self.hold.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.len() >= MAX_FAILURES {
            failed.retain(|_, (_, until)| now < *until);
        }
        if failed.len() >= MAX_FAILURES {
            let oldest = failed
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                failed.remove(&oldest);
            }
        }
        failed.insert(key.clone(), (cause, now + self.hold));
    }
}

/// The duty to fetch one block. Dropping it ends the flight: waiters who got no result then
/// see the fetch as abandoned, and the next reader starts a new one.
pub struct Lead {
    key: BlockKey,
    sender: watch::Sender<Option<BlockResult>>,
    flights: Arc<Flights>,
}

impl Lead {
    pub fn key(&self) -> &BlockKey {
        &self.key
    }

    pub fn waiter(&self) -> Waiter {
        Waiter {
            key: self.key.clone(),
            slot: self.sender.subscribe(),
        }
    }

    /// Hands `result` to every waiter. The flight stays joinable, answering at once, until
    /// the lead drops, which lets the leader finish caching first.
    pub fn publish(&self, result: BlockResult) {
        match &result {
            Err(cause) => self.flights.remember_failure(&self.key, cause.clone()),
            Ok(_) => self.flights.forget_failure(&self.key),
        }
        self.sender.send_replace(Some(result));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut pending = self
            .flights
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending.remove(&self.key);
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

    #[tokio::test]
    async fn a_failure_is_the_answer_for_its_hold_only() {
        let flights = Arc::new(Flights::with_failure_hold(Duration::from_secs(2)));
        let key = BlockKey::new(Digest::of(b"blob"), 1);
        let Joined::Lead(lead) = flights.join(&key, true) else {
            panic!("first reader leads");
        };
        lead.publish(Err(Arc::new(FetchError::AbandonedFetch {
            block: key.clone(),
        })));
        drop(lead);
        assert!(
            matches!(flights.join(&key, false), Joined::Lead(_)),
            "a reader that wants a fresh fetch gets one"
        );
        let Joined::Follow(late) = flights.join(&key, true) else {
            panic!("a reader right after the failure gets it, without fetching again");
        };
        assert!(matches!(
            late.wait().await,
            Err(FetchError::JoinFetch { .. })
        ));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            matches!(flights.join(&key, true), Joined::Lead(_)),
            "after the hold the block is fetched again"
        );
        let other = BlockKey::new(Digest::of(b"blob"), 2);
        assert!(matches!(flights.join(&other, true), Joined::Lead(_)));
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
