//! [`Announcer`]: tells a blob's index owners which of its blocks this node holds, as they
//! land (batched: whatever landed while the last batch was in flight goes in the next), and
//! renews every lease in full before it expires or when the owners change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::blockset::BlockSet;
use super::rendezvous;
use super::wire::Announce;
use super::Peers;
use crate::digest::Digest;
use crate::fetcher::Fetcher;

/// The shareable set is saved at most this often (and at every renewal), when it changed.
const SAVE_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Announcer {
    /// Blocks landed since the last batch, by blob.
    fresh: Mutex<HashMap<Digest, BlockSet>>,
    renew: std::sync::atomic::AtomicBool,
    /// A batch taken from `fresh` (or a renewal) is being sent.
    sending: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Announcer {
    pub fn landed(&self, blob: &Digest, blocks: &BlockSet) {
        self.fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(blob.clone())
            .or_default()
            .merge(blocks);
        self.wake.notify_one();
    }

    /// Whether something is still to be announced or being announced. `sending` is set
    /// before a batch is taken and read after what it takes, so this never reads idle while
    /// a batch is in between.
    pub fn is_busy(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.renew.load(SeqCst)
            || !self
                .fresh
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            || self.sending.load(SeqCst)
    }

    /// Asks for every held block to be announced again, in full.
    pub fn renew_all(&self) {
        self.renew.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Runs until the runtime shuts down.
pub async fn run(peers: Arc<Peers>, fetcher: Fetcher) {
    // Renewing at a third of the lease survives one lost renewal.
    let renew_every = (peers.config.lease / 3).max(Duration::from_secs(1));
    let mut renewed = Instant::now();
    let mut saved = Instant::now();
    loop {
        // Woken sooner when there is a changed set to save.
        let sleep = if peers.shareable.is_dirty() {
            SAVE_EVERY.min(renew_every)
        } else {
            renew_every
        };
        let _ = tokio::time::timeout(sleep, peers.announcer.wake.notified()).await;
        let me = match peers.members.me() {
            Some(me) => me,
            // Nobody can be told where to find us yet; keep what landed for later.
            None => continue,
        };
        peers
            .announcer
            .sending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let renew = peers
            .announcer
            .renew
            .swap(false, std::sync::atomic::Ordering::SeqCst)
            || renewed.elapsed() >= renew_every;
        let (batch, replace) = if renew {
            renewed = Instant::now();
            peers
                .announcer
                .fresh
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            (peers.shareable.retain_cached(fetcher.cache()), true)
        } else {
            let fresh = std::mem::take(
                &mut *peers
                    .announcer
                    .fresh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            (fresh.into_iter().collect(), false)
        };
        let live = peers.members.live(Instant::now());
        let sends = batch.iter().flat_map(|(blob, blocks)| {
            let announce = Announce {
                from: me.to_string(),
                blob: blob.to_string(),
                block_size: peers.block_size,
                blocks: blocks.to_hex(),
                replace,
            };
            let owners = rendezvous::owners(blob, &live, peers.config.owners);
            let peers = &peers;
            owners.into_iter().map(move |owner| {
                let announce = announce.clone();
                let blob = blob.clone();
                let blocks = blocks.clone();
                async move {
                    if owner == me {
                        peers
                            .index
                            .announce(Instant::now(), me, &blob, &blocks, replace);
                    } else if let Err(failure) = peers
                        .client
                        .announce(owner, &announce, Duration::from_secs(2))
                        .await
                    {
                        debug!(%owner, %failure, "announcement not delivered");
                    }
                }
            })
        });
        join_all(sends).await;
        peers
            .announcer
            .sending
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if renew || saved.elapsed() >= SAVE_EVERY {
            saved = Instant::now();
            if let Err(error) = peers.shareable.save() {
                warn!(%error, "what this node shares will be forgotten on restart");
            }
        }
    }
}
