//! [`Runs`]: the fetch runs under way. A read returns once its bytes are in hand, while its
//! runs go on to cache them; this is how anyone can wait for that to have happened.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The runs under way, numbered as they start, so that [`Runs::settled`] waits for those
/// that started before it (and not for ones that keep starting after).
#[derive(Default)]
pub struct Runs {
    next: AtomicU64,
    open: Mutex<BTreeSet<u64>>,
    ended: Notify,
}

/// One run under way; dropped when the run ends, however it ends.
pub struct RunGuard {
    runs: Arc<Runs>,
    id: u64,
}

impl Runs {
    /// Counts a run under way until the guard drops.
    pub fn start(self: &Arc<Runs>) -> RunGuard {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.open.lock().insert(id);
        RunGuard {
            runs: self.clone(),
            id,
        }
    }

    /// Waits until every run started so far has ended. Runs started meanwhile are not
    /// waited for, and every run's fetches have deadlines, so this ends.
    pub async fn settled(&self) {
        let horizon = self.next.load(Ordering::SeqCst);
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before looking, so that a run ending in between still wakes it.
            ended.as_mut().enable();
            if self.open.lock().first().is_none_or(|&id| id >= horizon) {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.runs.open.lock().remove(&self.id);
        self.runs.ended.notify_waiters();
    }
}
