//! Background fetch of a whole overlaybd blob, checked as its layer's reads are:
//! - per block (a block digest table): every unit is read through the fetcher against the
//!   table, so a bad block is refetched and its sender blamed on its own, and the blob is
//!   verified once every unit has passed (the table is anchored in the manifest);
//! - per blob: the blocks are fetched (from peers too, when the fetcher allows them), then the
//!   whole blob's sha256 is checked: ZFile CRCs catch damaged blocks, the digest whatever a CRC
//!   cannot (a block rewritten with a matching CRC). A blob that fails loses the blocks peers
//!   sent (their senders blamed, and avoided from then on), so one more round completes it
//!   from elsewhere; with no peer involved, the fetcher drops it whole.

use shoal_fetcher::{BlobRead, Checked, Completion, FetchError, Verification};

use super::VirtualDisk;
use crate::error::FsError;

/// Fetches all of the blob of `disk`'s layer `at` into the cache, at most `rate` bytes per
/// second (`None`: as fast as the fetcher goes), several ranges at once while no read is
/// fetching, verifying it as its checks say.
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
    let completion = Completion::new(rate);
    let foreground = || blobs.foreground_fetching();
    let rounds = match checks.verification() {
        Verification::PerBlock => {
            // Whole blocks are prefetched, then each unit is checked in the cache (a bad one
            // is fetched again): units read directly would be fetched as a container's reads
            // are, and count as the foreground this completion yields to.
            return completion
                .run(blob, foreground, |range| async move {
                    let expect = checks.raw();
                    blobs
                        .prefetch(blob, range.clone(), expect.checked())
                        .await?;
                    blobs.read(blob, range, expect).await.map(drop)
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
            completion
                .run(blob, foreground, |range| {
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
