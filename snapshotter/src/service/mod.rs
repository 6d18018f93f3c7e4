//! The containerd Snapshots API over the metadata store and the on-disk layout.

mod lazy;
mod remount;
mod unlabelled;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind as ApiKind, Snapshotter, Usage};
use futures::stream::{self, BoxStream};
use tracing::{info, warn};

use crate::error::SnapshotError;
use crate::filter::{Fields, Filter};
use crate::layout::Layout;
use crate::metadata::{Entry, Kind, Record, Store};
use crate::remote::{Fallback, LayerLabels, LayerMounter, ResolvedLayer, LABEL_FALLBACK};
use crate::usage;

pub use lazy::LazyStats;
pub use remount::UnmountedLayer;

/// containerd's limit on a label's key plus value (`labels.Validate`).
const MAX_LABEL_BYTES: usize = 4096;

/// Shoal's snapshotter: what containerd talks to over the proxy-plugin socket.
#[derive(Clone)]
pub struct ShoalSnapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    store: Store,
    layout: Layout,
    mounter: Arc<dyn LayerMounter>,
    lazy: LazyStats,
    /// Remote layers whose mount is missing since start-up.
    unmounted: remount::Unmounted,
    /// Held while a layer is mounted again from the registry.
    repair: tokio::sync::Mutex<()>,
}

/// A count of snapshots by kind, for `shoal status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub active: usize,
    pub view: usize,
    pub committed: usize,
}

impl ShoalSnapshotter {
    /// Opens (creating if needed) the snapshotter rooted at `root`, reclaims directories a crash
    /// left behind and mounts its remote layers again through `mounter`.
    pub fn open(
        root: &Path,
        mounter: Arc<dyn LayerMounter>,
    ) -> Result<ShoalSnapshotter, SnapshotError> {
        let layout = Layout::detect(root);
        // Only root may enter: the snapshots are the images' trees, as containerd's overlayfs
        // snapshotter keeps them (0700); mounts made from them are unaffected.
        for dir in [root, layout.snapshots_dir()] {
            let narrowed =
                shoal_fetcher::private::dir(dir).map_err(|source| SnapshotError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
            if let Some(had) = narrowed {
                info!(dir = %dir.display(), was = format!("{had:o}"), "narrowed to 0700");
            }
        }
        let store = Store::open(&root.join("metadata.db"))?;
        let snapshotter = ShoalSnapshotter {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                store,
                layout,
                mounter,
                lazy: LazyStats::default(),
                unmounted: remount::Unmounted::default(),
                repair: tokio::sync::Mutex::new(()),
            }),
        };
        // Snapshots a crash left between reserve and commit: their directories become orphans,
        // unmounted and removed by the cleanup below.
        let abandoned = snapshotter.inner.store.abandon_all_pending()?;
        if !abandoned.is_empty() {
            info!(
                snapshots = abandoned.len(),
                "dropped snapshots an earlier crash left half made"
            );
        }
        let reclaimed = snapshotter.inner.cleanup()?;
        if reclaimed > 0 {
            info!(
                reclaimed,
                "removed directories orphaned by an earlier crash"
            );
        }
        snapshotter.inner.remount_all()?;
        Ok(snapshotter)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blobs lazily mounted layers serve right now, every format's.
    pub fn mounted_blobs(&self) -> Vec<crate::MountedBlob> {
        self.inner.mounter.mounted_blobs()
    }

    /// Remote layers mounted right now, every format's.
    pub fn mounted_layers(&self) -> usize {
        self.inner.mounter.mounted_layers()
    }

    /// What keeping lazy mounts across restarts did for this daemon.
    pub fn handover(&self) -> crate::lazy_mounter::HandoverReport {
        self.inner.mounter.handover()
    }

    /// Lazy mounts made and fallbacks by reason, since start.
    pub fn lazy_stats(&self) -> &LazyStats {
        &self.inner.lazy
    }

