//! Dispatch between the lazy layer formats: overlaybd layers (by their annotation) go to the
//! [`OverlaybdMounter`], everything else to the eStargz mounter.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::SnapshotError;
use crate::overlaybd_mounter::OverlaybdMounter;
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, ResolvedLayer};

/// The daemon's [`LayerMounter`]: one per format, chosen by the labels or the stored format.
pub struct FormatMounter {
    estargz: Arc<dyn LayerMounter>,
    overlaybd: Arc<OverlaybdMounter>,
    /// How long finding and opening a layer may take, whatever its format: a registry that
    /// hangs must not hang containerd's Prepare.
    resolve_timeout: Duration,
}

impl FormatMounter {
    pub fn new(
        estargz: Arc<dyn LayerMounter>,
        overlaybd: Arc<OverlaybdMounter>,
        resolve_timeout: Duration,
    ) -> FormatMounter {
        FormatMounter {
            estargz,
            overlaybd,
            resolve_timeout,
        }
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for FormatMounter {
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        let resolved = async {
            if labels.overlaybd {
                self.overlaybd.resolve(labels).await
            } else {
                self.estargz.resolve(labels).await
            }
        };
        let limit = self.resolve_timeout;
        tokio::time::timeout(limit, resolved)
            .await
            .unwrap_or_else(|_| {
                Err(Fallback::Registry(format!(
                    "opening the layer took longer than {}s",
                    limit.as_secs()
                )))
            })
    }

    fn mount(&self, layer: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
        match layer.layer.format {
            LayerFormat::Estargz => self.estargz.mount(layer, mountpoint),
            LayerFormat::Overlaybd => self.overlaybd.mount(layer, mountpoint),
        }
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
        if self.overlaybd.owns(mountpoint) {
            self.overlaybd.unmount(mountpoint)
        } else {
            self.estargz.unmount(mountpoint)
        }
    }

    fn cached_bytes(&self, digest: &str) -> u64 {
        // One chunk cache holds the blocks of both formats.
        self.estargz.cached_bytes(digest)
    }
}
