//! Unpacks that never asked for a remote snapshot: containerd preparing an `extract-` key with
//! no target label (`ctr image pull` on containerd 1.x, say), so the layer is downloaded
//! whatever its format. Counted per layer, logged once per image: an image's layers are
//! prepared in order, each on the chain committed by the one before.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

/// The fallback kind these are counted as.
pub const KIND: &str = "unlabelled_unpack";

/// Chains remembered to recognise the rest of an image's layers; past this many, forgotten
/// all at once (the worst case is one more log line).
const CHAINS_CAP: usize = 4096;

#[derive(Debug, Default)]
pub struct UnlabelledUnpacks {
    layers: AtomicU64,
    /// The chain IDs these unpacks are for: a Prepare on one of them is the same image's next
    /// layer.
    chains: Mutex<HashSet<String>>,
}

impl UnlabelledUnpacks {
    pub fn layers(&self) -> u64 {
        self.layers.load(Ordering::Relaxed)
    }

    /// Notes an active snapshot prepared without remote-snapshot labels; only containerd's
    /// unpack keys (`extract-<unique> <chainID>`) count, a container's own snapshot does not.
    /// Whether it was logged: for an image's first layer only.
    pub fn prepared(&self, key: &str, parent: &str) -> bool {
        let Some(chain) = unpack_chain(key) else {
            return false;
        };
        self.layers.fetch_add(1, Ordering::Relaxed);
        let first_of_image = {
            let mut chains = self.chains.lock();
            let continues = !parent.is_empty() && chains.contains(name_of(parent));
            if chains.len() >= CHAINS_CAP {
                chains.clear();
            }
            chains.insert(chain.to_owned());
            !continues
        };
        if first_of_image {
            warn!(
                chain = chain,
                "containerd is unpacking an image without remote-snapshot labels, so its layers \
                 are downloaded in full even if they are eStargz or overlaybd; pull with \
                 `shoal rpull` or through CRI (kubelet, crictl), which pass them"
            );
        }
        first_of_image
    }
}

/// The chain ID of a containerd unpack key, `None` for any other key. containerd's metadata
/// store hands snapshotters `<namespace>/<id>/<key>`, so the key is what follows the last `/`
/// before the space (the unique part is URL-safe base64, without `/`).
fn unpack_chain(key: &str) -> Option<&str> {
    let (prefix, chain) = key.rsplit_once(' ')?;
    (name_of(prefix).starts_with("extract-") && chain.starts_with("sha256:")).then_some(chain)
}

/// A snapshot's name without the `<namespace>/<id>/` containerd puts before it.
fn name_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_counts_and_an_image_is_one_chain_of_prepares() {
        let unpacks = UnlabelledUnpacks::default();
        assert!(unpacks.prepared("default/4/extract-1-9 sha256:aa", ""));
        assert!(!unpacks.prepared("default/6/extract-2-9 sha256:bb", "default/5/sha256:aa"));
        // A container's snapshot, not an unpack.
        assert!(!unpacks.prepared("k8s-container-1", "sha256:bb"));
        // Another image, on a base nobody unpacked this way: logged again.
        assert!(unpacks.prepared("extract-3-9 sha256:dd", "sha256:base"));
        assert_eq!(unpacks.layers(), 3);
        let chains = unpacks.chains.lock();
        assert!(chains.contains("sha256:aa") && chains.contains("sha256:bb"));
        assert_eq!(unpack_chain("extract-1 sha256:cc"), Some("sha256:cc"));
        assert_eq!(unpack_chain("view-1 sha256:cc"), None);
    }
}
