//! The remote-snapshot handshake: Prepare with a target chainID either mounts the layer lazily
//! and answers ALREADY_EXISTS, or falls back (logged and counted) to an ordinary snapshot that
//! containerd fills by downloading the layer.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info, warn};

use super::remount::UnmountedLayer;
use super::{Inner, ShoalSnapshotter};
use crate::error::SnapshotError;
use crate::metadata::{Kind, Record};
use crate::remote::{Fallback, LayerFormat, LayerLabels, ResolvedLayer, LABEL_REMOTE};

/// File under a remote snapshot's directory holding its verified index (the eStargz TOC), so
/// that a restart mounts it again without the registry.
pub(super) const INDEX_FILE: &str = "index";

/// How lazy pulling has gone since start: layers mounted, fallbacks by reason.
#[derive(Debug, Default)]
pub struct LazyStats {
    mounted: AtomicU64,
    remount_failures: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Unpacks whose Prepare carried no remote-snapshot labels at all.
    pub(super) unlabelled: super::unlabelled::UnlabelledUnpacks,
}

impl LazyStats {
    pub fn mounted(&self) -> u64 {
        self.mounted.load(Ordering::Relaxed)
    }

    pub fn remount_failures(&self) -> u64 {
        self.remount_failures.load(Ordering::Relaxed)
    }

    /// Fallback counts keyed by [`Fallback::kind`], with layers containerd unpacked without
    /// asking for a remote snapshot as `unlabelled_unpack`.
    pub fn fallbacks(&self) -> BTreeMap<&'static str, u64> {
        let mut fallbacks = self.fallbacks.lock().clone();
        let unlabelled = self.unlabelled.layers();
        if unlabelled > 0 {
            fallbacks.insert(super::unlabelled::KIND, unlabelled);
        }
        fallbacks
    }

    pub(crate) fn fell_back(&self, key: &str, reason: &Fallback) {
        match reason {
            Fallback::NotLazyFormat(_) | Fallback::Disabled => {
                info!(key, reason = %reason, kind = reason.kind(), "layer is downloaded, not lazily mounted")
            }
            _ => {
                warn!(key, reason = %reason, kind = reason.kind(), "lazy mount failed; layer is downloaded instead")
            }
        }
        *self.fallbacks.lock().entry(reason.kind()).or_default() += 1;
    }
}

impl ShoalSnapshotter {
    /// `Ok(error)` is the answer to the Prepare (ALREADY_EXISTS when the layer is provided);
    /// `Err(why)` means "fall back to an ordinary snapshot", already logged and counted.
    pub(super) async fn try_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: LayerLabels,
    ) -> Result<SnapshotError, Fallback> {
        let target = layer.target.clone();
        let exists = {
            let target = target.clone();
            self.blocking("stat", move |inner| inner.store.get(&target))
                .await
        };
        if exists.is_ok() {
            return Ok(SnapshotError::AlreadyExists { key: target });
        }
        let resolved = match self.inner.mounter.resolve(&layer).await {
            Ok(resolved) => resolved,
            Err(fallback) if layer.overlaybd => {
                return Ok(block_layer_unavailable(&layer, &fallback))
            }
            Err(fallback) => {
                self.inner.lazy.fell_back(key, &fallback);
                return Err(fallback);
            }
        };
        let mut labels = labels.clone();
        labels.insert(LABEL_REMOTE.into(), "shoal".into());
        let (name, parent_key) = (target.clone(), parent.to_string());
        let created = self
            .blocking("prepare remote", move |inner| {
                inner.create(&name, &parent_key, Kind::Committed, labels, Some(&resolved))
            })
            .await;
        match created {
            Ok(record) => {
                self.inner.lazy.mounted.fetch_add(1, Ordering::Relaxed);
                info!(
                    chain_id = %target,
                    id = record.id,
                    layer = record.remote.as_ref().map(|r| r.digest.as_str()).unwrap_or(""),
                    "layer mounted lazily"
                );
                Ok(SnapshotError::AlreadyExists { key: target })
            }
            // Another Prepare for the same layer won the race: the layer is there all the same.
            Err(SnapshotError::AlreadyExists { .. }) => {
                Ok(SnapshotError::AlreadyExists { key: target })
            }
            Err(err) if layer.overlaybd => Ok(block_layer_unavailable(
                &layer,
                &Fallback::Mount(err.to_string()),
            )),
            Err(err) => {
                let fallback = Fallback::Mount(err.to_string());
                self.inner.lazy.fell_back(key, &fallback);
                Err(fallback)
            }
        }
    }
}

