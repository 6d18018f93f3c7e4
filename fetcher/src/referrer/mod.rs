//! Learned-prefetch traces kept in a registry next to their image, as an OCI referrer
//! artifact ([`artifact`]), for nodes that no peer can give a trace to.
//!
//! Pushing ([`push`]): this node's traces of one image are uploaded as blobs, listed in one
//! artifact manifest whose `subject` is the image manifest, pushed by digest. A registry with
//! the referrers API (`GET /v2/<name>/referrers/<digest>` answers) lists it by itself; one
//! without (404: docker-registry 2.x) gets the spec's fallback: the index at tag
//! `sha256-<hex of the subject>` is read, the artifact listed in place of any earlier trace
//! artifact (other referrers kept), and written back.
//!
//! Finding ([`lookup`], [`fetch_trace`]): the newest trace artifact the referrers list names
//! for the image, read once per image (all its layers share it), then the layer's trace blob
//! (digest-checked). The trace inside is judged like one from a peer (checksum, image and
//! layer digests) by whoever uses it; an artifact for another subject is refused here.

pub mod artifact;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::digest::Digest;
use crate::reference::{BlobRef, ImageRef};
use crate::registry::{
    is_not_found, BlobContent, PushError, Referrers, RegistryClient, RegistryError,
};
use crate::traces::{TraceStore, TraceStoreError, MAX_TRACE_BYTES};
use artifact::{
    merge_index, trace_referrers, ArtifactError, Descriptor, TraceArtifact, TraceLayer, EMPTY_JSON,
    OCI_INDEX, OCI_MANIFEST, TRACE_ARTIFACT_TYPE, TRACE_MEDIA_TYPE,
};

/// Images whose artifact lookups are remembered at most (then all are forgotten).
const MAX_REMEMBERED: usize = 256;

/// What failed pushing or finding a trace artifact.
#[derive(Debug, thiserror::Error)]
pub enum ReferrerError {
    #[error("read the image manifest {subject}")]
    ReadSubject {
        subject: Digest,
        #[source]
        source: RegistryError,
    },
    #[error("no trace of image {subject} is kept on this node")]
    NoTraces { subject: Digest },
    #[error("read this node's traces")]
    ReadTraces {
        #[source]
        source: TraceStoreError,
    },
    #[error("upload a trace artifact blob for image {subject}")]
    UploadBlob {
        subject: Digest,
        #[source]
        source: PushError,
    },
    #[error("push the trace artifact of image {subject}")]
    PushArtifact {
        subject: Digest,
        #[source]
        source: PushError,
    },
    #[error("update the referrers tag {tag}")]
    PushIndex {
        tag: String,
        #[source]
        source: PushError,
    },
    #[error("list the referrers of image {subject}")]
    ListReferrers {
        subject: Digest,
        #[source]
        source: RegistryError,
    },
    #[error("the referrers list of image {subject} is not an index")]
    ParseIndex {
        subject: Digest,
        #[source]
        source: ArtifactError,
    },
    #[error("read trace artifact {artifact}")]
    ReadArtifact {
        artifact: String,
        #[source]
        source: RegistryError,
    },
    #[error("trace artifact {artifact} is not one")]
    ParseArtifact {
        artifact: String,
        #[source]
        source: ArtifactError,
    },
    #[error("trace artifact {artifact} is for image {found}, not {subject}")]
    OtherSubject {
        artifact: String,
        subject: Digest,
        found: String,
    },
    #[error("trace {digest} in artifact for image {subject} is {size} bytes, over the {MAX_TRACE_BYTES}-byte limit")]
    TraceTooLarge {
        subject: Digest,
        digest: String,
        size: u64,
    },
    #[error("fetch trace {digest} of artifact for image {subject}")]
    FetchTrace {
        subject: Digest,
        digest: String,
        #[source]
        source: RegistryError,
    },
}

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedTraces {
    /// The artifact manifest's digest.
    pub artifact: Digest,
    /// Layers the artifact has a trace of.
    pub traces: usize,
    /// The referrers tag updated, when the registry has no referrers API.
    pub tag: Option<String>,
}

