//! Remote (lazily pulled) layers: which labels locate them, why a layer falls back to an
//! ordinary download, and the [`LayerMounter`] seam through which the snapshotter mounts them.
//!
//! containerd's rule: on Prepare with `containerd.io/snapshot.ref` = chainID, a snapshotter
//! that can provide the layer itself commits a snapshot named chainID and answers
//! ALREADY_EXISTS; containerd then never downloads that layer.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;

pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const LABEL_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Present on overlaybd layers: the blob's digest (the layer is a block-device layer).
pub const LABEL_OVERLAYBD_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// Set by Shoal on the snapshots it provides remotely; `ctr snapshots info` shows it.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Set by Shoal on the ordinary snapshot a Prepare fell back to: `<kind>: <reason>`, so that
/// the client filling it (`shoal rpull`, `ctr snapshot info`) can say why it downloads.
pub const LABEL_FALLBACK: &str = "containerd.io/snapshot/shoal.fallback";

/// Where a layer lives, as the labels of a Prepare describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    /// The chainID containerd wants committed.
    pub target: String,
    pub image_ref: String,
    pub layer_digest: String,
    pub manifest_digest: Option<String>,
    pub toc_digest: Option<String>,
    /// The layer carries overlaybd's annotations: it is a block layer, not a tar.
    pub overlaybd: bool,
}

impl LayerLabels {
    /// `Ok(None)` when the Prepare is not a remote-snapshot request at all.
    pub fn parse(labels: &BTreeMap<String, String>) -> Result<Option<LayerLabels>, Fallback> {
        let Some(target) = labels.get(LABEL_TARGET).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let pick = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
                .cloned()
        };
        let image_ref =
            pick(&[LABEL_CRI_IMAGE_REF, LABEL_STARGZ_REFERENCE]).ok_or(Fallback::MissingLabels)?;
        let layer_digest =
            pick(&[LABEL_CRI_LAYER_DIGEST, LABEL_STARGZ_DIGEST]).ok_or(Fallback::MissingLabels)?;
        Ok(Some(LayerLabels {
            target: target.clone(),
            image_ref,
            layer_digest,
            manifest_digest: pick(&[LABEL_CRI_MANIFEST_DIGEST]),
            toc_digest: pick(&[LABEL_TOC_DIGEST]),
            overlaybd: pick(&[LABEL_OVERLAYBD_BLOB_DIGEST]).is_some(),
        }))
    }
}

/// What the snapshotter persists about a remote layer, enough to mount it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    pub format: LayerFormat,
    pub image_ref: String,
    pub digest: String,
    pub size: u64,
    /// eStargz: sha256 of the TOC JSON; overlaybd: sha256 of the persisted virtual disk
    /// metadata. Checked on every (re)mount.
    pub index_digest: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    Estargz,
    /// A block layer; its snapshot directory holds the merged filesystem of its whole chain.
    Overlaybd,
}

/// A layer ready to mount: where it lives and its verified index bytes (the eStargz TOC).
#[derive(Debug, Clone)]
pub struct ResolvedLayer {
    pub layer: RemoteLayer,
    pub index: Vec<u8>,
}

/// Why a layer is downloaded by containerd instead of mounted lazily. Each is logged and counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fallback {
    /// The Prepare carried a target but not enough labels to find the layer.
    MissingLabels,
    /// Lazy pulling is switched off or has no mounter.
    Disabled,
    /// The layer is not in a lazily mountable format (a plain tar.gz, say).
    NotLazyFormat(String),
    /// No TOC digest annotation: the TOC cannot be verified, so it is not trusted.
    UnverifiableIndex,
    /// The TOC's sha256 differs from the annotation.
    IndexDigestMismatch,
    /// The TOC is over a documented limit or describes what cannot be served safely (a
    /// chunk without a digest, chunks the blob cannot hold, a hardlink cycle).
    RefusedIndex(String),
    /// The registry could not be reached or refused.
    Registry(String),
    /// Mounting failed locally.
    Mount(String),
}

impl Fallback {
    /// A short stable name, used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Fallback::MissingLabels => "missing_labels",
            Fallback::Disabled => "disabled",
            Fallback::NotLazyFormat(_) => "not_lazy_format",
            Fallback::UnverifiableIndex => "unverifiable_index",
            Fallback::IndexDigestMismatch => "index_digest_mismatch",
            Fallback::RefusedIndex(_) => "refused_index",
            Fallback::Registry(_) => "registry",
            Fallback::Mount(_) => "mount",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::MissingLabels => write!(f, "labels do not locate the layer"),
            Fallback::Disabled => write!(f, "lazy pulling is disabled"),
            Fallback::NotLazyFormat(why) => write!(f, "not a lazily mountable layer: {why}"),
            Fallback::UnverifiableIndex => write!(f, "no toc.digest annotation to verify the TOC"),
            Fallback::IndexDigestMismatch => write!(f, "TOC digest differs from the annotation"),
            Fallback::RefusedIndex(why) => write!(f, "TOC refused: {why}"),
            Fallback::Registry(why) => write!(f, "registry: {why}"),
            Fallback::Mount(why) => write!(f, "mount: {why}"),
        }
    }
}

