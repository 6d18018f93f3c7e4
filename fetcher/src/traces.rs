//! Learned-prefetch traces as this node keeps and finds them. A trace is opaque bytes here
//! (the format is `shoal_formats::trace`, parsed and judged by whoever uses it), kept under
//! `<root>/traces/`, one file per image manifest and layer blob, and found on this node or,
//! with `[peers]`, on another ([`crate::peer::Peers::trace`], served at
//! `GET /v1/traces/<image>/<blob>`).
//!
//! A trace never vouches for bytes: what it names is fetched and checked like any read.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::digest::Digest;
use crate::fetcher::Fetcher;
use crate::reference::BlobRef;
use crate::referrer::{PushedTraces, ReferrerError};

/// The largest trace kept, served or accepted from a peer (the format's own cap is below).
pub const MAX_TRACE_BYTES: usize = 5 << 20;

/// What failed keeping or finding a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceStoreError {
    #[error("read trace {}", path.display())]
    ReadTrace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {} is {len} bytes, over the {MAX_TRACE_BYTES}-byte limit", path.display())]
    TraceTooLarge { path: PathBuf, len: u64 },
    #[error("write trace {}", path.display())]
    WriteTrace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The traces kept on this node's disk.
#[derive(Debug)]
pub struct TraceStore {
    dir: PathBuf,
}

impl TraceStore {
    /// The store in `dir`, created (0700) when the first trace is kept.
    pub fn new(dir: PathBuf) -> TraceStore {
        TraceStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the trace of `blob` for `image` is kept.
    pub fn path(&self, image: &Digest, blob: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.trace", image.hex(), blob.hex()))
    }

    /// The kept trace of `blob` for `image`, if any.
    pub fn get(&self, image: &Digest, blob: &Digest) -> Result<Option<Bytes>, TraceStoreError> {
        let path = self.path(image, blob);
        let read = |source| TraceStoreError::ReadTrace {
            path: path.clone(),
            source,
        };
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(read(error)),
        };
        if len > MAX_TRACE_BYTES as u64 {
            return Err(TraceStoreError::TraceTooLarge { path, len });
        }
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(read(error)),
        }
    }

    /// Every trace kept for `image`, by layer blob digest (in blob order); files that are
    /// not a trace's are skipped.
    pub fn list(&self, image: &Digest) -> Result<Vec<(Digest, Bytes)>, TraceStoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(TraceStoreError::ReadTrace {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let prefix = format!("{}-", image.hex());
        let mut blobs = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let blob = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".trace"))
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
            blobs.extend(blob);
        }
        blobs.sort();
        let mut kept = Vec::new();
        for blob in blobs {
            if let Some(bytes) = self.get(image, &blob)? {
                kept.push((blob, bytes));
            }
        }
        Ok(kept)
    }

    /// Keeps `bytes` as the trace of `blob` for `image`: written whole to a temporary file,
    /// synced and renamed over any earlier one, so a crash leaves one or the other.
    pub fn put(&self, image: &Digest, blob: &Digest, bytes: &[u8]) -> Result<(), TraceStoreError> {
        let path = self.path(image, blob);
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(TraceStoreError::TraceTooLarge {
                path,
                len: bytes.len() as u64,
            });
        }
        let write = |source| TraceStoreError::WriteTrace {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(write)?;
        let fresh = path.with_extension("trace.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(write)?;
        file.write_all(bytes).map_err(write)?;
        file.sync_all().map_err(write)?;
        std::fs::rename(&fresh, &path).map_err(write)?;
        Ok(())
    }
}

/// A trace found for a layer, and where.
#[derive(Debug, Clone)]
pub struct FoundTrace {
    pub bytes: Bytes,
    pub origin: TraceOrigin,
}

/// Where a trace was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceOrigin {
    /// This node's own.
    Node,
    /// The peer (its address) that sent it.
    Peer(String),
    /// The trace artifact in the image's registry (`host/repository`).
    Registry(String),
}

impl TraceOrigin {
    /// Where, as logs and status say it.
    pub fn describe(&self) -> String {
        match self {
            TraceOrigin::Node => "this node".to_owned(),
            TraceOrigin::Peer(peer) => peer.clone(),
            TraceOrigin::Registry(repository) => format!("registry {repository}"),
        }
    }
}

