//! One layer into a snapshot, as containerd's unpacker does it: skip it if its chain is
//! already committed; Prepare with the remote-snapshot labels, and if the snapshotter answers
//! ALREADY_EXISTS it has mounted the layer remotely; otherwise fetch the blob, apply it with
//! the Diff service and commit the result under its chain ID.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use containerd_client::tonic::Code;
use containerd_client::types::{Descriptor as ApiDescriptor, Mount};
use shoal_fetcher::{BlobRef, Digest, ImageRef, RegistryClient};

use super::containerd::{Containerd, Lease, OrStatus, Scoped};
use super::content::{ContentStore, Stored};
use super::image::Descriptor;
use super::labels::{to_map, ChainId, UNCOMPRESSED};

/// containerd retries a Prepare that collided with a concurrent unpack this many times.
const PREPARE_ATTEMPTS: u32 = 3;

/// The label Shoal's snapshotter sets on a snapshot a Prepare fell back to: why.
const LABEL_FALLBACK: &str = "containerd.io/snapshot/shoal.fallback";

/// How a layer came to be in the snapshotter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its chain was committed before this pull.
    Present,
    /// The snapshotter mounted it remotely: nothing was downloaded.
    Lazy,
    /// Downloaded (`fetched` bytes; 0 when containerd had the blob) and applied; `fallback`
    /// is why the snapshotter did not mount it, as it said.
    Applied {
        fetched: u64,
        fallback: Option<String>,
    },
}

/// One layer to unpack.
pub struct Layer<'a> {
    pub descriptor: &'a Descriptor,
    pub diff_id: &'a Digest,
    pub chain: &'a ChainId,
    pub parent: Option<&'a ChainId>,
    /// The Prepare (and Commit) labels.
    pub labels: BTreeMap<String, String>,
}

/// Unpacks layers into `snapshotter` through containerd, inside `lease`.
pub struct Unpacker<'a> {
    pub containerd: &'a Containerd,
    pub lease: &'a Lease,
    pub snapshotter: &'a str,
    pub registry: &'a RegistryClient,
    /// Where the layer blobs live.
    pub repository: &'a ImageRef,
    /// Labels every fetched layer blob gets (its distribution source).
    pub blob_labels: &'a BTreeMap<String, String>,
}

