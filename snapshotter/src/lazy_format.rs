//! The part of a lazy mount that differs by layer format, behind [`LazyFormat`]: eStargz opens
//! a TOC and serves a FUSE tree; overlaybd stacks a chain's virtual disk, serves it as a FUSE
//! file and loop-mounts it. Everything the formats share (which layers are opened or mounted,
//! pins, the status table, unmounting, stale mounts) is [`crate::LazyMounter`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_fetcher::{BlobRef, Digest, Verification};
use shoal_fuse::connection::{Origin, ResentRequests};
use shoal_fuse::layer::MountedLayer;
use shoal_fuse::syscall::Syscall;
use shoal_fuse::tasks::Tasks;

use crate::error::SnapshotError;
use crate::remote::{Fallback, LayerFormat, LayerLabels, ResolvedLayer};

/// One lazily mountable layer format.
#[containerd_snapshots::tonic::async_trait]
pub trait LazyFormat: Send + Sync + 'static {
    /// The format it mounts, as records store it.
    fn kind(&self) -> LayerFormat;

    /// Whether a Prepare's labels describe a layer of this format.
    fn claims(&self, labels: &LayerLabels) -> bool;

    /// Locates the layer and fetches and verifies its index. Any error means "download it".
    async fn open(&self, labels: &LayerLabels) -> Result<Opened, Fallback>;

    /// Opens the layer again from the index bytes `open` returned, without the network,
    /// verifying them again (a restart reads them back from disk).
    fn reopen(&self, resolved: &ResolvedLayer) -> Result<Box<dyn OpenedLayer>, String>;

    /// Paths beside `mountpoint` where this format mounts too (overlaybd's disk file), so a
    /// previous daemon's mounts there are released with the layer's.
    fn companions(&self, _mountpoint: &Path) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// A layer `open` found: what to persist, and the layer ready to mount.
pub struct Opened {
    pub resolved: ResolvedLayer,
    pub layer: Box<dyn OpenedLayer>,
}

/// A layer opened and verified, not mounted yet.
pub trait OpenedLayer: Send {
    /// The blobs its reads go to, top first: pinned in the cache and listed while mounted.
    fn blobs(&self) -> Vec<BlobRef>;

    /// How its blobs' reads are verified, where the format lets that vary (overlaybd: per
    /// block with a block digest table, else per blob), for status.
    fn verification(&self) -> Vec<(Digest, Verification)> {
        Vec::new()
    }

    /// Mounts the layer read-only at `mountpoint` through `syscall`, serving again the FUSE
    /// connections in `carried` that an earlier daemon left for its paths, and leaving in place
    /// what is still mounted on top of them.
    fn mount(
        self: Box<Self>,
        mountpoint: &Path,
        syscall: &Arc<dyn Syscall>,
        carried: &mut Carried,
    ) -> Result<Served, SnapshotError>;
}

/// FUSE connections an earlier daemon served, by the path each is mounted on, for a mount to
/// take over instead of mounting anew; and where the daemon counts the requests the kernel
/// resends to them.
#[derive(Debug, Default)]
pub struct Carried {
    origins: HashMap<PathBuf, Origin>,
    resent: ResentRequests,
}

impl Carried {
    pub fn new(resent: ResentRequests) -> Carried {
        Carried {
            origins: HashMap::new(),
            resent,
        }
    }

    pub fn insert(&mut self, path: PathBuf, origin: Origin) {
        self.origins.insert(path, origin);
    }

    /// Where the connection at `path` comes from: the carried one, or a new mount.
    pub fn take(&mut self, path: &Path) -> Origin {
        self.origins.remove(path).unwrap_or(Origin::New)
    }

    /// The daemon's count of resent requests, for the filesystems serving these connections.
    pub fn resent(&self) -> ResentRequests {
        self.resent.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }
}

/// What serves a mounted layer: dropped only once the layer is unmounted.
pub struct Served {
    /// Its FUSE sessions (eStargz: the tree at the mountpoint; overlaybd: the disk file).
    pub sessions: Vec<MountedLayer>,
    /// Background work of the layer (overlaybd's whole-blob fetch), cancelled with it; an
    /// eStargz prefetch belongs to its session.
    pub tasks: Tasks,
}
