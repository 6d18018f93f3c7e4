//! eStargz as a [`LazyFormat`]: finds a layer in its image's manifest, opens it (footer and TOC
//! through the chunk cache, TOC digest checked against the annotation) and serves it over FUSE,
//! its prefetch owned by the mounted layer. The first layer's open starts the opens of the
//! eStargz layers above it in the manifest ([`OpenAhead`]), which their Prepares then take.

use std::path::Path;
use std::sync::Arc;

use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use shoal_formats::estargz::{TocDigest, TOC_DIGEST_ANNOTATION};
use shoal_fuse::layer::{self, ChunkReader, EstargzLayer, Learn, Learning, MountTarget};
use shoal_fuse::syscall::Syscall;
use shoal_fuse::tasks::Tasks;
use shoal_fuse::FsError;
use tokio::runtime::Handle;

use crate::error::{with_causes, SnapshotError};
use crate::lazy_format::{Carried, LazyFormat, Opened, OpenedLayer, Served};
use crate::manifest::{layers_of, Descriptor};
use crate::mount_policy::MountPolicy;
use crate::open_ahead::OpenAhead;
use crate::remote::{Fallback, LayerFormat, LayerLabels, RemoteLayer, ResolvedLayer};

/// Opens and serves eStargz layers.
pub struct EstargzFormat {
    fetcher: Fetcher,
    serving: Serving,
    /// The layers above a prepared one, opened before containerd prepares them.
    ahead: OpenAhead<AheadKey, Ahead>,
}

/// Which layer an open ahead is for: the image reference it is fetched by, its blob and the
/// TOC digest it is verified against, all as the layer's own Prepare labels them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AheadKey {
    image_ref: String,
    blob: String,
    toc: String,
}

/// A layer opened ahead: what its Prepare's open would have returned.
struct Ahead {
    remote: RemoteLayer,
    layer: EstargzLayer,
    persisted: Vec<u8>,
}

/// What every eStargz layer is served with.
#[derive(Clone)]
struct Serving {
    reader: Arc<ChunkReader>,
    runtime: Handle,
    /// Read when the layer is mounted.
    policy: MountPolicy,
    /// Learned prefetch, when `fetch.learn` is on.
    learning: Option<Arc<Learning>>,
}

impl EstargzFormat {
    pub fn new(
        fetcher: Fetcher,
        reader: Arc<ChunkReader>,
        runtime: Handle,
        policy: MountPolicy,
        learning: Option<Arc<Learning>>,
    ) -> EstargzFormat {
        EstargzFormat {
            fetcher,
            ahead: OpenAhead::new(runtime.clone()),
            serving: Serving {
                reader,
                runtime,
                policy,
                learning,
            },
        }
    }

    /// Starts opening the eStargz layers in `above` (a manifest's layers above the one being
    /// prepared), each under the key its own Prepare will look it up by.
    fn open_above(&self, image_ref: &str, above: &[Descriptor]) {
        for descriptor in above {
            let Some(toc) = descriptor.annotations.get(TOC_DIGEST_ANNOTATION) else {
                continue;
            };
            let Ok(expected) = toc.parse::<TocDigest>() else {
                continue;
            };
            let remote = RemoteLayer {
                format: LayerFormat::Estargz,
                image_ref: image_ref.to_owned(),
                digest: descriptor.digest.clone(),
                size: descriptor.size,
                index_digest: toc.clone(),
            };
            let Ok(blob) = blob_of(&remote) else {
                continue;
            };
            let key = AheadKey {
                image_ref: image_ref.to_owned(),
                blob: descriptor.digest.clone(),
                toc: toc.clone(),
            };
            let fetcher = self.fetcher.clone();
            self.ahead.start(key, async move {
                let (layer, persisted) = EstargzLayer::open(&fetcher, blob, expected).await?;
                Ok::<_, FsError>(Ahead {
                    remote,
                    layer,
                    persisted,
                })
            });
        }
    }

