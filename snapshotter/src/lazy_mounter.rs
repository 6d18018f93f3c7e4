//! The daemon's [`LayerMounter`]: one lifecycle for every lazy format. A layer is opened by
//! `resolve` (its format's [`LazyFormat::open`]) and kept until `mount` takes it; a mounted
//! layer is kept by mountpoint with what serves it, its blobs pinned in the cache and listed in
//! the status table, until `unmount` (or the daemon's end) releases it and cancels its tasks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use shoal_fetcher::{BlobRef, Digest, Fetcher};
use shoal_fuse::syscall::Syscall;
use tracing::{info, warn};

use crate::error::SnapshotError;
use crate::lazy_format::{LazyFormat, OpenedLayer, Served};
use crate::mount_policy::MountPolicy;
use crate::mount_table::{MountTable, MountedBlob};
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, ResolvedLayer};

/// Which opened layer a resolved layer is: its digest and its index's.
type OpenedKey = (String, String);

/// Mounts lazy layers of every format it was given, through one mount seam.
pub struct LazyMounter {
    fetcher: Fetcher,
    syscall: Arc<dyn Syscall>,
    formats: Vec<Box<dyn LazyFormat>>,
    /// Its `resolve_timeout`, read at each resolve: how long finding and opening a layer may
    /// take, whatever its format.
    policy: MountPolicy,
    /// Layers opened by `resolve`, waiting for `mount`, so the index is fetched once.
    opened: Mutex<HashMap<OpenedKey, Box<dyn OpenedLayer>>>,
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
    table: MountTable,
}

/// A mounted layer: what serves it, and the blobs it pinned and listed.
struct Mounted {
    format: LayerFormat,
    served: Served,
    blobs: Vec<BlobRef>,
}

impl LazyMounter {
    pub fn new(
        fetcher: Fetcher,
        syscall: Arc<dyn Syscall>,
        formats: Vec<Box<dyn LazyFormat>>,
        policy: MountPolicy,
    ) -> LazyMounter {
        LazyMounter {
            fetcher,
            syscall,
            formats,
            policy,
            opened: Mutex::new(HashMap::new()),
            mounted: Mutex::new(HashMap::new()),
            table: MountTable::default(),
        }
    }

    fn opened(&self) -> parking_lot::MutexGuard<'_, HashMap<OpenedKey, Box<dyn OpenedLayer>>> {
        self.opened.lock()
    }

    fn mounted(&self) -> parking_lot::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounted.lock()
    }

    fn pin(&self, blobs: &[BlobRef]) {
        for blob in blobs {
            self.fetcher.cache().pin(&blob.digest);
        }
    }

    fn unpin(&self, blobs: &[BlobRef]) {
        for blob in blobs {
            self.fetcher.cache().unpin(&blob.digest);
        }
    }

    /// Releases what a previous daemon (or a crash) left mounted at `mountpoint` and at its
    /// format companions: every such mount in the table, the latest first.
    fn release_stale(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |source| SnapshotError::UnmountLayer {
            mountpoint: mountpoint.to_owned(),
            source,
        };
        let mut ours = vec![mountpoint.to_owned()];
        ours.extend(self.formats.iter().flat_map(|f| f.companions(mountpoint)));
        let dir = mountpoint.parent().unwrap_or(mountpoint);
        let listed = self.syscall.mounts_under(dir).map_err(fail)?;
        for point in listed.iter().rev() {
            if ours.iter().any(|own| point.starts_with(own)) {
                self.syscall.unmount(point).map_err(fail)?;
                info!(mountpoint = %point.display(), "stale mount released");
            }
        }
        Ok(())
    }
}

