//! Background fetch of a whole overlaybd blob, ending with its sha256 check: ZFile CRCs catch
//! damaged blocks, and the digest catches whatever a CRC cannot (a block rewritten with a
//! matching CRC). A blob that fails is dropped from the cache, so later reads fetch it again.

use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use shoal_fetcher::{BlobRef, Fetcher};

use crate::error::FsError;

/// Step of the fetch and of the hashing: large enough to coalesce, small enough to pace.
const STEP: u64 = 4 << 20;

/// Fetches all of `blob` into the cache, at most `rate` bytes per second (`None`: as fast as
/// the fetcher goes), then checks its sha256 against its digest.
pub async fn fetch_and_verify(
    fetcher: &Fetcher,
    blob: &BlobRef,
    rate: Option<u64>,
) -> Result<(), FsError> {
    let name = || blob.digest.to_string();
    let started = Instant::now();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + STEP).min(blob.size);
        fetcher
            .prefetch(blob, offset..end)
            .await
            .map_err(|source| FsError::FetchBlob {
                blob: name(),
                source,
            })?;
        offset = end;
        if let Some(rate) = rate {
            // Pace against the start so a slow step is not followed by a burst.
            let due = Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + STEP).min(blob.size);
        let bytes = fetcher
            .read(blob, offset..end)
            .await
            .map_err(|source| FsError::FetchBlob {
                blob: name(),
                source,
            })?;
        hasher.update(&bytes);
        offset = end;
    }
    let actual = hex::encode(hasher.finalize());
    if actual == blob.digest.hex() {
        return Ok(());
    }
    // Nothing of a blob that fails its digest may be served or shared again.
    let _ = fetcher.cache().invalidate(&blob.digest, 0..blob.size);
    Err(FsError::BlobDigestMismatch {
        blob: name(),
        actual: format!("sha256:{actual}"),
    })
}