/// Pushes this node's traces of image `subject` (in `repository`) as its trace artifact.
/// Traces of other layers in the artifact already listed are kept (this node's win).
pub async fn push(
    registry: &RegistryClient,
    store: &TraceStore,
    repository: &ImageRef,
    subject: &Digest,
) -> Result<PushedTraces, ReferrerError> {
    let manifest = registry
        .get_manifest(&repository.with_digest(subject))
        .await
        .map_err(|source| ReferrerError::ReadSubject {
            subject: subject.clone(),
            source,
        })?;
    let kept = store
        .list(subject)
        .map_err(|source| ReferrerError::ReadTraces { source })?;
    if kept.is_empty() {
        return Err(ReferrerError::NoTraces {
            subject: subject.clone(),
        });
    }
    let upload = |source| ReferrerError::UploadBlob {
        subject: subject.clone(),
        source,
    };
    let empty = Bytes::from_static(EMPTY_JSON);
    registry
        .push_blob(
            repository,
            &Digest::of(&empty),
            empty.len() as u64,
            &BlobContent::Bytes(empty),
        )
        .await
        .map_err(upload)?;
    let mut traces = Vec::new();
    for (blob, bytes) in kept {
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        registry
            .push_blob(repository, &digest, size, &BlobContent::Bytes(bytes))
            .await
            .map_err(upload)?;
        traces.push(TraceLayer {
            blob: blob.to_string(),
            trace: Descriptor::new(TRACE_MEDIA_TYPE, digest.as_str(), size),
        });
    }
    let listed = list_referrers(registry, repository, subject).await?;
    // Another node's traces of layers this one has none of stay in the new artifact.
    let index = match &listed {
        Referrers::Api(index) => Some(index.bytes.clone()),
        Referrers::Tag { index, .. } => index.as_ref().map(|i| i.bytes.clone()),
    };
    if let Some(index) = &index {
        if let Ok(Some(earlier)) = read_newest(registry, repository, subject, index).await {
            for layer in earlier.traces {
                if !traces.iter().any(|t| t.blob == layer.blob) {
                    traces.push(layer);
                }
            }
        }
    }
    traces.sort_by(|a, b| a.blob.cmp(&b.blob));
    let count = traces.len();
    let artifact = TraceArtifact {
        subject: Descriptor::new(
            &manifest.media_type,
            subject.as_str(),
            manifest.bytes.len() as u64,
        ),
        traces,
    };
    let bytes = Bytes::from(artifact.encode());
    let digest = Digest::of(&bytes);
    registry
        .put_manifest(
            &repository.with_digest(&digest),
            OCI_MANIFEST,
            bytes.clone(),
        )
        .await
        .map_err(|source| ReferrerError::PushArtifact {
            subject: subject.clone(),
            source,
        })?;
    let Referrers::Tag { tag, index } = listed else {
        return Ok(PushedTraces {
            artifact: digest,
            traces: count,
            tag: None,
        });
    };
    let entry = Descriptor {
        artifact_type: Some(TRACE_ARTIFACT_TYPE.to_owned()),
        ..Descriptor::new(OCI_MANIFEST, digest.as_str(), bytes.len() as u64)
    };
    let merged = merge_index(index.as_ref().map(|i| &i.bytes[..]), &entry).map_err(|source| {
        ReferrerError::ParseIndex {
            subject: subject.clone(),
            source,
        }
    })?;
    let tagged = repository
        .with_tag(&tag)
        .expect("the referrers tag of a digest is a valid tag");
    registry
        .put_manifest(&tagged, OCI_INDEX, Bytes::from(merged))
        .await
        .map_err(|source| ReferrerError::PushIndex {
            tag: tag.clone(),
            source,
        })?;
    Ok(PushedTraces {
        artifact: digest,
        traces: count,
        tag: Some(tag),
    })
}

/// What the registry lists as referring to image `subject` (its referrers API, else the tag).
async fn list_referrers(
    registry: &RegistryClient,
    repository: &ImageRef,
    subject: &Digest,
) -> Result<Referrers, ReferrerError> {
    registry
        .get_referrers(repository, subject)
        .await
        .map_err(|source| ReferrerError::ListReferrers {
            subject: subject.clone(),
            source,
        })
}

