//! [`Announcer`]: tells a blob's index owners which of its blocks this node holds, as they
//! land (batched: whatever landed while the last batch was in flight goes in the next), and
//! renews every lease in full before it expires or when the owners change.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::blockset::BlockSet;
use super::held::HeldBlocks;
use super::member::PeerAddr;
use super::rendezvous;
use super::wire::Announce;
use super::Peers;
use crate::digest::Digest;

/// The shareable set is saved at most this often (and at every renewal), when it changed.
const SAVE_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Announcer {
    /// Blocks landed since the last batch, by blob.
    fresh: Mutex<HashMap<Digest, BlockSet>>,
    renew: std::sync::atomic::AtomicBool,
    /// A batch taken from `fresh` (or a renewal) is being sent, or part of it is due again.
    sending: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Announcer {
    pub fn landed(&self, blob: &Digest, blocks: &BlockSet) {
        self.fresh
            .lock()
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
        self.renew.load(SeqCst) || !self.fresh.lock().is_empty() || self.sending.load(SeqCst)
    }

    /// Asks for every held block to be announced again, in full.
    pub fn renew_all(&self) {
        self.renew.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// An announcement that did not reach its owner is sent again this much later...
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// ...up to this many times in all; after that the next renewal carries it.
const ATTEMPTS: u32 = 4;

/// One announcement to one owner, and how often it was sent.
struct Delivery {
    owner: PeerAddr,
    announce: Announce,
    attempts: u32,
}

/// Runs until the runtime shuts down.
pub async fn run(peers: Arc<Peers>, held: Arc<dyn HeldBlocks>) {
    // Renewing at a third of the lease survives one lost renewal.
    let renew_every = (peers.config.lease / 3).max(Duration::from_secs(1));
    let mut renewed = Instant::now();
    let mut saved = Instant::now();
    // Deliveries that failed and are due again: an owner that missed an announcement would
    // send askers to the registry for blocks this node holds until the next renewal.
    let mut retries: Vec<Delivery> = Vec::new();
    loop {
        // Woken sooner when there is something to send again or a changed set to save.
        let sleep = if !retries.is_empty() {
            RETRY_AFTER
        } else if peers.shareable.is_dirty() {
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
            peers.announcer.fresh.lock().clear();
            // A renewal tells the current owners everything, which supersedes any retry.
            retries.clear();
            (peers.shareable.retain_held(held.as_ref()), true)
        } else {
            let fresh = std::mem::take(&mut *peers.announcer.fresh.lock());
            (fresh.into_iter().collect(), false)
        };
        let live = peers.members.live(Instant::now());
        let mut deliveries = std::mem::take(&mut retries);
        for (blob, blocks) in &batch {
            let owners = rendezvous::owners(blob, &live, peers.config.owners);
            for owner in owners {
                if owner == me {
                    peers
                        .index
                        .announce(Instant::now(), me, blob, blocks, replace);
                    continue;
                }
                deliveries.push(Delivery {
                    owner,
                    announce: Announce {
                        from: me.to_string(),
                        blob: blob.to_string(),
                        block_size: peers.block_size,
                        blocks: blocks.to_hex(),
                        replace,
                    },
                    attempts: 0,
                });
            }
        }
        let sends = deliveries.into_iter().map(|mut delivery| {
            let peers = &peers;
            async move {
                delivery.attempts += 1;
                let sent = peers
                    .client
                    .announce(delivery.owner, &delivery.announce, Duration::from_secs(2))
                    .await;
                match sent {
                    Ok(()) => None,
                    Err(failure) if delivery.attempts < ATTEMPTS => {
                        debug!(owner = %delivery.owner, %failure, "announcement not delivered; sending it again");
                        Some(delivery)
                    }
                    Err(failure) => {
                        warn!(owner = %delivery.owner, %failure, attempts = delivery.attempts, "announcement not delivered; the next renewal carries it");
                        None
                    }
                }
            }
        });
        retries = join_all(sends).await.into_iter().flatten().collect();
        // Still announcing while some delivery is due again.
        peers
            .announcer
            .sending
            .store(!retries.is_empty(), std::sync::atomic::Ordering::SeqCst);
        if renew || saved.elapsed() >= SAVE_EVERY {
            saved = Instant::now();
            if let Err(error) = peers.shareable.save() {
                warn!(%error, "what this node shares will be forgotten on restart");
            }
        }
    }
}
