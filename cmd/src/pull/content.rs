//! containerd's content store: blobs written with their expected digest and size (containerd
//! verifies both on commit), labels set on what is already there.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{bail, Context};
use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, Info, InfoRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use containerd_client::tonic::{Code, Status, Streaming};
use shoal_fetcher::{BlobRef, Digest, RegistryClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::containerd::{Containerd, OrStatus, Scoped};
use super::labels::to_map;

/// Bytes per registry range request while copying a layer.
const FETCH_BYTES: u64 = 4 << 20;
/// Bytes per write message; containerd accepts up to 16 MiB per gRPC message.
const WRITE_BYTES: usize = 1 << 20;

/// What putting a blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The blob was written; this many bytes crossed the wire (less when an earlier,
    /// interrupted write was resumed).
    Written { bytes: u64 },
    /// containerd already had it; only its labels were updated.
    Present,
}

pub struct ContentStore {
    client: ContentClient<Scoped>,
}

impl ContentStore {
    pub fn new(containerd: &Containerd) -> ContentStore {
        ContentStore {
            client: containerd.content(),
        }
    }

    pub async fn exists(&mut self, digest: &Digest) -> anyhow::Result<bool> {
        let request = InfoRequest {
            digest: digest.to_string(),
        };
        match self.client.info(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(status).or_status(|| format!("stat content {digest}")),
        }
    }

