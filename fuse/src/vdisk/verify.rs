//! Background fetch of a whole overlaybd blob, ending with its sha256 check: ZFile CRCs catch
//! damaged blocks, and the digest catches whatever a CRC cannot (a block rewritten with a
//! matching CRC). The fetcher drops a blob that fails from the cache, so later reads fetch it
//! again.

use std::time::{Duration, Instant};

use shoal_fetcher::{BlobRead, BlobRef, Checked};

use crate::error::FsError;

/// Step of the fetch: large enough to coalesce, small enough to pace.
const STEP: u64 = 4 << 20;

/// Fetches all of `blob` into the cache, at most `rate` bytes per second (`None`: as fast as
/// the fetcher goes), then has its sha256 checked against its digest.
pub async fn fetch_and_verify(
    blobs: &dyn BlobRead,
    blob: &BlobRef,
    rate: Option<u64>,
) -> Result<(), FsError> {
    let failed = |source| FsError::FetchBlob {
        blob: blob.digest.to_string(),
        source,
    };
    let started = Instant::now();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + STEP).min(blob.size);
        blobs
            .prefetch(blob, offset..end, Checked::BlobDigest)
            .await
            .map_err(failed)?;
        offset = end;
        if let Some(rate) = rate {
            // Pace against the start so a slow step is not followed by a burst.
            let due = Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    blobs.verify_blob(blob).await.map_err(failed)
}
