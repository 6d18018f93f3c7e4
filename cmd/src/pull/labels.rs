//! Chain IDs and the labels containerd and remote snapshotters agree on: what a snapshot is
//! told on Prepare, and the garbage-collection references on content.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use shoal_fetcher::Digest;

use super::image::Descriptor;

/// The committed name a Prepare is meant to become; a remote snapshotter commits it itself.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Layer annotations with this prefix are passed on to the snapshotter, as containerd does.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";

pub const GC_CONFIG: &str = "containerd.io/gc.ref.content.config";
pub const GC_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";
pub const GC_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";
pub const GC_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
pub const DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";

/// containerd refuses a label whose key and value together exceed this many bytes.
pub const MAX_LABEL_BYTES: usize = 4096;

/// The identity of a stack of layers: `chain(0) = diff(0)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))`. Committed snapshots are named by it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChainId(Digest);

impl ChainId {
    /// The chain ID of every prefix of `diff_ids`, bottom layer first.
    pub fn all(diff_ids: &[Digest]) -> Vec<ChainId> {
        let mut chain: Vec<ChainId> = Vec::with_capacity(diff_ids.len());
        for diff_id in diff_ids {
            let next = match chain.last() {
                None => diff_id.clone(),
                Some(parent) => Digest::of(format!("{} {diff_id}", parent.0).as_bytes()),
            };
            chain.push(ChainId(next));
        }
        chain
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Whether containerd accepts `key = value`.
pub fn fits(key: &str, value: &str) -> bool {
    key.len() + value.len() <= MAX_LABEL_BYTES
}

/// `digests` joined with commas, cut after the last one that keeps the `key` label within
/// containerd's limit (as containerd and stargz do: a shorter list only costs prefetching).
pub fn layer_list(key: &str, digests: &[&Digest]) -> String {
    let mut list = String::new();
    for digest in digests {
        let separator = if list.is_empty() { "" } else { "," };
        if !fits(key, &format!("{list}{separator}{digest}")) {
            break;
        }
        list.push_str(separator);
        list.push_str(digest.as_str());
    }
    list
}

/// Labels as the generated gRPC messages carry them.
pub fn to_map(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// What every layer of one image shares in its Prepare labels.
pub struct ImageLabels<'a> {
    /// The image reference, fully qualified (`host/repository:tag`).
    pub reference: &'a str,
    pub manifest: &'a Digest,
    pub layers: &'a [Descriptor],
}

impl ImageLabels<'_> {
    /// The labels of the Prepare that unpacks layer `index` as `chain`: the layer's own
    /// `containerd.io/snapshot/` annotations, then what containerd's CRI and stargz's
    /// `ctr-remote` add (winning over annotations of the same key), then the target name.
    /// Annotations too large for containerd are left out rather than failing the Prepare.
    pub fn prepare(&self, index: usize, chain: &ChainId) -> BTreeMap<String, String> {
        let layer = &self.layers[index];
        let mut labels: BTreeMap<String, String> = layer
            .annotations
            .iter()
            .filter(|(key, value)| key.starts_with(INHERITED_PREFIX) && fits(key, value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let from_here: Vec<&Digest> = self.layers[index..].iter().map(|l| &l.digest).collect();
        let digest = layer.digest.to_string();
        let ours = [
            (CRI_IMAGE_REF, self.reference.to_owned()),
            (CRI_MANIFEST_DIGEST, self.manifest.to_string()),
            (CRI_LAYER_DIGEST, digest.clone()),
            (CRI_IMAGE_LAYERS, layer_list(CRI_IMAGE_LAYERS, &from_here)),
            (STARGZ_REFERENCE, self.reference.to_owned()),
            (STARGZ_DIGEST, digest),
            (STARGZ_LAYERS, layer_list(STARGZ_LAYERS, &from_here)),
            (SNAPSHOT_REF, chain.to_string()),
        ];
        for (key, value) in ours {
            if fits(key, &value) {
                labels.insert(key.to_owned(), value);
            }
        }
        labels
    }
}

/// `eStargz` or `overlaybd` when a layer's annotations mark it as one (what a snapshotter
/// needs to mount it lazily), else `None`.
pub fn lazy_format(layer: &Descriptor) -> Option<&'static str> {
    let has = |key: &str| layer.annotations.get(key).is_some_and(|v| !v.is_empty());
    if has("containerd.io/snapshot/overlaybd/blob-digest") {
        Some("overlaybd")
    } else if has("containerd.io/snapshot/stargz/toc.digest") {
        Some("eStargz")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".to_owned(),
            digest: Digest::of(&[n]),
            size: 100,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let diffs = [Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c")];
        let chain = ChainId::all(&diffs);
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[0].as_str(), diffs[0].as_str());
        let second = Digest::of(format!("{} {}", diffs[0], diffs[1]).as_bytes());
        assert_eq!(chain[1].as_str(), second.as_str());
        let third = Digest::of(format!("{second} {}", diffs[2]).as_bytes());
        assert_eq!(chain[2].as_str(), third.as_str());
        assert!(ChainId::all(&[]).is_empty());
    }

    #[test]
    fn layer_lists_are_cut_to_the_label_limit() {
        let digests: Vec<Digest> = (0..100u8).map(|n| Digest::of(&[n])).collect();
        let refs: Vec<&Digest> = digests.iter().collect();
        let list = layer_list(CRI_IMAGE_LAYERS, &refs);
        assert!(fits(CRI_IMAGE_LAYERS, &list));
        let count = list.split(',').count();
        // 72 bytes per digest and comma: 56 fit in 4096 beside this 39-byte key.
        assert_eq!(count, 56);
        assert_eq!(list.split(',').next(), Some(digests[0].as_str()));
        assert!(!list.ends_with(','));
        assert_eq!(
            layer_list(CRI_IMAGE_LAYERS, &refs[..2]).split(',').count(),
            2
        );
    }

    #[test]
    fn prepare_labels_carry_image_layer_and_inherited_annotations() {
        let toc = "containerd.io/snapshot/stargz/toc.digest";
        let huge = "x".repeat(MAX_LABEL_BYTES);
        let layers = vec![
            layer(1, &[]),
            layer(
                2,
                &[
                    (toc, "sha256:toc"),
                    ("org.opencontainers.image.title", "not inherited"),
                    ("containerd.io/snapshot/too-big", &huge),
                    (STARGZ_DIGEST, "overridden"),
                ],
            ),
            layer(3, &[]),
        ];
        let manifest = Digest::of(b"manifest");
        let image = ImageLabels {
            reference: "127.0.0.1:5000/app:latest",
            manifest: &manifest,
            layers: &layers,
        };
        let chain = ChainId::all(&[Digest::of(b"d")]).remove(0);
        let labels = image.prepare(1, &chain);
        let expected_layers = format!("{},{}", layers[1].digest, layers[2].digest);
        let expected: BTreeMap<String, String> = [
            (toc, "sha256:toc".to_owned()),
            (CRI_IMAGE_REF, "127.0.0.1:5000/app:latest".to_owned()),
            (CRI_MANIFEST_DIGEST, manifest.to_string()),
            (CRI_LAYER_DIGEST, layers[1].digest.to_string()),
            (CRI_IMAGE_LAYERS, expected_layers.clone()),
            (STARGZ_REFERENCE, "127.0.0.1:5000/app:latest".to_owned()),
            (STARGZ_DIGEST, layers[1].digest.to_string()),
            (STARGZ_LAYERS, expected_layers),
            (SNAPSHOT_REF, chain.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(labels, expected);
    }
}