/// The newest trace artifact the registry lists for image `subject`, if any.
pub async fn lookup(
    registry: &RegistryClient,
    repository: &ImageRef,
    subject: &Digest,
) -> Result<Option<TraceArtifact>, ReferrerError> {
    let listed = list_referrers(registry, repository, subject).await?;
    let index = match listed {
        Referrers::Api(index) => index.bytes,
        Referrers::Tag { index: None, .. } => return Ok(None),
        Referrers::Tag {
            index: Some(index), ..
        } => index.bytes,
    };
    read_newest(registry, repository, subject, &index).await
}

/// The newest trace artifact `index` lists, read and checked to be for `subject`.
async fn read_newest(
    registry: &RegistryClient,
    repository: &ImageRef,
    subject: &Digest,
    index: &[u8],
) -> Result<Option<TraceArtifact>, ReferrerError> {
    let candidates = trace_referrers(index).map_err(|source| ReferrerError::ParseIndex {
        subject: subject.clone(),
        source,
    })?;
    let Some(newest) = candidates.first() else {
        return Ok(None);
    };
    let artifact = newest.digest.clone();
    let digest = Digest::parse(&artifact).map_err(|e| ReferrerError::ParseArtifact {
        artifact: artifact.clone(),
        source: ArtifactError::Parse {
            reason: e.to_string(),
        },
    })?;
    let manifest = match registry
        .get_manifest(&repository.with_digest(&digest))
        .await
    {
        Ok(manifest) => manifest,
        // Listed but gone (deleted since): as if not listed.
        Err(error) if is_not_found(&error) => return Ok(None),
        Err(source) => return Err(ReferrerError::ReadArtifact { artifact, source }),
    };
    let decoded =
        TraceArtifact::decode(&manifest.bytes).map_err(|source| ReferrerError::ParseArtifact {
            artifact: artifact.clone(),
            source,
        })?;
    if decoded.subject.digest != subject.as_str() {
        return Err(ReferrerError::OtherSubject {
            artifact,
            subject: subject.clone(),
            found: decoded.subject.digest,
        });
    }
    Ok(Some(decoded))
}

/// The trace of `blob` that `artifact` (for image `subject`) has, if any: its bytes,
/// digest-checked, not yet judged.
pub async fn fetch_trace(
    registry: &RegistryClient,
    subject: &Digest,
    artifact: &TraceArtifact,
    blob: &BlobRef,
) -> Result<Option<Bytes>, ReferrerError> {
    let Some(trace) = artifact.trace_of(blob.digest.as_str()) else {
        return Ok(None);
    };
    let fail = |source| ReferrerError::FetchTrace {
        subject: subject.clone(),
        digest: trace.digest.clone(),
        source,
    };
    if trace.size > MAX_TRACE_BYTES as u64 {
        return Err(ReferrerError::TraceTooLarge {
            subject: subject.clone(),
            digest: trace.digest.clone(),
            size: trace.size,
        });
    }
    let digest = Digest::parse(&trace.digest).map_err(|e| ReferrerError::ParseArtifact {
        artifact: trace.digest.clone(),
        source: ArtifactError::Parse {
            reason: e.to_string(),
        },
    })?;
    let at = BlobRef::new(blob.image.clone(), digest, trace.size);
    registry.get_blob(&at).await.map(Some).map_err(fail)
}

/// One image's artifact lookup: filled by the first layer that asks (`None`: no artifact).
pub type ArtifactCell = Arc<OnceCell<Option<Arc<TraceArtifact>>>>;

/// Each image's artifact lookup, done once however many of its layers ask.
#[derive(Default)]
pub struct ArtifactMemo {
    images: Mutex<HashMap<Digest, ArtifactCell>>,
}

impl ArtifactMemo {
    /// The cell of `image`'s lookup: the first asker fills it, later ones wait for it.
    pub fn cell(&self, image: &Digest) -> ArtifactCell {
        let mut images = self.images.lock();
        if images.len() >= MAX_REMEMBERED && !images.contains_key(image) {
            images.clear();
        }
        images.entry(image.clone()).or_default().clone()
    }
}

impl std::fmt::Debug for ArtifactMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactMemo")
            .field("images", &self.images.lock().len())
            .finish()
    }
}
