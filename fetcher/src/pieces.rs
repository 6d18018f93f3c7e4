//! Single-flight per fetched byte range ("piece"): a foreground read fetches only the bytes
//! it needs, and a reader of bytes inside a piece already being fetched waits for that piece
//! instead of asking the registry for them again.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::digest::RawDigest;
use crate::error::FetchError;
use crate::flight::BlockResult;

type Slot = watch::Receiver<Option<BlockResult>>;

/// Pieces being fetched. Few are in flight at a time (bounded by `fetch.max_concurrent`
/// and the readers waiting), so a scan finds one.
#[derive(Default)]
pub struct Pieces {
    pending: Mutex<Vec<Entry>>,
    next: std::sync::atomic::AtomicU64,
}

struct Entry {
    id: u64,
    blob: RawDigest,
    range: Range<u64>,
    slot: Slot,
}

impl Pieces {
    /// A wait for `range` of `blob` when a piece holding all of it is being fetched.
    pub fn follow(&self, blob: RawDigest, range: &Range<u64>) -> Option<PieceWaiter> {
        let pending = self.pending.lock();
        let entry = pending.iter().find(|entry| {
            entry.blob == blob && entry.range.start <= range.start && range.end <= entry.range.end
        })?;
        Some(PieceWaiter {
            range: entry.range.clone(),
            slot: entry.slot.clone(),
        })
    }

    /// Registers the fetch of `range` of `blob`; it is followed until the lead drops.
    pub fn lead(self: &Arc<Self>, blob: RawDigest, range: Range<u64>) -> PieceLead {
        let (sender, slot) = watch::channel(None);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pending.lock().push(Entry {
            id,
            blob,
            range: range.clone(),
            slot,
        });
        PieceLead {
            id,
            range,
            sender,
            pieces: self.clone(),
        }
    }

    /// Waits until no piece overlapping `range` of `blob` is being fetched (or cached): a
    /// refetch must neither join bytes it rejected nor have them cached after it dropped them.
    pub async fn ended(&self, blob: RawDigest, range: &Range<u64>) {
        let slots: Vec<Slot> = self
            .pending
            .lock()
            .iter()
            .filter(|entry| {
                entry.blob == blob && entry.range.start < range.end && range.start < entry.range.end
            })
            .map(|entry| entry.slot.clone())
            .collect();
        for mut slot in slots {
            // Only the lead's drop closes the channel; its result may already be in.
            while slot.changed().await.is_ok() {}
        }
    }
}

/// The duty to fetch one piece; dropping it ends the flight.
pub struct PieceLead {
    id: u64,
    range: Range<u64>,
    sender: watch::Sender<Option<BlockResult>>,
    pieces: Arc<Pieces>,
}

impl PieceLead {
    pub fn range(&self) -> &Range<u64> {
        &self.range
    }

    pub fn waiter(&self) -> PieceWaiter {
        PieceWaiter {
            range: self.range.clone(),
            slot: self.sender.subscribe(),
        }
    }

    /// Hands `result` to every waiter; the piece stays joinable until the lead drops.
    pub fn publish(&self, result: BlockResult) {
        self.sender.send_replace(Some(result));
    }
}

impl Drop for PieceLead {
    fn drop(&mut self) {
        self.pieces
            .pending
            .lock()
            .retain(|entry| entry.id != self.id);
    }
}

/// A reader's end of one piece's flight.
pub struct PieceWaiter {
    range: Range<u64>,
    slot: Slot,
}

impl PieceWaiter {
    /// The bytes `wanted` (inside the piece) once the piece has arrived.
    pub async fn wait(mut self, wanted: Range<u64>) -> Result<Bytes, FetchError> {
        let abandoned = || FetchError::AbandonedRangeFetch {
            range: self.range.clone(),
        };
        let result = match self.slot.wait_for(Option::is_some).await {
            Ok(result) => result.clone(),
            Err(_) => return Err(abandoned()),
        };
        let within =
            (wanted.start - self.range.start) as usize..(wanted.end - self.range.start) as usize;
        match result {
            Some(Ok(bytes)) => Ok(bytes.slice(within)),
            Some(Err(cause)) => Err(FetchError::JoinRangeFetch {
                range: self.range.clone(),
                cause,
            }),
            None => Err(abandoned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[tokio::test]
    async fn readers_inside_a_piece_share_it_and_others_do_not() {
        let pieces = Arc::new(Pieces::default());
        let blob = Digest::of(b"blob").raw();
        let lead = pieces.lead(blob, 100..200);
        let inside = pieces.follow(blob, &(120..150)).expect("inside the piece");
        assert!(pieces.follow(blob, &(150..250)).is_none(), "partly outside");
        assert!(pieces
            .follow(Digest::of(b"other").raw(), &(120..150))
            .is_none());
        lead.publish(Ok(Bytes::from(vec![7u8; 100])));
        assert_eq!(inside.wait(120..150).await.unwrap(), vec![7u8; 30]);
        let ended = pieces.ended(blob, &(0..101));
        drop(lead);
        ended.await;
        assert!(pieces.follow(blob, &(120..150)).is_none());
    }
}
