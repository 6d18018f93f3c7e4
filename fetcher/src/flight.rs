//! Single-flight per block: the first reader of a missing block fetches it, later readers of
//! the same block wait for that fetch instead of starting their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::cache::BlockKey;
use crate::error::FetchError;

pub type BlockResult = Result<Bytes, Arc<FetchError>>;
type Slot = watch::Receiver<Option<BlockResult>>;

/// Blocks being fetched, each with the channel its result will arrive on.
#[derive(Default)]
pub struct Flights {
    pending: Mutex<HashMap<BlockKey, Slot>>,
}

/// How a reader takes part in a block's fetch.
pub enum Joined {
    /// Nobody was fetching the block: the caller must, and must complete the [`Lead`].
    Lead(Lead),
    /// Someone is: wait on the receiver.
    Follow(Waiter),
}

impl Flights {
    pub fn join(self: &Arc<Self>, key: &BlockKey) -> Joined {
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
        let Joined::Lead(lead) = flights.join(&key) else {
            panic!("first reader leads");
        };
        let Joined::Follow(follower) = flights.join(&key) else {
            panic!("second reader follows");
        };
        let own = lead.waiter();
        lead.publish(Ok(Bytes::from_static(b"data")));
        assert_eq!(follower.wait().await.unwrap(), Bytes::from_static(b"data"));
        assert_eq!(own.wait().await.unwrap(), Bytes::from_static(b"data"));
        drop(lead);
        assert!(matches!(flights.join(&key), Joined::Lead(_)));
    }

    #[tokio::test]
    async fn dropped_lead_abandons_waiters() {
        let flights = Arc::new(Flights::default());
        let key = BlockKey::new(Digest::of(b"blob"), 0);
        let Joined::Lead(lead) = flights.join(&key) else {
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