    /// `image`: the manifest digest of the image the layer is mounted for, when known (a
    /// Prepare's labels), which its learned prefetch is keyed by.
    fn opened(&self, layer: EstargzLayer, image: Option<Digest>) -> Box<dyn OpenedLayer> {
        Box::new(OpenedEstargz {
            layer,
            image,
            serving: self.serving.clone(),
        })
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LazyFormat for EstargzFormat {
    fn kind(&self) -> LayerFormat {
        LayerFormat::Estargz
    }

    fn claims(&self, labels: &LayerLabels) -> bool {
        !labels.overlaybd
    }

    /// Finds the layer's size in its manifest, then reads and verifies its footer and TOC.
    async fn open(&self, labels: &LayerLabels) -> Result<Opened, Fallback> {
        // containerd hands a layer's `containerd.io/snapshot/*` annotations to Prepare as labels
        // (rpull and CRI alike), so a layer without the TOC digest label is not eStargz, or is
        // one whose TOC cannot be verified: either way it is downloaded, without asking the
        // registry anything first.
        let Some(toc) = labels.toc_digest.clone() else {
            return Err(Fallback::NotLazyFormat(format!(
                "the layer has no {TOC_DIGEST_ANNOTATION} annotation"
            )));
        };
        let expected: TocDigest = toc.parse().map_err(|_| Fallback::UnverifiableIndex)?;
        // Without the image's digest there is nothing to key a trace by: no learning.
        let learned_as = labels
            .manifest_digest
            .as_deref()
            .and_then(|digest| Digest::parse(digest).ok());
        let key = AheadKey {
            image_ref: labels.image_ref.clone(),
            blob: labels.layer_digest.clone(),
            toc: toc.clone(),
        };
        if let Some(ahead) = self.ahead.take(&key).await {
            return Ok(Opened {
                resolved: ResolvedLayer {
                    layer: ahead.remote,
                    index: ahead.persisted,
                },
                layer: self.opened(ahead.layer, learned_as),
            });
        }
        let image =
            ImageRef::parse(&labels.image_ref).map_err(|e| Fallback::Registry(e.to_string()))?;
        let layers = layers_of(&self.fetcher, &image, labels).await?;
        self.open_above(&labels.image_ref, layers.above());
        let remote = RemoteLayer {
            format: LayerFormat::Estargz,
            image_ref: labels.image_ref.clone(),
            digest: labels.layer_digest.clone(),
            size: layers.labelled().size,
            index_digest: toc,
        };
        let blob = blob_of(&remote).map_err(Fallback::Registry)?;
        let (layer, persisted) = EstargzLayer::open(&self.fetcher, blob, expected)
            .await
            .map_err(fallback_of)?;
        Ok(Opened {
            resolved: ResolvedLayer {
                layer: remote,
                index: persisted,
            },
            layer: self.opened(layer, learned_as),
        })
    }

    fn reopen(&self, resolved: &ResolvedLayer) -> Result<Box<dyn OpenedLayer>, String> {
        let blob = blob_of(&resolved.layer)?;
        let expected: TocDigest = resolved
            .layer
            .index_digest
            .parse()
            .map_err(|_| "bad TOC digest in metadata".to_owned())?;
        let layer = EstargzLayer::from_persisted(blob, &resolved.index, expected)
            .map_err(|e| with_causes(&e))?;
        // Mounted again after a restart: its start is long past, nothing to learn or replay.
        Ok(self.opened(layer, None))
    }
}

/// An opened eStargz layer and what it is served with.
struct OpenedEstargz {
    layer: EstargzLayer,
    image: Option<Digest>,
    serving: Serving,
}

impl OpenedLayer for OpenedEstargz {
    fn blobs(&self) -> Vec<BlobRef> {
        vec![self.layer.blob.clone()]
    }

    fn mount(
        self: Box<Self>,
        mountpoint: &Path,
        syscall: &Arc<dyn Syscall>,
        carried: &mut Carried,
    ) -> Result<Served, SnapshotError> {
        let Serving {
            reader,
            runtime,
            policy,
            learning,
        } = self.serving;
        let learn = learning
            .zip(self.image)
            .map(|(learning, image)| Learn { learning, image });
        let prefetch = policy.get().prefetch;
        let target = MountTarget {
            mountpoint,
            syscall: syscall.clone(),
            origin: carried.take(mountpoint),
            resent: carried.resent(),
        };
        let session = layer::mount(self.layer, reader, runtime, target, prefetch, learn).map_err(
            |source| SnapshotError::ServeLayer {
                mountpoint: mountpoint.to_owned(),
                source: Box::new(source),
            },
        )?;
        Ok(Served {
            sessions: vec![session],
            tasks: Tasks::default(),
        })
    }
}

fn fallback_of(err: FsError) -> Fallback {
    match err {
        FsError::FetchIndex { .. } => Fallback::Registry(with_causes(&err)),
        FsError::TocDigestMismatch { .. } => Fallback::IndexDigestMismatch,
        FsError::ParseToc { .. } | FsError::BuildIndex { .. } => {
            Fallback::RefusedIndex(with_causes(&err))
        }
        other => Fallback::NotLazyFormat(with_causes(&other)),
    }
}

fn blob_of(layer: &RemoteLayer) -> Result<BlobRef, String> {
    let image = ImageRef::parse(&layer.image_ref).map_err(|e| e.to_string())?;
    let digest = Digest::parse(&layer.digest).map_err(|e| e.to_string())?;
    Ok(BlobRef::new(image, digest, layer.size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_reasons_follow_the_failure() {
        let mismatch = FsError::PersistedIndex { reason: "x" };
        assert!(matches!(fallback_of(mismatch), Fallback::NotLazyFormat(_)));
        let cycle = FsError::BuildIndex {
            blob: "sha256:ab".into(),
            source: shoal_formats::estargz::IndexError::HardlinkToItself { path: "a".into() },
        };
        let fallback = fallback_of(cycle);
        assert_eq!(fallback.kind(), "refused_index");
        assert_eq!(
            fallback.to_string(),
            "TOC refused: build file index of sha256:ab: hardlink a points at itself"
        );
    }

    fn format(dir: &Path) -> EstargzFormat {
        let config = shoal_config::Config::parse(&format!(
            "root = \"{}\"\n[registry]\ndocker_config = \"{}\"\nretries = 0\n",
            dir.join("root").display(),
            dir.join("none.json").display()
        ))
        .unwrap();
        let fetcher = Fetcher::new(&config).unwrap();
        let reader = ChunkReader::new(
            Arc::new(fetcher.clone()),
            shoal_fuse::layer::ReaderConfig {
                memory_bytes: 1 << 20,
            },
        );
        let policy = crate::MountPolicy::new(crate::MountSettings {
            prefetch: Default::default(),
            resolve_timeout: std::time::Duration::from_secs(30),
        });
        EstargzFormat::new(fetcher, reader, Handle::current(), policy, None)
    }

    #[tokio::test]
    async fn a_layer_without_a_toc_digest_is_downloaded_without_asking_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let labels = LayerLabels {
            target: "sha256:chain".into(),
            // Nothing listens on 127.0.0.1:1: reaching for it would be a registry fallback.
            image_ref: "127.0.0.1:1/test/img:1".into(),
            layer_digest: format!("sha256:{}", "a".repeat(64)),
            manifest_digest: None,
            toc_digest: None,
            overlaybd: false,
        };
        let format = format(dir.path());
        let err = format.open(&labels).await.err().unwrap();
        assert!(matches!(err, Fallback::NotLazyFormat(_)), "{err}");
        let labels = LayerLabels {
            toc_digest: Some(format!("sha256:{}", "b".repeat(64))),
            ..labels
        };
        let err = format.open(&labels).await.err().unwrap();
        assert!(matches!(err, Fallback::Registry(_)), "{err}");
    }

    #[tokio::test]
    async fn a_persisted_toc_that_does_not_parse_is_refused_before_any_mount() {
        let dir = tempfile::tempdir().unwrap();
        let resolved = ResolvedLayer {
            layer: RemoteLayer {
                format: LayerFormat::Estargz,
                image_ref: "127.0.0.1:1/test/img:1".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 100,
                index_digest: format!("sha256:{}", "b".repeat(64)),
            },
            index: b"short".to_vec(),
        };
        let err = format(dir.path()).reopen(&resolved).err().unwrap();
        assert!(err.contains("persisted index"), "{err}");
    }
}
