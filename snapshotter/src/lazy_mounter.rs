//! The daemon's [`LayerMounter`]: one lifecycle for every lazy format. A layer is opened by
//! `resolve` (its format's [`LazyFormat::open`]) and kept until `mount` takes it; a mounted
//! layer is kept by mountpoint with what serves it, its blobs pinned in the cache and listed in
//! the status table, until `unmount` (or the daemon's end) releases it and cancels its tasks.
//!
//! With an fd store ([`LazyMounter::with_handover`]), every FUSE connection is kept there as it
//! is mounted and released as it is unmounted. A daemon that stops leaves its mounts serving
//! ([`LazyMounter::end_connections_on_stop`] says otherwise), and the next one takes each
//! connection back when the layer is mounted again from its persisted index.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use shoal_fetcher::{BlobRef, Digest, Fetcher};
use shoal_fuse::connection::{self, Origin, Resend, ResentRequests};
use shoal_fuse::handover::FdStore;
use shoal_fuse::syscall::Syscall;
use tracing::{info, warn};

use crate::error::SnapshotError;
use crate::lazy_format::{Carried, LazyFormat, OpenedLayer, Served};
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
    handover: Option<Handover>,
}

/// The fd store and what it held for this daemon when it started.
struct Handover {
    store: Arc<dyn FdStore>,
    /// Connections an earlier daemon left, by mount path, until a mount takes them.
    waiting: Mutex<HashMap<PathBuf, OwnedFd>>,
    /// A stop ends every connection instead of leaving it to the next daemon.
    end_on_stop: AtomicBool,
    report: Mutex<HandoverReport>,
    resent: ResentRequests,
}