    pub fn counts(&self) -> Result<SnapshotCounts, SnapshotError> {
        let mut counts = SnapshotCounts::default();
        for entry in self.inner.store.list()? {
            match entry.record.kind {
                Kind::Active => counts.active += 1,
                Kind::View => counts.view += 1,
                Kind::Committed => counts.committed += 1,
            }
        }
        Ok(counts)
    }

    async fn blocking<T, F>(&self, operation: &'static str, f: F) -> Result<T, SnapshotError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SnapshotError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|err| SnapshotError::Task {
                operation,
                reason: err.to_string(),
            })?
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate_key(&key)?;
        let mut labels = validate_labels(labels)?;
        if kind == Kind::Active {
            let fallback = match LayerLabels::parse(&labels) {
                Ok(Some(layer)) => match self.try_remote(&key, &parent, &labels, layer).await {
                    Ok(answer) => return Err(answer),
                    Err(fallback) => Some(fallback),
                },
                Ok(None) => {
                    let _logged = self.inner.lazy.unlabelled.prepared(&key, &parent);
                    None
                }
                Err(fallback) => {
                    self.inner.lazy.fell_back(&key, &fallback);
                    Some(fallback)
                }
            };
            if let Some(fallback) = fallback {
                labels.insert(LABEL_FALLBACK.to_owned(), fallback_label(&fallback));
            }
        }
        // Never an overlay with a layer's files missing: an unmounted one is mounted first.
        self.ensure_stack_mounted(&parent).await?;
        self.blocking("create", move |inner| {
            let record = inner.create(&key, &parent, kind, labels, None)?;
            inner.mounts_of(&record)
        })
        .await
    }
}

impl Inner {
    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<&ResolvedLayer>,
    ) -> Result<Record, SnapshotError> {
        let mut made = None;
        let layer = remote.map(|r| r.layer.clone());
        let result = self
            .store
            .create(key, parent, kind, labels, layer, |id, parent_id| {
                made = Some(id);
                match remote {
                    None => self.make_dir(id, kind, parent_id),
                    Some(resolved) => self.make_remote_dir(id, resolved),
                }
            });
        if let (Err(_), Some(id)) = (&result, made) {
            // The transaction did not commit: the directory belongs to nobody.
            if remote.is_some() {
                let _ = self.mounter.unmount(&self.layout.upper(id));
            }
            let _ = std::fs::remove_dir_all(self.layout.dir(id));
        }
        result
    }

    /// Lays out `snapshots/<id>` in a temporary directory and renames it into place, so a
    /// crash never leaves a half-made snapshot directory under a live id.
    fn make_dir(&self, id: u64, kind: Kind, parent: Option<u64>) -> Result<(), SnapshotError> {
        let create = |path: &Path, mode: u32| {
            std::fs::create_dir(path)
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|source| SnapshotError::CreateDir {
                    path: path.to_owned(),
                    source,
                })
        };
        let tmp = self.layout.snapshots_dir().join(format!("new-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        create(&tmp, 0o700)?;
        let fs = tmp.join("fs");
        create(&fs, 0o755)?;
        if kind == Kind::Active {
            create(&tmp.join("work"), 0o711)?;
        }
        if let Some(parent) = parent {
            // A child starts owned like its parent's root, as containerd's overlay snapshotter
            // does, so that a chowned image root stays chowned in containers.
            let upper = self.layout.upper(parent);
            let meta = std::fs::metadata(&upper).map_err(|source| SnapshotError::CreateDir {
                path: upper.clone(),
                source,
            })?;
            std::os::unix::fs::lchown(&fs, Some(meta.uid()), Some(meta.gid())).map_err(
                |source| SnapshotError::CreateDir {
                    path: fs.clone(),
                    source,
                },
            )?;
        }
        let dir = self.layout.dir(id);
        std::fs::rename(&tmp, &dir).map_err(|source| SnapshotError::CreateDir { path: dir, source })
    }

    fn mounts_of(&self, record: &Record) -> Result<Vec<Mount>, SnapshotError> {
        let parents = self.overlay_parents(record)?;
        Ok(self.layout.mounts(record.kind, record.id, &parents))
    }

    /// Removes every directory under `snapshots/` that no record names. Returns how many.
    fn cleanup(&self) -> Result<usize, SnapshotError> {
        let dir = self.layout.snapshots_dir().to_owned();
        self.store.with_live_ids(|live| {
            let entries = std::fs::read_dir(&dir).map_err(|source| SnapshotError::RemoveDir {
                path: dir.clone(),
                source,
            })?;
            let mut removed = 0;
            for entry in entries.flatten() {
                let name = entry.file_name();
                // `new-<id>` is the directory of a create in flight, laid out before its rename.
                let live_id = name
                    .to_str()
                    .map(|n| n.strip_prefix("new-").unwrap_or(n))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| live.contains(&id));
                if live_id {
                    continue;
                }
                let path = entry.path();
                // An orphan may still carry a (dead) FUSE mount from before a crash.
                self.mounter.unmount(&path.join("fs"))?;
                std::fs::remove_dir_all(&path)
                    .map_err(|source| SnapshotError::RemoveDir { path, source })?;
                removed += 1;
            }
            Ok(removed)
        })?
    }
}