/// Mounts remote layers. The real one serves FUSE filesystems backed by the chunk cache; tests
/// use a recording double.
#[containerd_snapshots::tonic::async_trait]
pub trait LayerMounter: Send + Sync + 'static {
    /// Locates the layer and fetches and verifies its index. Any error means "download it".
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback>;

    /// Mounts `layer` read-only at `mountpoint`. Called again after a restart with the index
    /// bytes persisted at the first mount, so it must not need the network.
    fn mount(&self, layer: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError>;

    /// Unmounts whatever is mounted at `mountpoint` (lazily if busy); a no-op when nothing is.
    fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError>;

    /// Bytes of layer blob `digest` this node holds on disk (its chunk cache): what a remote
    /// snapshot really costs, reported as its usage.
    fn cached_bytes(&self, _digest: &str) -> u64 {
        0
    }

    /// Frees what the chunk cache holds of layer blob `digest`, whose last snapshot was just
    /// removed: kubelet's image GC removes an image to get its disk back, so the cache bytes
    /// its usage counted must go with it.
    fn release_cached(&self, _digest: &str) {}

    /// The blobs mounted layers serve right now, for status.
    fn mounted_blobs(&self) -> Vec<crate::mount_table::MountedBlob> {
        Vec::new()
    }

    /// Layers mounted right now (one per remote snapshot), for status.
    fn mounted_layers(&self) -> usize {
        0
    }

    /// Every remote layer was mounted again after a start: what an earlier daemon left for
    /// layers no snapshot has any more can go.
    fn remounted(&self) {}

    /// What keeping mounts across restarts did for this daemon, for status.
    fn handover(&self) -> crate::lazy_mounter::HandoverReport {
        crate::lazy_mounter::HandoverReport::default()
    }
}

/// The mounter of a snapshotter without lazy pulling: every layer is downloaded.
pub struct NoRemote;

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for NoRemote {
    async fn resolve(&self, _labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        Err(Fallback::Disabled)
    }

    fn mount(&self, _layer: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
        Err(SnapshotError::MountLayer {
            mountpoint: mountpoint.to_owned(),
            reason: "lazy pulling is disabled".into(),
        })
    }

    fn unmount(&self, _mountpoint: &Path) -> Result<(), SnapshotError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_target_is_not_a_remote_request() {
        assert_eq!(LayerLabels::parse(&labels(&[])).unwrap(), None);
    }

    #[test]
    fn cri_labels_locate_the_layer() {
        let parsed = LayerLabels::parse(&labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_CRI_IMAGE_REF, "r/img:1"),
            (LABEL_CRI_LAYER_DIGEST, "sha256:layer"),
            (LABEL_CRI_MANIFEST_DIGEST, "sha256:man"),
            (LABEL_TOC_DIGEST, "sha256:toc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(parsed.image_ref, "r/img:1");
        assert_eq!(parsed.manifest_digest.as_deref(), Some("sha256:man"));
        assert_eq!(parsed.toc_digest.as_deref(), Some("sha256:toc"));
        assert!(!parsed.overlaybd);
    }

    #[test]
    fn overlaybd_annotation_marks_a_block_layer() {
        let parsed = LayerLabels::parse(&labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_CRI_IMAGE_REF, "r/img:1"),
            (LABEL_CRI_LAYER_DIGEST, "sha256:layer"),
            (LABEL_OVERLAYBD_BLOB_DIGEST, "sha256:layer"),
        ]))
        .unwrap()
        .unwrap();
        assert!(parsed.overlaybd);
    }

    #[test]
    fn stargz_labels_locate_the_layer() {
        let parsed = LayerLabels::parse(&labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (LABEL_STARGZ_REFERENCE, "r/img:1"),
            (LABEL_STARGZ_DIGEST, "sha256:layer"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(parsed.layer_digest, "sha256:layer");
        assert_eq!(parsed.toc_digest, None);
    }

    #[test]
    fn target_without_location_falls_back() {
        let err = LayerLabels::parse(&labels(&[(LABEL_TARGET, "sha256:chain")])).unwrap_err();
        assert_eq!(err, Fallback::MissingLabels);
    }
}