/// What the handover did for this daemon, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoverReport {
    /// Where connections wait between daemons; empty without a store.
    pub store: String,
    /// FUSE connections taken over from an earlier daemon.
    pub carried: u64,
    /// Of those, on a kernel that could not resend what the earlier daemon left unanswered.
    pub resend_unsupported: u64,
    /// Requests the kernel resent to those connections: read and not answered before.
    pub resent: u64,
    /// Connections that could not be taken over or kept, with why.
    pub not_carried: Vec<(PathBuf, String)>,
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
            handover: None,
        }
    }

    /// Keeps every FUSE connection in `store` and takes back what it holds from an earlier
    /// daemon rooted at `root`, as layers are mounted again. What the store holds for mounts
    /// outside `root` is another daemon's (a second daemon on the node, a benchmark's, a
    /// test's, given the same store by mistake): neither taken nor released.
    pub fn with_handover(mut self, store: Arc<dyn FdStore>, root: &Path) -> LazyMounter {
        let mut report = HandoverReport {
            store: store.describe(),
            ..HandoverReport::default()
        };
        let waiting = match store.kept() {
            Ok(kept) => {
                let (ours, others): (Vec<_>, Vec<_>) = kept
                    .into_iter()
                    .map(|(name, fd)| (PathBuf::from(name), fd))
                    .partition(|(path, _)| path.starts_with(root));
                if !others.is_empty() {
                    warn!(store = %report.store, root = %root.display(), connections = others.len(), "the fd store holds connections of mounts outside this daemon's root; left alone (does another daemon share the store?)");
                }
                ours.into_iter().collect()
            }
            Err(err) => {
                warn!(store = %report.store, error = %crate::error::with_causes(&err), "could not take back the connections an earlier daemon left; their layers are mounted anew");
                report
                    .not_carried
                    .push((PathBuf::new(), crate::error::with_causes(&err)));
                HashMap::new()
            }
        };
        self.handover = Some(Handover {
            store,
            waiting: Mutex::new(waiting),
            end_on_stop: AtomicBool::new(false),
            report: Mutex::new(report),
            resent: ResentRequests::default(),
        });
        self
    }

    /// Makes this daemon's stop end every connection (`shoal-snapshotter --shutdown`), not
    /// leave it for the next daemon.
    pub fn end_connections_on_stop(&self) {
        if let Some(handover) = &self.handover {
            handover.end_on_stop.store(true, Ordering::Relaxed);
        }
    }

    /// What the handover did, for status.
    pub fn handover_report(&self) -> HandoverReport {
        self.handover
            .as_ref()
            .map(|h| HandoverReport {
                resent: h.resent.count(),
                ..h.report.lock().clone()
            })
            .unwrap_or_default()
    }

    /// The connections left for `paths` that can be taken over: still mounted, with the INIT
    /// they negotiated persisted. The others are released.
    fn carried_for(&self, paths: &[PathBuf]) -> Carried {
        let Some(handover) = &self.handover else {
            return Carried::default();
        };
        let mut carried = Carried::new(handover.resent.clone());
        for path in paths {
            let Some(fd) = handover.waiting.lock().remove(path) else {
                continue;
            };
            let mounted = self
                .syscall
                .mounts_under(path)
                .is_ok_and(|points| points.iter().any(|p| p == path));
            let init = connection::persisted(path);
            match (mounted, init) {
                (true, Ok(init)) => carried.insert(path.clone(), Origin::Carried { fd, init }),
                (mounted, init) => {
                    let why = if !mounted {
                        "its mount is gone".to_owned()
                    } else {
                        format!(
                            "its INIT was not persisted: {}",
                            init.err().map(|e| e.to_string()).unwrap_or_default()
                        )
                    };
                    warn!(mountpoint = %path.display(), reason = %why, "connection left by an earlier daemon cannot be taken over; the layer is mounted anew");
                    handover.report.lock().not_carried.push((path.clone(), why));
                    self.forget_connection(path);
                }
            }
        }
        carried
    }

    /// Keeps the connections of a layer just mounted, so they outlive this daemon.
    fn keep_connections(&self, served: &Served) {
        let Some(handover) = &self.handover else {
            return;
        };
        for session in &served.sessions {
            let path = session.mountpoint();
            match session.carried() {
                Some(resend) => {
                    let mut report = handover.report.lock();
                    report.carried += 1;
                    if resend == Resend::Unsupported {
                        report.resend_unsupported += 1;
                    }
                }
                None => {
                    if let Err(err) = handover
                        .store
                        .keep(&path.to_string_lossy(), session.connection())
                    {
                        let why = crate::error::with_causes(&err);
                        warn!(mountpoint = %path.display(), error = %why, "could not keep the layer's connection; it will not survive a restart of the daemon");
                        handover
                            .report
                            .lock()
                            .not_carried
                            .push((path.to_owned(), why));
                    }
                }
            }
        }
    }

    /// Drops the store's copy of the connection at `path`: it ends once its mount goes.
    fn forget_connection(&self, path: &Path) {
        let Some(handover) = &self.handover else {
            return;
        };
        if let Err(err) = handover.store.release(&path.to_string_lossy()) {
            warn!(mountpoint = %path.display(), error = %crate::error::with_causes(&err), "could not release the layer's connection from the fd store");
        }
    }

    /// The paths a layer at `mountpoint` mounts FUSE or anything else on.
    fn paths_of(&self, mountpoint: &Path) -> Vec<PathBuf> {
        let mut paths = vec![mountpoint.to_owned()];
        paths.extend(self.formats.iter().flat_map(|f| f.companions(mountpoint)));
        paths
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
        let ours = self.paths_of(mountpoint);
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

/// A stopping daemon with an fd store leaves its FUSE sessions serving: the store keeps each
/// connection for the next daemon, and what this one read and did not answer is resent to it.
/// Otherwise (or on `--shutdown`) it detaches them rather than unmounting them: a running
/// container's overlay keeps a layer busy, and waiting for it would hang the shutdown; the
/// next daemon mounts the layers afresh from their persisted indexes.
impl Drop for LazyMounter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl LazyMounter {
    /// Whether a stop now leaves the mounts serving for the next daemon.
    pub fn hands_over(&self) -> bool {
        self.handover
            .as_ref()
            .is_some_and(|h| !h.end_on_stop.load(Ordering::Relaxed))
    }

    /// What a stopping daemon does with its mounts (see the `Drop` impl); once. Returns
    /// whether they were left serving, in which case the process must exit without dropping
    /// the replies its tasks still hold: a dropped reply answers EIO, where an unanswered
    /// request is resent to the next daemon.
    pub fn stop(&self) -> bool {
        let mounted = std::mem::take(&mut *self.mounted());
        if self.hands_over() {
            for (_, mut layer) in mounted {
                layer.served.tasks.cancel();
                for session in layer.served.sessions {
                    session.leave_serving();
                }
            }
            info!("lazy mounts left serving for the next daemon");
            return true;
        }
        for (mountpoint, mut layer) in mounted {
            for session in &layer.served.sessions {
                self.forget_connection(session.mountpoint());
            }
            layer.served.tasks.cancel();
            for session in &mut layer.served.sessions {
                if let Err(err) = session.detach(&*self.syscall) {
                    warn!(mountpoint = %mountpoint.display(), error = %crate::error::with_causes(&err), "could not detach layer");
                }
            }
            // Session threads serve whoever still holds a layer until the process exits.
            std::thread::spawn(move || drop(layer));
        }
        false
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
        // A layer resolved by this daemon mounts at a new snapshot's directory (ids are never
        // reused), where nothing can be left over; only a reopened one may find stale mounts.
        let reopened = taken.is_none();
        let opened = match taken {
            Some(opened) => opened,
            // A restart: the persisted index is verified again before it is trusted.
            None => format.reopen(resolved).map_err(fail)?,
        };
        let blobs = opened.blobs();
        let verification = opened.verification();
        let mut carried = self.carried_for(&self.paths_of(mountpoint));
        if carried.is_empty() && reopened {
            // Whatever a previous daemon left there without a holder is a dead connection.
            self.release_stale(mountpoint)?;
        }
        self.pin(&blobs);
        let served = match opened.mount(mountpoint, &self.syscall, &mut carried) {
            Ok(served) => served,
            Err(err) => {
                self.unpin(&blobs);
                return Err(err);
            }
        };
        self.keep_connections(&served);
        for blob in &blobs {
            let verified = verification.iter().find(|(d, _)| *d == blob.digest);
            self.table.add(blob, verified.map(|(_, v)| v.clone()));
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
            self.forget_connection(session.mountpoint());
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

    fn release_cached(&self, digest: &str) {
        let Ok(digest) = Digest::parse(digest) else {
            return;
        };
        let cache = self.fetcher.cache();
        let bytes = cache.cached_bytes(&digest);
        // The same path as a failed verification's drop: hidden, absence synced, punched out.
        match cache.invalidate(&digest, 0..u64::MAX) {
            Ok(()) if bytes > 0 => {
                info!(blob = %digest, bytes, "cache bytes of a removed layer released");
            }
            Ok(()) => {}
            Err(error) => {
                warn!(blob = %digest, %error, "cannot release a removed layer's cache bytes");
            }
        }
    }

    fn mounted_blobs(&self) -> Vec<MountedBlob> {
        let mut blobs = self.table.list();
        let mounted = self.mounted();
        for blob in &mut blobs {
            blob.carried_over = mounted.values().any(|layer| {
                layer.blobs.iter().any(|b| b.digest == blob.digest)
                    && layer.served.sessions.iter().any(|s| s.carried().is_some())
            });
        }
        blobs
    }

    fn handover(&self) -> HandoverReport {
        self.handover_report()
    }

    fn mounted_layers(&self) -> usize {
        self.mounted().len()
    }

    fn remounted(&self) {
        let Some(handover) = &self.handover else {
            return;
        };
        let unclaimed: Vec<PathBuf> = handover
            .waiting
            .lock()
            .drain()
            .map(|(path, _)| path)
            .collect();
        for path in unclaimed {
            // No snapshot mounts there any more: its connection and mount are released.
            info!(mountpoint = %path.display(), "connection left for a layer no snapshot has; released");
            self.forget_connection(&path);
            if let Err(err) = self.syscall.unmount(&path) {
                warn!(mountpoint = %path.display(), error = %crate::error::with_causes(&err), "could not unmount a layer no snapshot has");
            }
        }
    }
}

#[cfg(test)]
#[path = "lazy_mounter_tests.rs"]
mod tests;