/// An overlaybd blob is a disk layer wrapped in a one-file tar: letting containerd unpack it
/// would give containers a root holding only `overlaybd.commit`, so the pull fails instead.
fn block_layer_unavailable(layer: &LayerLabels, reason: &Fallback) -> SnapshotError {
    error!(layer = %layer.layer_digest, reason = %reason, "overlaybd layer cannot be mounted");
    SnapshotError::BlockLayerUnavailable {
        layer: layer.layer_digest.clone(),
        reason: reason.to_string(),
    }
}

impl Inner {
    /// Lays out a remote snapshot in place (a FUSE mount cannot be renamed into place) and mounts
    /// it; a crash part-way leaves an orphan that start-up cleanup unmounts and removes.
    pub(super) fn make_remote_dir(
        &self,
        id: u64,
        resolved: &ResolvedLayer,
    ) -> Result<(), SnapshotError> {
        let dir = self.layout.dir(id);
        let fs = self.layout.upper(id);
        for (path, mode) in [(&dir, 0o700), (&fs, 0o755)] {
            std::fs::create_dir(path)
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|source| SnapshotError::CreateDir {
                    path: path.clone(),
                    source,
                })?;
        }
        let index = dir.join(INDEX_FILE);
        write_durably(&index, &resolved.index).map_err(|source| SnapshotError::PersistIndex {
            path: index,
            source,
        })?;
        self.mounter.mount(resolved, &fs)
    }

    /// The parents an overlay of `record` stacks, nearest first. An overlaybd layer's directory
    /// already holds the merged filesystem of its whole chain (deletions applied), so the list
    /// stops there: the layers below would only bring deleted files back.
    pub(super) fn overlay_parents(&self, record: &Record) -> Result<Vec<u64>, SnapshotError> {
        let mut ids = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let rec = self.store.get(&parent)?;
            ids.push(rec.id);
            let merged = rec
                .remote
                .as_ref()
                .is_some_and(|r| r.format == LayerFormat::Overlaybd);
            if merged {
                break;
            }
            parent = rec.parent;
        }
        Ok(ids)
    }

    /// Mounts every remote layer again after a restart, from its persisted index.
    pub(super) fn remount_all(&self) -> Result<(), SnapshotError> {
        let mut remounted = HashMap::new();
        for entry in self.store.list()? {
            let Some(layer) = entry.record.remote.clone() else {
                continue;
            };
            let fs = self.layout.upper(entry.record.id);
            let index_path = self.layout.dir(entry.record.id).join(INDEX_FILE);
            let result = std::fs::read(&index_path)
                .map_err(|source| SnapshotError::PersistIndex {
                    path: index_path.clone(),
                    source,
                })
                .and_then(|index| self.mounter.mount(&ResolvedLayer { layer, index }, &fs));
            match result {
                Ok(()) => {
                    remounted.insert(entry.key, entry.record.id);
                }
                Err(err) => {
                    self.lazy.remount_failures.fetch_add(1, Ordering::Relaxed);
                    error!(
                        key = %entry.key,
                        error = %err,
                        "could not mount remote layer again from its persisted index; \
                         it is mounted from the registry before anything stacks it"
                    );
                    self.unmounted.insert(UnmountedLayer {
                        key: entry.key,
                        layer: entry.record.remote.map(|r| r.digest).unwrap_or_default(),
                        reason: format!("its persisted index was refused: {err}"),
                    });
                }
            }
        }
        if !remounted.is_empty() {
            info!(layers = remounted.len(), "remote layers mounted again");
        }
        self.mounter.remounted();
        Ok(())
    }
}

pub(super) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
#[path = "lazy_tests.rs"]
mod tests;
