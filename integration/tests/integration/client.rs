//! A blocking client of the containerd Snapshots gRPC API over a unix socket, as containerd's
//! proxy plugin speaks it.

// Calls return tonic's `Status` unboxed: tests match on its code, and it is what tonic returns.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest, UpdateSnapshotRequest, UsageRequest, ViewSnapshotRequest,
};
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::{Code, Request, Status};
use futures::StreamExt;

/// The proxy plugin name containerd puts in every request.
const SNAPSHOTTER: &str = "shoal";

pub type Labels = HashMap<String, String>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// One connection with its own small runtime, so tests stay synchronous. A worker thread keeps
/// the connection serviced between calls (pings, GOAWAY on the daemon's shutdown), as a real
/// client's would be.
pub struct Snapshots {
    runtime: tokio::runtime::Runtime,
    inner: SnapshotsClient<Channel>,
}

impl Snapshots {
    pub fn connect(socket: &Path) -> Result<Snapshots> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("build the client's runtime")?;
        Snapshots::connect_on(runtime, socket)
    }

    /// A client whose connection is serviced only during its own calls, like a client process
    /// that hangs between calls: it never answers the daemon's pings or GOAWAY in between.
    pub fn connect_hung(socket: &Path) -> Result<Snapshots> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build the client's runtime")?;
        Snapshots::connect_on(runtime, socket)
    }

    fn connect_on(runtime: tokio::runtime::Runtime, socket: &Path) -> Result<Snapshots> {
        let path: PathBuf = socket.to_owned();
        let channel = runtime
            .block_on(async move {
                // The URI is required by the API but unused: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        tokio::net::UnixStream::connect(path.clone())
                    }))
                    .await
            })
            .with_context(|| format!("connect to {}", socket.display()))?;
        Ok(Snapshots {
            runtime,
            inner: SnapshotsClient::new(channel),
        })
    }

    pub fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.prepare_labeled(key, parent, Labels::new())
    }

    pub fn prepare_labeled(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let request = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        };
        let mut client = self.inner.clone();
        let reply = self
            .runtime
            .block_on(client.prepare(Request::new(request)))?;
        Ok(reply.into_inner().mounts)
    }

    pub fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.view_labeled(key, parent, Labels::new())
    }

    pub fn view_labeled(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let request = ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        };
        let mut client = self.inner.clone();
        let reply = self.runtime.block_on(client.view(Request::new(request)))?;
        Ok(reply.into_inner().mounts)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let request = MountsRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        let mut client = self.inner.clone();
        let reply = self
            .runtime
            .block_on(client.mounts(Request::new(request)))?;
        Ok(reply.into_inner().mounts)
    }

    pub fn commit(&self, name: &str, key: &str) -> Result<(), Status> {
        self.commit_labeled(name, key, Labels::new())
    }

    pub fn commit_labeled(&self, name: &str, key: &str, labels: Labels) -> Result<(), Status> {
        let request = CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels,
        };
        let mut client = self.inner.clone();
        self.runtime
            .block_on(client.commit(Request::new(request)))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), Status> {
        let request = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        let mut client = self.inner.clone();
        self.runtime
            .block_on(client.remove(Request::new(request)))?;
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info, Status> {
        let request = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        let mut client = self.inner.clone();
        let reply = self.runtime.block_on(client.stat(Request::new(request)))?;
        reply
            .into_inner()
            .info
            .ok_or_else(|| Status::internal("stat reply without info"))
    }

    /// Updates `info`; `paths` is the field mask (empty: every mutable field).
    pub fn update(&self, info: Info, paths: &[&str]) -> Result<Info, Status> {
        let update_mask = (!paths.is_empty()).then(|| prost_types::FieldMask {
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        });
        let request = UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            info: Some(info),
            update_mask,
        };
        let mut client = self.inner.clone();
        let reply = self
            .runtime
            .block_on(client.update(Request::new(request)))?;
        reply
            .into_inner()
            .info
            .ok_or_else(|| Status::internal("update reply without info"))
    }

    /// Every snapshot matching any of `filters`, gathered from the whole stream.
    pub fn list(&self, filters: &[&str]) -> Result<Vec<Info>, Status> {
        let request = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            filters: filters.iter().map(|filter| (*filter).to_owned()).collect(),
        };
        let mut client = self.inner.clone();
        self.runtime.block_on(async move {
            let mut stream = client.list(Request::new(request)).await?.into_inner();
            let mut found = Vec::new();
            while let Some(batch) = stream.next().await {
                found.extend(batch?.info);
            }
            Ok(found)
        })
    }

    /// Opens a List stream and hands out its snapshots one by one, so other calls can be made
    /// while the stream is still open.
    pub fn list_stream(&self, filters: &[&str]) -> Result<ListStream<'_>, Status> {
        let request = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            filters: filters.iter().map(|filter| (*filter).to_owned()).collect(),
        };
        let mut client = self.inner.clone();
        let stream = self
            .runtime
            .block_on(client.list(Request::new(request)))?
            .into_inner();
        Ok(ListStream {
            runtime: &self.runtime,
            stream,
            pending: Vec::new(),
        })
    }

    /// Names of the snapshots matching any of `filters`, sorted.
    pub fn list_names(&self, filters: &[&str]) -> Result<Vec<String>, Status> {
        let mut names: Vec<String> = self
            .list(filters)?
            .into_iter()
            .map(|info| info.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// `(size in bytes, inodes)` of one snapshot.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let request = UsageRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        let mut client = self.inner.clone();
        let reply = self.runtime.block_on(client.usage(Request::new(request)))?;
        let usage = reply.into_inner();
        Ok((usage.size, usage.inodes))
    }
}

/// Fails unless `result` is an error with status `code`.
/// A List stream in progress; see [`Snapshots::list_stream`].
pub struct ListStream<'a> {
    runtime: &'a tokio::runtime::Runtime,
    stream: containerd_snapshots::tonic::Streaming<ListSnapshotsResponse>,
    pending: Vec<Info>,
}

impl ListStream<'_> {
    /// The next snapshot, `None` at the end of the stream.
    pub fn next_info(&mut self) -> Result<Option<Info>, Status> {
        // Bounded by the stream: every round either yields an item or consumes a batch.
        loop {
            if let Some(info) = self.pending.pop() {
                return Ok(Some(info));
            }
            match self.runtime.block_on(self.stream.next()) {
                Some(batch) => {
                    let mut infos = batch?.info;
                    infos.reverse();
                    self.pending = infos;
                }
                None => return Ok(None),
            }
        }
    }
}

pub fn expect_code<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Status>,
    code: Code,
) -> Result<()> {
    match result {
        Ok(value) => anyhow::bail!("{what}: expected {code:?}, got success {value:?}"),
        Err(status) if status.code() == code => Ok(()),
        Err(status) => anyhow::bail!(
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

pub fn kind(info: &Info) -> Kind {
    Kind::from_i32(info.kind).unwrap_or(Kind::Unknown)
}
