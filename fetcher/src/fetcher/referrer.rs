//! The fetcher's side of trace artifacts in registries ([`crate::referrer`]): pushing this
//! node's traces of an image with the registry client in force, and finding a layer's trace
//! there when neither this node nor a peer has one.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Fetcher;
use crate::causes::with_causes;
use crate::digest::Digest;
use crate::reference::{BlobRef, ImageRef};
use crate::referrer::{self, PushedTraces, ReferrerError};
use crate::traces::{FoundTrace, TraceOrigin, REGISTRY_TRACE_TIMEOUT};

impl Fetcher {
    /// `fetch.learn_push`.
    pub fn learn_push(&self) -> bool {
        self.inner.learn_push
    }

    /// Pushes this node's traces of image `subject` to `repository` as the image's trace
    /// artifact (see [`referrer::push`]); one push at a time.
    pub async fn push_traces(
        &self,
        repository: &ImageRef,
        subject: &Digest,
    ) -> Result<PushedTraces, ReferrerError> {
        // Held across the push on purpose: two pushes interleaving their read-modify-write of
        // the referrers tag would lose one. Nothing else takes it.
        let _turn = self.inner.push_turn.lock().await;
        let registry = self.registry();
        referrer::push(&registry, self.traces(), repository, subject).await
    }

    /// The trace of `blob` for `image` from the image's trace artifact in its registry, if it
    /// has one and answers within [`REGISTRY_TRACE_TIMEOUT`]. The artifact is looked up once
    /// per image; a failure is logged once and taken as no trace.
    pub(crate) async fn registry_trace(
        &self,
        image: &Digest,
        blob: &BlobRef,
    ) -> Option<FoundTrace> {
        let deadline = Instant::now() + REGISTRY_TRACE_TIMEOUT;
        let registry = self.registry();
        let cell = self.inner.artifacts.cell(image);
        let lookup = cell.get_or_init(|| async {
            match referrer::lookup(&registry, &blob.image, image).await {
                Ok(found) => found.map(Arc::new),
                Err(error @ ReferrerError::OtherSubject { .. }) => {
                    info!(%image, error = %error, "trace artifact in the registry ignored");
                    None
                }
                Err(error) => {
                    warn!(%image, error = %with_causes(&error), "no trace artifact from the registry");
                    None
                }
            }
        });
        let artifact = match tokio::time::timeout_at(deadline, lookup).await {
            Ok(found) => found.clone()?,
            Err(_) => {
                warn!(%image, blob = %blob.digest, "the registry named no trace artifact in time");
                return None;
            }
        };
        let fetched = referrer::fetch_trace(&registry, image, &artifact, blob);
        match tokio::time::timeout_at(deadline, fetched).await {
            Ok(Ok(Some(bytes))) => Some(FoundTrace {
                bytes,
                origin: TraceOrigin::Registry(format!(
                    "{}/{}",
                    blob.image.host(),
                    blob.image.repository_name()
                )),
            }),
            Ok(Ok(None)) => None,
            Ok(Err(error)) => {
                warn!(%image, blob = %blob.digest, error = %with_causes(&error), "trace not fetched from the registry");
                None
            }
            Err(_) => {
                warn!(%image, blob = %blob.digest, "the registry gave no trace in time");
                None
            }
        }
    }
}
