//! `shoal status`: is the daemon answering, what does it hold, how much disk does it use.

use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use shoal_snapshotter::api::snapshots::v1::{ListSnapshotsRequest, UsageRequest};

use crate::client;

/// What `shoal status` reports.
#[derive(Debug, Default, serde::Serialize)]
pub struct Status {
    pub socket: String,
    pub reachable: bool,
    pub snapshots: usize,
    pub committed: usize,
    pub active: usize,
    pub view: usize,
    /// Sum of every snapshot's own usage, in bytes.
    pub disk_bytes: i64,
    pub inodes: i64,
    pub error: Option<String>,
}

pub async fn gather(socket: &Path) -> Status {
    let mut status = Status {
        socket: socket.display().to_string(),
        ..Status::default()
    };
    if let Err(err) = fill(socket, &mut status).await {
        status.error = Some(format!("{err:#}"));
    }
    status
}

async fn fill(socket: &Path, status: &mut Status) -> anyhow::Result<()> {
    let mut client = client::connect(socket).await?;
    let mut stream = client
        .list(ListSnapshotsRequest::default())
        .await
        .context("list snapshots")?
        .into_inner();
    status.reachable = true;
    let mut keys = Vec::new();
    while let Some(page) = stream.next().await {
        for info in page.context("list snapshots")?.info {
            match info.kind {
                // containerd.services.snapshots.v1.Kind: 1 view, 2 active, 3 committed.
                1 => status.view += 1,
                2 => status.active += 1,
                3 => status.committed += 1,
                _ => {}
            }
            keys.push(info.name);
        }
    }
    status.snapshots = keys.len();
    for key in keys {
        // A snapshot removed between List and Usage is simply not counted.
        if let Ok(usage) = client
            .usage(UsageRequest {
                snapshotter: String::new(),
                key,
            })
            .await
        {
            let usage = usage.into_inner();
            status.disk_bytes += usage.size;
            status.inodes += usage.inodes;
        }
    }
    Ok(())
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.reachable {
            writeln!(f, "daemon:     unreachable at {}", self.socket)?;
            if let Some(err) = &self.error {
                writeln!(f, "error:      {err}")?;
            }
            return Ok(());
        }
        writeln!(f, "daemon:     running at {}", self.socket)?;
        writeln!(
            f,
            "snapshots:  {} ({} committed, {} active, {} view)",
            self.snapshots, self.committed, self.active, self.view
        )?;
        writeln!(
            f,
            "disk use:   {} in {} inodes",
            shoal_config::ByteSize(self.disk_bytes.max(0) as u64),
            self.inodes
        )?;
        if let Some(err) = &self.error {
            writeln!(f, "warning:    {err}")?;
        }
        Ok(())
    }
}