    /// Sets `labels` on the blob, leaving its other labels alone.
    pub async fn set_labels(
        &mut self,
        digest: &Digest,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let request = UpdateRequest {
            info: Some(Info {
                digest: digest.to_string(),
                labels: to_map(labels),
                ..Info::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|key| format!("labels.{key}")).collect(),
            }),
        };
        self.client
            .update(request)
            .await
            .or_status(|| format!("label content {digest}"))?;
        Ok(())
    }

    /// Stores `bytes` as `digest` with `labels`, or labels the copy containerd already has.
    pub async fn put(
        &mut self,
        digest: &Digest,
        bytes: &[u8],
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<Stored> {
        if self.exists(digest).await? {
            self.set_labels(digest, labels).await?;
            return Ok(Stored::Present);
        }
        let size = bytes.len() as u64;
        let Some(mut ingest) = Ingest::open(&mut self.client, digest, size).await? else {
            return self.present(digest, labels).await;
        };
        let offset = ingest.offset;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        for chunk in bytes[start..].chunks(WRITE_BYTES) {
            ingest.write(chunk).await?;
        }
        match ingest.commit(&mut self.client, labels).await? {
            Stored::Present => self.present(digest, labels).await,
            Stored::Written { .. } => Ok(Stored::Written {
                bytes: size - offset.min(size),
            }),
        }
    }

    /// Copies `blob` from the registry in ranges, resuming an interrupted copy; containerd
    /// checks the digest on commit. `on_bytes` hears of every chunk received.
    pub async fn copy_from_registry(
        &mut self,
        registry: &RegistryClient,
        blob: &BlobRef,
        labels: &BTreeMap<String, String>,
        on_bytes: &dyn Fn(u64),
    ) -> anyhow::Result<Stored> {
        if self.exists(&blob.digest).await? {
            self.set_labels(&blob.digest, labels).await?;
            return Ok(Stored::Present);
        }
        let Some(mut ingest) = Ingest::open(&mut self.client, &blob.digest, blob.size).await?
        else {
            return self.present(&blob.digest, labels).await;
        };
        let offset = ingest.offset;
        let mut copied = 0;
        let mut start = offset;
        while start < blob.size {
            let range = start..(start + FETCH_BYTES).min(blob.size);
            let bytes = fetch(registry, blob, range.clone()).await?;
            for chunk in bytes.chunks(WRITE_BYTES) {
                ingest.write(chunk).await?;
            }
            copied += bytes.len() as u64;
            on_bytes(bytes.len() as u64);
            start = range.end;
        }
        match ingest.commit(&mut self.client, labels).await? {
            Stored::Present => self.present(&blob.digest, labels).await,
            written => Ok(written.with_bytes(copied)),
        }
    }

    /// Someone else committed the blob while we wrote it: label theirs.
    async fn present(
        &mut self,
        digest: &Digest,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<Stored> {
        self.set_labels(digest, labels).await?;
        Ok(Stored::Present)
    }
}

impl Stored {
    fn with_bytes(self, bytes: u64) -> Stored {
        match self {
            Stored::Written { .. } => Stored::Written { bytes },
            Stored::Present => Stored::Present,
        }
    }
}

async fn fetch(
    registry: &RegistryClient,
    blob: &BlobRef,
    range: Range<u64>,
) -> anyhow::Result<Bytes> {
    registry
        .get_blob_range(blob, range.clone())
        .await
        .with_context(|| {
            format!(
                "fetch bytes {}..{} of {}",
                range.start, range.end, blob.digest
            )
        })
}

/// One Write stream: STAT, then WRITEs at the current offset, then COMMIT, each answered by
/// containerd before the next is sent.
struct Ingest {
    requests: mpsc::Sender<WriteContentRequest>,
    responses: Streaming<WriteContentResponse>,
    reference: String,
    digest: Digest,
    size: u64,
    offset: u64,
}

impl Ingest {
    /// Opens (and locks) the ingest named after `digest`; an earlier interrupted one resumes
    /// at the offset containerd reports. `None`: containerd already has the blob.
    async fn open(
        client: &mut ContentClient<Scoped>,
        digest: &Digest,
        size: u64,
    ) -> anyhow::Result<Option<Ingest>> {
        let total = i64::try_from(size).context("blob size exceeds i64")?;
        let reference = format!("shoal-rpull-{digest}");
        let (requests, receiver) = mpsc::channel(2);
        // Queued before the call: containerd answers (and so completes the call) only after
        // it has read the first request.
        requests
            .send(WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                ..WriteContentRequest::default()
            })
            .await
            .context("queue content stat")?;
        let what = || format!("open content write of {digest}");
        let mut responses = match client.write(ReceiverStream::new(receiver)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(None),
            Err(status) => return Err(status).or_status(what),
        };
        let stat = match responses.message().await {
            Ok(Some(stat)) => stat,
            Ok(None) => bail!("{}: containerd closed the stream", what()),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(None),
            Err(status) => return Err(status).or_status(what),
        };
        // A stale ingest longer than the blob cannot be resumed; offset 0 truncates it.
        let offset = u64::try_from(stat.offset)
            .ok()
            .filter(|&offset| offset <= size)
            .unwrap_or(0);
        Ok(Some(Ingest {
            requests,
            responses,
            reference,
            digest: digest.clone(),
            size,
            offset,
        }))
    }

    async fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let expected = self.offset + data.len() as u64;
        if expected > self.size {
            bail!(
                "content {}: {expected} bytes written, the blob has {}",
                self.digest,
                self.size
            );
        }
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            offset: self.offset as i64,
            data: data.to_vec(),
            ..WriteContentRequest::default()
        };
        let response = self.exchange(request, "write").await?;
        if u64::try_from(response.offset).ok() != Some(expected) {
            bail!(
                "content write of {}: containerd is at offset {}, expected {expected}",
                self.digest,
                response.offset
            );
        }
        self.offset = expected;
        Ok(())
    }

    /// Commits with the expected size and digest; a mismatch aborts the ingest so the next
    /// attempt starts clean.
    async fn commit(
        mut self,
        client: &mut ContentClient<Scoped>,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<Stored> {
        let request = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            total: self.size as i64,
            expected: self.digest.to_string(),
            offset: self.offset as i64,
            labels: to_map(labels),
            ..WriteContentRequest::default()
        };
        match self.send(request).await {
            Ok(_) => Ok(Stored::Written { bytes: self.size }),
            Err(status) if status.code() == Code::AlreadyExists => Ok(Stored::Present),
            Err(status) => {
                drop(self.requests);
                let abort = AbortRequest {
                    r#ref: self.reference.clone(),
                };
                if let Err(abort_status) = client.abort(abort).await {
                    tracing::warn!(reference = self.reference, %abort_status, "abort ingest");
                }
                Err(status).or_status(|| format!("commit content {}", self.digest))
            }
        }
    }

    async fn exchange(
        &mut self,
        request: WriteContentRequest,
        action: &str,
    ) -> anyhow::Result<WriteContentResponse> {
        let digest = self.digest.clone();
        self.send(request)
            .await
            .or_status(|| format!("content {action} of {digest}"))
    }

    async fn send(&mut self, request: WriteContentRequest) -> Result<WriteContentResponse, Status> {
        if self.requests.send(request).await.is_err() {
            // The stream ended: its status says why.
            return match self.responses.message().await {
                Err(status) => Err(status),
                Ok(_) => Err(Status::aborted("containerd closed the write stream")),
            };
        }
        match self.responses.message().await? {
            Some(response) => Ok(response),
            None => Err(Status::aborted("containerd closed the write stream")),
        }
    }
}
