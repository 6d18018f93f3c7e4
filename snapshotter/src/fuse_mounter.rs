//! The daemon's [`LayerMounter`]: finds a layer in its image's manifest, opens it as eStargz
//! (footer and TOC through the chunk cache, TOC digest checked against the annotation) and
//! serves it over FUSE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use shoal_formats::estargz::{TocDigest, TOC_DIGEST_ANNOTATION};
use shoal_fuse::layer::{self, ChunkReader, EstargzLayer, MountedLayer, Prefetch};
use shoal_fuse::FsError;
use tokio::runtime::Handle;

use crate::error::SnapshotError;
use crate::manifest::chain_of;
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, RemoteLayer, ResolvedLayer};

/// Mounts eStargz layers over FUSE.
pub struct FuseMounter {
    fetcher: Fetcher,
    reader: Arc<ChunkReader>,
    runtime: Handle,
    prefetch: Prefetch,
    /// Layers opened by `resolve`, waiting for `mount`, so the TOC is parsed once.
    opened: Mutex<HashMap<String, EstargzLayer>>,
    mounted: Mutex<HashMap<PathBuf, (MountedLayer, Digest)>>,
}

impl FuseMounter {
    pub fn new(
        fetcher: Fetcher,
        reader: Arc<ChunkReader>,
        runtime: Handle,
        prefetch: Prefetch,
    ) -> FuseMounter {
        FuseMounter {
            fetcher,
            reader,
            runtime,
            prefetch,
            opened: Mutex::new(HashMap::new()),
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// Finds the layer's size in its manifest, then reads and verifies its footer and TOC.
    async fn open(
        &self,
        labels: &LayerLabels,
        toc: String,
        expected: TocDigest,
    ) -> Result<ResolvedLayer, Fallback> {
        let image =
            ImageRef::parse(&labels.image_ref).map_err(|e| Fallback::Registry(e.to_string()))?;
        let chain = chain_of(&self.fetcher, &image, labels).await?;
        let descriptor = chain.last().ok_or(Fallback::MissingLabels)?;
        let remote = RemoteLayer {
            format: LayerFormat::Estargz,
            image_ref: labels.image_ref.clone(),
            digest: labels.layer_digest.clone(),
            size: descriptor.size,
            index_digest: toc,
        };
        let blob = blob_of(&remote).map_err(Fallback::Registry)?;
        let opened = EstargzLayer::open(&self.fetcher, blob, expected)
            .await
            .map_err(fallback_of)?;
        let index = opened.persisted.clone();
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(remote.digest.clone(), opened);
        Ok(ResolvedLayer {
            layer: remote,
            index,
        })
    }
}

/// A stopping daemon detaches its layers rather than unmounting them: a running container's
/// overlay keeps a layer busy, and waiting for it would hang the shutdown. The next daemon
/// mounts the layers afresh from their persisted indexes.
impl Drop for FuseMounter {
    fn drop(&mut self) {
        let mounted = std::mem::take(self.mounted.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (mountpoint, (mut layer, _digest)) in mounted {
            if let Err(err) = layer.detach() {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %err, "could not detach layer");
            }
            // Its session thread serves whoever still holds the layer until the process exits.
            std::thread::spawn(move || drop(layer));
        }
    }
}

fn fallback_of(err: FsError) -> Fallback {
    match err {
        FsError::FetchIndex { .. } => Fallback::Registry(with_causes(&err)),
        FsError::TocDigestMismatch { .. } => Fallback::IndexDigestMismatch,
        FsError::ParseToc { .. } | FsError::BuildIndex { .. } => {
            Fallback::RefusedIndex(err.to_string())
        }
        other => Fallback::NotLazyFormat(other.to_string()),
    }
}

/// `err`'s message followed by its causes', as a fallback label shows them.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

fn blob_of(layer: &RemoteLayer) -> Result<BlobRef, String> {
    let image = ImageRef::parse(&layer.image_ref).map_err(|e| e.to_string())?;
    let digest = Digest::parse(&layer.digest).map_err(|e| e.to_string())?;
    Ok(BlobRef::new(image, digest, layer.size))
}

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for FuseMounter {
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        // containerd hands a layer's `containerd.io/snapshot/*` annotations to Prepare as labels
        // (rpull and CRI alike), so a layer without the TOC digest label is not eStargz, or is
        // one whose TOC cannot be verified: either way it is downloaded, without asking the
        // registry anything first.
        let Some(toc) = labels.toc_digest.clone() else {
            return Err(Fallback::NotLazyFormat(format!(
                "the layer has no {TOC_DIGEST_ANNOTATION} annotation"
            )));
        };
        let expected: TocDigest = toc.parse().map_err(|_| Fallback::UnverifiableIndex)?;
        self.open(labels, toc, expected).await
    }

    fn mount(&self, resolved: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |reason: String| SnapshotError::MountLayer {
            mountpoint: mountpoint.to_owned(),
            reason,
        };
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&resolved.layer.digest)
            .filter(|l| l.persisted == resolved.index);
        let layer = match opened {
            Some(layer) => layer,
            None => {
                // A restart: the persisted TOC is verified again before it is trusted.
                let blob = blob_of(&resolved.layer).map_err(fail)?;
                let expected: TocDigest = resolved
                    .layer
                    .index_digest
                    .parse()
                    .map_err(|_| fail("bad TOC digest in metadata".into()))?;
                EstargzLayer::from_persisted(blob, &resolved.index, expected)
                    .map_err(|e| fail(e.to_string()))?
            }
        };
        let digest = layer.blob.digest.clone();
        self.fetcher.cache().pin(&digest);
        let mounted = layer::mount(
            layer,
            self.reader.clone(),
            self.runtime.clone(),
            mountpoint,
            self.prefetch,
        )
        .map_err(|e| {
            self.fetcher.cache().unpin(&digest);
            fail(e.to_string())
        })?;
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mountpoint.to_owned(), (mounted, digest));
        Ok(())
    }

    fn cached_bytes(&self, digest: &str) -> u64 {
        Digest::parse(digest)
            .map(|digest| self.fetcher.cache().cached_bytes(&digest))
            .unwrap_or(0)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
        let session = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mountpoint);
        let Some((mut layer, digest)) = session else {
            // Not ours (a previous daemon's dead connection, say): detach whatever is there.
            if is_mountpoint(mountpoint) {
                nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                    |errno| SnapshotError::UnmountLayer {
                        mountpoint: mountpoint.to_owned(),
                        reason: errno.to_string(),
                    },
                )?;
            }
            return Ok(());
        };
        // Detach: an overlay still stacked on the layer keeps it alive until it goes.
        let detached = layer.detach().map_err(|err| SnapshotError::UnmountLayer {
            mountpoint: mountpoint.to_owned(),
            reason: err.to_string(),
        });
        self.fetcher.cache().unpin(&digest);
        if detached.is_ok() {
            tracing::info!(blob = %digest, mountpoint = %mountpoint.display(), "layer unmounted");
        }
        // The session thread ends once the kernel lets go; never wait for it here.
        std::thread::spawn(move || drop(layer));
        detached
    }
}

/// Whether `path` is a mount point, per this process's mount table.
fn is_mountpoint(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mount_path(mp) == wanted)
    })
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(code) = u8::from_str_radix(&text[i + 1..(i + 4).min(text.len())], 8) {
                out.push(code as char);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain/path"), "/plain/path");
    }

    #[test]
    fn root_is_a_mountpoint_and_a_fresh_dir_is_not() {
        assert!(is_mountpoint(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(dir.path()));
    }

    #[test]
    fn fallback_reasons_follow_the_failure() {
        let mismatch = FsError::PersistedIndex { reason: "x" };
        assert!(matches!(fallback_of(mismatch), Fallback::NotLazyFormat(_)));
        let cycle = FsError::BuildIndex {
            blob: "sha256:ab".into(),
            source: shoal_formats::estargz::IndexError::HardlinkToItself { path: "a".into() },
        };
        let fallback = fallback_of(cycle);
        assert_eq!(fallback.kind(), "refused_index");
        assert_eq!(
            fallback.to_string(),
            "TOC refused: build file index of sha256:ab: hardlink a points at itself"
        );
    }
}