impl Fields for Entry {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [field] if field == "name" => Some(self.key.clone()),
            [field] if field == "parent" => Some(self.record.parent.clone()),
            [field] if field == "kind" => Some(self.record.kind.as_str().to_string()),
            [field, rest @ ..] if field == "labels" && !rest.is_empty() => {
                self.record.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

fn info_of(key: String, record: Record) -> Info {
    Info {
        kind: match record.kind {
            Kind::Active => ApiKind::Active,
            Kind::View => ApiKind::View,
            Kind::Committed => ApiKind::Committed,
        },
        name: key,
        parent: record.parent,
        labels: record.labels.into_iter().collect(),
        created_at: record.created,
        updated_at: record.updated,
    }
}

fn validate_key(key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidKey {
            reason: "key must not be empty",
        });
    }
    Ok(())
}

fn validate_labels(
    labels: HashMap<String, String>,
) -> Result<BTreeMap<String, String>, SnapshotError> {
    let mut out = BTreeMap::new();
    for (key, value) in labels {
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(SnapshotError::InvalidLabel {
                label: key.chars().take(64).collect(),
                reason: format!(
                    "key and value are {} bytes, more than {MAX_LABEL_BYTES}",
                    key.len() + value.len()
                ),
            });
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// [`LABEL_FALLBACK`]'s value: `<kind>: <reason>`, cut to fit containerd's label limit.
fn fallback_label(fallback: &Fallback) -> String {
    let mut value = format!("{}: {fallback}", fallback.kind());
    let room = MAX_LABEL_BYTES - LABEL_FALLBACK.len();
    if value.len() > room {
        let mut end = room;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// containerd's `UpdateInfo`: only labels change; no paths means "replace all labels", a
/// `labels.<key>` path sets (or, with an empty value, deletes) one label.
fn apply_update(
    record: &mut Record,
    key: &str,
    labels: BTreeMap<String, String>,
    paths: &[String],
) -> Result<(), SnapshotError> {
    if paths.is_empty() {
        record.labels = labels;
        return Ok(());
    }
    for path in paths {
        if let Some(label) = path.strip_prefix("labels.") {
            match labels.get(label).filter(|v| !v.is_empty()) {
                Some(value) => record.labels.insert(label.to_string(), value.clone()),
                None => record.labels.remove(label),
            };
        } else if path == "labels" {
            record.labels = labels.clone();
        } else {
            return Err(SnapshotError::InvalidUpdateField {
                key: key.into(),
                field: path.clone(),
            });
        }
    }
    Ok(())
}

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for ShoalSnapshotter {
    type Error = SnapshotError;
    type InfoStream = BoxStream<'static, Result<Info, SnapshotError>>;

    async fn stat(&self, key: String) -> Result<Info, SnapshotError> {
        self.blocking("stat", move |inner| {
            let record = inner.store.get(&key)?;
            Ok(info_of(key, record))
        })
        .await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, SnapshotError> {
        let labels = validate_labels(info.labels)?;
        let key = info.name;
        let paths = fieldpaths.unwrap_or_default();
        self.blocking("update", move |inner| {
            let record = inner
                .store
                .update(&key, |record| apply_update(record, &key, labels, &paths))?;
            Ok(info_of(key, record))
        })
        .await
    }

    async fn usage(&self, key: String) -> Result<Usage, SnapshotError> {
        self.blocking("usage", move |inner| {
            let record = inner.store.get(&key)?;
            let mut measured = match record.kind {
                Kind::Active => usage::measure(&inner.layout.upper(record.id))?,
                Kind::View | Kind::Committed => record.usage,
            };
            // A lazily mounted layer takes no space in its directory, but its cached blocks
            // do: kubelet's image disk accounting should see them.
            if let Some(remote) = &record.remote {
                let cached = inner.mounter.cached_bytes(&remote.digest);
                measured.size = measured
                    .size
                    .saturating_add(i64::try_from(cached).unwrap_or(i64::MAX));
            }
            Ok(Usage {
                size: measured.size,
                inodes: measured.inodes,
            })
        })
        .await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, SnapshotError> {
        let parent = {
            let key = key.clone();
            self.blocking("stat", move |inner| Ok(inner.store.get(&key)?.parent))
                .await?
        };
        self.ensure_stack_mounted(&parent).await?;
        self.blocking("mounts", move |inner| {
            let record = inner.store.get(&key)?;
            if record.kind == Kind::Committed {
                return Err(SnapshotError::NoMounts { key });
            }
            inner.mounts_of(&record)
        })
        .await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        validate_key(&name)?;
        let labels = validate_labels(labels)?;
        self.blocking("commit", move |inner| {
            let active = inner.store.get(&key)?;
            if active.kind != Kind::Active {
                return Err(SnapshotError::NotActive {
                    key,
                    kind: active.kind.as_str(),
                });
            }
            let measured = usage::measure(&inner.layout.upper(active.id))?;
            inner.store.commit(&key, &name, labels, measured)?;
            // The work directory is overlayfs scratch space; a committed layer needs none.
            let _ = std::fs::remove_dir_all(inner.layout.work(active.id));
            Ok(())
        })
        .await
    }

    async fn remove(&self, key: String) -> Result<(), SnapshotError> {
        self.blocking("remove", move |inner| {
            let record = inner.store.remove(&key)?;
            inner.unmounted.remove(&key);
            if let Some(remote) = &record.remote {
                inner.mounter.unmount(&inner.layout.upper(record.id))?;
                // Another image's snapshot of the same blob keeps its cached bytes.
                let shared = inner.store.list()?.iter().any(|entry| {
                    entry
                        .record
                        .remote
                        .as_ref()
                        .is_some_and(|other| other.digest == remote.digest)
                });
                if !shared {
                    inner.mounter.release_cached(&remote.digest);
                }
            }
            let dir = inner.layout.dir(record.id);
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                // The record is gone; Cleanup reclaims the directory later.
                warn!(key, dir = %dir.display(), error = %err, "could not remove snapshot directory");
            }
            Ok(())
        })
        .await
    }

    async fn clear(&self) -> Result<(), SnapshotError> {
        let removed = self.blocking("cleanup", |inner| inner.cleanup()).await?;
        info!(removed, "cleanup removed orphaned snapshot directories");
        Ok(())
    }

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, SnapshotError> {
        let filter = Filter::parse_all(&filters)?;
        let entries = self.blocking("list", |inner| inner.store.list()).await?;
        let infos: Vec<Result<Info, SnapshotError>> = entries
            .into_iter()
            .filter(|entry| filter.matches(entry))
            .map(|entry| Ok(info_of(entry.key, entry.record)))
            .collect();
        Ok(Box::pin(stream::iter(infos)))
    }
}

#[cfg(test)]
mod tests;