impl Unpacker<'_> {
    pub async fn unpack(
        &self,
        layer: &Layer<'_>,
        on_bytes: &dyn Fn(u64),
    ) -> anyhow::Result<Outcome> {
        let mut snapshots = self.containerd.snapshots();
        if self.stat(&mut snapshots, layer.chain).await? {
            // Keep it from being collected before the image refers to it.
            self.containerd
                .add_to_lease(
                    self.lease,
                    &format!("snapshots/{}", self.snapshotter),
                    layer.chain.as_str(),
                )
                .await?;
            return Ok(Outcome::Present);
        }
        let mut prepared = None;
        for _ in 0..PREPARE_ATTEMPTS {
            let key = unpack_key(layer.chain);
            let request = PrepareSnapshotRequest {
                snapshotter: self.snapshotter.to_owned(),
                key: key.clone(),
                parent: layer.parent.map(ChainId::to_string).unwrap_or_default(),
                labels: to_map(&layer.labels),
            };
            match snapshots.prepare(request).await {
                Ok(response) => {
                    prepared = Some((key, response.into_inner().mounts));
                    break;
                }
                Err(status) if status.code() == Code::AlreadyExists => {
                    // A remote snapshotter commits the chain itself and says so this way; a
                    // concurrent unpack of the same key says so too, then we try a new key.
                    if self.stat(&mut snapshots, layer.chain).await? {
                        return Ok(Outcome::Lazy);
                    }
                    tracing::debug!(key, chain = %layer.chain, "prepare collided, retrying");
                }
                Err(status) => {
                    return Err(status).or_status(|| {
                        format!("prepare snapshot {key} in snapshotter {}", self.snapshotter)
                    })
                }
            }
        }
        let Some((key, mounts)) = prepared else {
            bail!(
                "prepare snapshot for {}: ALREADY_EXISTS {PREPARE_ATTEMPTS} times, yet the chain \
                 is not committed",
                layer.chain
            );
        };
        let fallback = self.fallback_reason(&mut snapshots, &key).await;
        match self
            .apply_and_commit(&mut snapshots, layer, &key, mounts, on_bytes)
            .await
        {
            Ok(fetched) => Ok(Outcome::Applied { fetched, fallback }),
            Err(err) => {
                self.remove(&mut snapshots, &key).await;
                Err(err)
            }
        }
    }

    async fn apply_and_commit(
        &self,
        snapshots: &mut SnapshotsClient<Scoped>,
        layer: &Layer<'_>,
        key: &str,
        mounts: Vec<Mount>,
        on_bytes: &dyn Fn(u64),
    ) -> anyhow::Result<u64> {
        let descriptor = layer.descriptor;
        let blob = BlobRef::new(
            self.repository.clone(),
            descriptor.digest.clone(),
            descriptor.size,
        );
        let mut content = ContentStore::new(self.containerd);
        let stored = content
            .copy_from_registry(self.registry, &blob, self.blob_labels, on_bytes)
            .await
            .with_context(|| format!("fetch layer {}", descriptor.digest))?;
        if stored == Stored::Present {
            self.containerd
                .add_to_lease(self.lease, "content", descriptor.digest.as_str())
                .await?;
        }
        let request = ApplyRequest {
            diff: Some(ApiDescriptor {
                media_type: descriptor.media_type.clone(),
                digest: descriptor.digest.to_string(),
                size: i64::try_from(descriptor.size).context("layer size exceeds i64")?,
                annotations: descriptor
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            mounts,
            payloads: HashMap::new(),
        };
        let applied = self
            .containerd
            .diff()
            .apply(request)
            .await
            .or_status(|| format!("apply layer {}", descriptor.digest))?
            .into_inner()
            .applied
            .with_context(|| {
                format!("apply layer {}: no descriptor returned", descriptor.digest)
            })?;
        if applied.digest != layer.diff_id.as_str() {
            bail!(
                "layer {} unpacked to {}, but the image config says {}",
                descriptor.digest,
                applied.digest,
                layer.diff_id
            );
        }
        let request = CommitSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            name: layer.chain.to_string(),
            key: key.to_owned(),
            labels: to_map(&layer.labels),
        };
        match snapshots.commit(request).await {
            Ok(_) => {}
            // Someone committed the same chain meanwhile: theirs serves as well as ours.
            Err(status) if status.code() == Code::AlreadyExists => {
                self.remove(snapshots, key).await;
            }
            Err(status) => {
                return Err(status).or_status(|| format!("commit snapshot {}", layer.chain));
            }
        }
        let uncompressed = BTreeMap::from([(UNCOMPRESSED.to_owned(), layer.diff_id.to_string())]);
        content
            .set_labels(&descriptor.digest, &uncompressed)
            .await?;
        Ok(match stored {
            Stored::Written { bytes } => bytes,
            Stored::Present => 0,
        })
    }

    /// Why the snapshotter made `key` an ordinary snapshot instead of mounting the layer, as
    /// it labelled it; `None` when it did not say (another snapshotter, or not asked).
    async fn fallback_reason(
        &self,
        snapshots: &mut SnapshotsClient<Scoped>,
        key: &str,
    ) -> Option<String> {
        let request = StatSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: key.to_owned(),
        };
        let info = snapshots.stat(request).await.ok()?.into_inner().info?;
        info.labels.get(LABEL_FALLBACK).cloned()
    }

    /// Whether `chain` is a snapshot of this snapshotter.
    async fn stat(
        &self,
        snapshots: &mut SnapshotsClient<Scoped>,
        chain: &ChainId,
    ) -> anyhow::Result<bool> {
        let request = StatSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: chain.to_string(),
        };
        match snapshots.stat(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(status)
                .or_status(|| format!("stat snapshot {chain} in snapshotter {}", self.snapshotter)),
        }
    }

    /// Best effort: a leftover active snapshot is harmless, and the lease expires anyway.
    async fn remove(&self, snapshots: &mut SnapshotsClient<Scoped>, key: &str) {
        let request = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.to_owned(),
            key: key.to_owned(),
        };
        if let Err(status) = snapshots.remove(request).await {
            tracing::warn!(
                key,
                message = status.message(),
                "remove extraction snapshot"
            );
        }
    }
}

/// containerd's extraction key format, `extract-<unique> <chainID>`, so that tools that
/// recognise unpack snapshots recognise these too.
fn unpack_key(chain: &ChainId) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .subsec_nanos();
    format!("extract-{nanos}-{} {chain}", std::process::id())
}