/// Time a layer gives the registry to name and give its trace, lookup included.
pub const REGISTRY_TRACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the layers above find and keep traces, without seeing the [`Fetcher`].
pub trait TraceBook: Send + Sync {
    /// The trace of `blob` for `image`: this node's, else (with peers) one a peer holds.
    fn find<'a>(
        &'a self,
        image: &'a Digest,
        blob: &'a BlobRef,
    ) -> BoxFuture<'a, Result<Option<FoundTrace>, TraceStoreError>>;

    /// Keeps `bytes` as this node's trace of `blob` for `image` (served to peers from then).
    fn keep(&self, image: &Digest, blob: &Digest, bytes: &[u8]) -> Result<(), TraceStoreError>;

    /// With `fetch.learn_push`, pushes this node's traces of `image` (whose layer `blob` was
    /// just recorded) to its registry as its trace artifact; `None` when pushing is off.
    fn publish<'a>(
        &'a self,
        image: &'a Digest,
        blob: &'a BlobRef,
    ) -> BoxFuture<'a, Option<Result<PushedTraces, ReferrerError>>>;
}

impl TraceBook for Fetcher {
    fn find<'a>(
        &'a self,
        image: &'a Digest,
        blob: &'a BlobRef,
    ) -> BoxFuture<'a, Result<Option<FoundTrace>, TraceStoreError>> {
        Box::pin(async move {
            let store = self.traces().clone();
            let (i, b) = (image.clone(), blob.digest.clone());
            let local = tokio::task::spawn_blocking(move || store.get(&i, &b))
                .await
                .unwrap_or(Ok(None))?;
            if let Some(bytes) = local {
                return Ok(Some(FoundTrace {
                    bytes,
                    origin: TraceOrigin::Node,
                }));
            }
            if let Some(peers) = self.peers() {
                if let Some((peer, bytes)) = peers.trace(image, blob).await {
                    return Ok(Some(FoundTrace {
                        bytes,
                        origin: TraceOrigin::Peer(peer.to_string()),
                    }));
                }
            }
            Ok(self.registry_trace(image, blob).await)
        })
    }

    fn publish<'a>(
        &'a self,
        image: &'a Digest,
        blob: &'a BlobRef,
    ) -> BoxFuture<'a, Option<Result<PushedTraces, ReferrerError>>> {
        Box::pin(async move {
            if !self.learn_push() {
                return None;
            }
            Some(self.push_traces(&blob.image, image).await)
        })
    }

    fn keep(&self, image: &Digest, blob: &Digest, bytes: &[u8]) -> Result<(), TraceStoreError> {
        self.traces().put(image, blob, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_kept_trace_is_found_by_its_image_and_blob_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = TraceStore::new(dir.path().join("traces"));
        let (image, other, blob) = (Digest::of(b"i"), Digest::of(b"o"), Digest::of(b"b"));
        assert!(store.get(&image, &blob).unwrap().is_none());
        store.put(&image, &blob, b"one").unwrap();
        store.put(&image, &blob, b"two").unwrap();
        assert_eq!(store.get(&image, &blob).unwrap().unwrap(), &b"two"[..]);
        assert!(store.get(&other, &blob).unwrap().is_none());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&store.path(&image, &blob)), 0o600);
    }

    #[test]
    fn an_images_traces_are_listed_by_layer_and_no_other_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = TraceStore::new(dir.path().join("traces"));
        let (image, other) = (Digest::of(b"i"), Digest::of(b"o"));
        assert!(store.list(&image).unwrap().is_empty(), "no directory yet");
        let (b1, b2) = (Digest::of(b"b1"), Digest::of(b"b2"));
        store.put(&image, &b1, b"one").unwrap();
        store.put(&image, &b2, b"two").unwrap();
        store.put(&other, &b1, b"else").unwrap();
        std::fs::write(
            store.dir().join(format!("{}-junk.trace", image.hex())),
            b"x",
        )
        .unwrap();
        let mut want = vec![(b1, Bytes::from("one")), (b2, Bytes::from("two"))];
        want.sort();
        assert_eq!(store.list(&image).unwrap(), want);
    }

    #[test]
    fn an_oversized_trace_is_neither_kept_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = TraceStore::new(dir.path().to_owned());
        let (image, blob) = (Digest::of(b"i"), Digest::of(b"b"));
        let big = vec![0; MAX_TRACE_BYTES + 1];
        assert!(matches!(
            store.put(&image, &blob, &big),
            Err(TraceStoreError::TraceTooLarge { .. })
        ));
        std::fs::write(store.path(&image, &blob), &big).unwrap();
        assert!(matches!(
            store.get(&image, &blob),
            Err(TraceStoreError::TraceTooLarge { .. })
        ));
    }
}