/// A stopping daemon detaches its FUSE sessions rather than unmounting them: a running
/// container's overlay keeps a layer busy, and waiting for it would hang the shutdown. The next
/// daemon mounts the layers afresh from their persisted indexes.
impl Drop for LazyMounter {
    fn drop(&mut self) {
        let mounted = std::mem::take(self.mounted.get_mut());
        for (mountpoint, mut layer) in mounted {
            layer.served.tasks.cancel();
            for session in &mut layer.served.sessions {
                if let Err(err) = session.detach(&*self.syscall) {
                    warn!(mountpoint = %mountpoint.display(), error = %crate::error::with_causes(&err), "could not detach layer");
                }
            }
            // Session threads serve whoever still holds a layer until the process exits.
            std::thread::spawn(move || drop(layer));
        }
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for LazyMounter {
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        let format = self
            .formats
            .iter()
            .find(|f| f.claims(labels))
            .ok_or(Fallback::Disabled)?;
        let limit = self.policy.get().resolve_timeout;
        let opened = tokio::time::timeout(limit, format.open(labels))
            .await
            .unwrap_or_else(|_| {
                Err(Fallback::Registry(format!(
                    "opening the layer took longer than {}s",
                    limit.as_secs()
                )))
            })?;
        let layer = &opened.resolved.layer;
        let key = (layer.digest.clone(), layer.index_digest.clone());
        self.opened().insert(key, opened.layer);
        Ok(opened.resolved)
    }

    fn mount(&self, resolved: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |reason: String| SnapshotError::MountLayer {
            mountpoint: mountpoint.to_owned(),
            reason,
        };
        let layer = &resolved.layer;
        let format = self
            .formats
            .iter()
            .find(|f| f.kind() == layer.format)
            .ok_or_else(|| fail(format!("no mounter for {:?} layers", layer.format)))?;
        let key = (layer.digest.clone(), layer.index_digest.clone());
        let taken = self.opened().remove(&key);
        let opened = match taken {
            Some(opened) => opened,
            // A restart: the persisted index is verified again before it is trusted.
            None => format.reopen(resolved).map_err(fail)?,
        };
        let blobs = opened.blobs();
        self.pin(&blobs);
        let served = match opened.mount(mountpoint, &*self.syscall) {
            Ok(served) => served,
            Err(err) => {
                self.unpin(&blobs);
                return Err(err);
            }
        };
        for blob in &blobs {
            self.table.add(blob);
        }
        // Operators grep these lines (README, "Observability"); eStargz's FUSE mount logs its own.
        if layer.format == LayerFormat::Overlaybd {
            info!(blob = %layer.digest, layers = blobs.len(), mountpoint = %mountpoint.display(), "overlaybd layer mounted");
        }
        let mounted = Mounted {
            format: layer.format,
            served,
            blobs,
        };
        let replaced = self.mounted().insert(mountpoint.to_owned(), mounted);
        if let Some(old) = replaced {
            warn!(mountpoint = %mountpoint.display(), "a layer was mounted over another");
            std::thread::spawn(move || drop(old));
        }
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |source| SnapshotError::UnmountLayer {
            mountpoint: mountpoint.to_owned(),
            source,
        };
        if !self.mounted().contains_key(mountpoint) {
            // Not ours: a previous daemon's dead connection, say.
            return self.release_stale(mountpoint);
        }
        // The mount at the mountpoint first (eStargz's tree, overlaybd's filesystem): while it
        // fails the layer stays mounted, and listed, as it is.
        self.syscall.unmount(mountpoint).map_err(fail)?;
        let Some(mut layer) = self.mounted().remove(mountpoint) else {
            return Ok(()); // Another unmount of the same path won.
        };
        layer.served.tasks.cancel();
        // Detach: an overlay still stacked on the layer keeps it alive until it goes.
        let mut detached = Ok(());
        for session in &mut layer.served.sessions {
            if let Err(source) = session.detach(&*self.syscall) {
                detached = Err(fail(source));
            }
        }
        self.unpin(&layer.blobs);
        for blob in &layer.blobs {
            self.table.remove(&blob.digest);
        }
        if detached.is_ok() {
            // The first blob is the layer itself (an overlaybd chain's top).
            let blob = layer.blobs.first().map(|b| b.digest.to_string());
            let (blob, mountpoint) = (blob.unwrap_or_default(), mountpoint.display());
            match layer.format {
                LayerFormat::Estargz => info!(blob, %mountpoint, "layer unmounted"),
                LayerFormat::Overlaybd => info!(blob, %mountpoint, "overlaybd layer unmounted"),
            }
        }
        // A session ends once the kernel lets go; never wait for it here.
        std::thread::spawn(move || drop(layer));
        detached
    }

    fn cached_bytes(&self, digest: &str) -> u64 {
        // One chunk cache holds the blocks of every format.
        Digest::parse(digest)
            .map(|digest| self.fetcher.cache().cached_bytes(&digest))
            .unwrap_or(0)
    }

    fn mounted_blobs(&self) -> Vec<MountedBlob> {
        self.table.list()
    }

    fn mounted_layers(&self) -> usize {
        self.mounted().len()
    }
}

#[cfg(test)]
#[path = "lazy_mounter_tests.rs"]
mod tests;
