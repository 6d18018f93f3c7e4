//! Dispatch between the lazy layer formats: overlaybd layers (by their annotation) go to the
//! [`OverlaybdMounter`], everything else to the eStargz mounter.

use std::path::Path;
use std::sync::Arc;

use crate::error::SnapshotError;
use crate::overlaybd_mounter::OverlaybdMounter;
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, ResolvedLayer};

/// The daemon's [`LayerMounter`]: one per format, chosen by the labels or the stored format.
pub struct FormatMounter {
    estargz: Arc<dyn LayerMounter>,
    overlaybd: Arc<OverlaybdMounter>,
}

impl FormatMounter {
    pub fn new(estargz: Arc<dyn LayerMounter>, overlaybd: Arc<OverlaybdMounter>) -> FormatMounter {
        FormatMounter { estargz, overlaybd }
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for FormatMounter {
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        if labels.overlaybd {
            self.overlaybd.resolve(labels).await
        } else {
            self.estargz.resolve(labels).await
        }
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
}
