//! Taking a whole blob for the cluster (preheat): every block brought in as reads that may
//! go to peers bring them (peers first, the registry under the owners' grants, stored and
//! announced), then the blob checked against its digest, which makes what peers sent of it
//! shareable (or drops it and blames them). Nothing of it reaches a container on the way.

use std::ops::Range;
use std::sync::{Arc, Weak};

use futures::future::BoxFuture;

use super::{Fetcher, Inner};
use crate::error::FetchError;
use crate::peer::Warmer;
use crate::reference::BlobRef;
use crate::trust::{BlobRead, Checked};

impl Fetcher {
    /// Brings `range` of `blob` into the cache, from peers first: one step of [`warm`].
    ///
    /// [`warm`]: Self::warm
    pub async fn warm_range(&self, blob: &BlobRef, range: Range<u64>) -> Result<(), FetchError> {
        // The route of reads whose every byte is checked: the digest check in `warm` is it.
        BlobRead::prefetch(self, blob, range, Checked::ChunkDigests).await
    }

    /// Checks all of `blob` (cached by [`warm_range`]) against its digest; shareable if it
    /// matches.
    ///
    /// [`warm_range`]: Self::warm_range
    pub async fn warm_check(&self, blob: &BlobRef) -> Result<(), FetchError> {
        self.settled().await;
        BlobRead::verify_blob(self, blob).await
    }

    /// Brings all of `blob` into the cache and checks it against its digest.
    pub async fn warm(&self, blob: &BlobRef) -> Result<(), FetchError> {
        self.warm_range(blob, 0..blob.size).await?;
        self.warm_check(blob).await
    }

    /// What peers ask to take blobs through: it does not keep the fetcher alive (the peers
    /// it is handed to belong to the fetcher).
    pub(super) fn warmer(&self) -> Arc<dyn Warmer> {
        Arc::new(FetcherWarmer(Arc::downgrade(&self.inner)))
    }
}

struct FetcherWarmer(Weak<Inner>);

impl Warmer for FetcherWarmer {
    fn warm(&self, blob: BlobRef) -> BoxFuture<'static, Result<(), String>> {
        let inner = self.0.upgrade();
        Box::pin(async move {
            let fetcher = Fetcher {
                inner: inner.ok_or("the daemon is stopping")?,
            };
            fetcher
                .warm(&blob)
                .await
                .map_err(|error| crate::with_causes(&error))
        })
    }
}
