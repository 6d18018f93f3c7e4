//! Background fetch of a whole overlaybd blob, checked as its layer's reads are:
//! - per block (a block digest table): every unit is read through the fetcher against the
//!   table, so a bad block is refetched and its sender blamed on its own, and the blob is
//!   verified once every unit has passed (the table is anchored in the manifest);
//! - per blob: the blocks are fetched (from peers too, when the fetcher allows them), then the
//!   whole blob's sha256 is checked: ZFile CRCs catch damaged blocks, the digest whatever a CRC
//!   cannot (a block rewritten with a matching CRC). A blob that fails loses the blocks peers
//!   sent (their senders blamed, and avoided from then on), so one more round completes it
//!   from elsewhere; with no peer involved, the fetcher drops it whole.

use std::ops::Range;
use std::time::{Duration, Instant};

use shoal_fetcher::{BlobRead, BlobRef, Checked, FetchError, Verification};

use super::VirtualDisk;
use crate::error::FsError;

/// Step of the fetch: large enough to coalesce, small enough to pace.
const STEP: u64 = 4 << 20;

/// Fetches all of the blob of `disk`'s layer `at` into the cache, at most `rate` bytes per
/// second (`None`: as fast as the fetcher goes), verifying it as its checks say.
pub async fn fetch_and_verify(
    blobs: &dyn BlobRead,
    disk: &VirtualDisk,
    at: usize,
    rate: Option<u64>,
) -> Result<(), FsError> {
    let layer = &disk.layers()[at];
    let blob = layer.blob();
    let failed = |source| FsError::FetchBlob {
        blob: blob.digest.to_string(),
        source,
    };
    let checks = layer.checks();
    let rounds = match checks.verification() {
        Verification::PerBlock => {
            return paced(blob, rate, |range| async move {
                blobs.read(blob, range, checks.raw()).await.map(drop)
            })
            .await
            .map_err(failed);
        }
        Verification::PerBlob { peers: true, .. } => 2,
        Verification::PerBlob { peers: false, .. } => 1,
    };
    let mut outcome = Ok(());
    for _ in 0..rounds {
        outcome = async {
            paced(blob, rate, |range| {
                blobs.prefetch(blob, range, Checked::Embedded)
            })
            .await?;
            blobs.verify_blob(blob).await
        }
        .await;
        if !matches!(outcome, Err(FetchError::BlobDigestMismatch { .. })) {
            break;
        }
        // What was decoded of the dropped blocks must not be served from memory either.
        disk.forget_decoded(at);
    }
    outcome.map_err(failed)
}

/// Runs `step` over `blob` in [`STEP`]-byte ranges, at most `rate` bytes per second.
async fn paced<F, Fut>(blob: &BlobRef, rate: Option<u64>, step: F) -> Result<(), FetchError>
where
    F: Fn(Range<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<(), FetchError>>,
{
    let started = Instant::now();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + STEP).min(blob.size);
        step(offset..end).await?;
        offset = end;
        if let Some(rate) = rate {
            // Pace against the start so a slow step is not followed by a burst.
            let due = Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
}
