//! `shoal node-setup ready`: the readiness of a node for Shoal, as kubelet's probe asks it.
//! True only when containerd lists the snapshotter (loaded, without an error) and the daemon
//! answers a Snapshots call at the socket containerd dials for it: a daemon that serves but is
//! not registered, or a registration whose daemon is gone, is not ready.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_snapshotter::api::snapshots::v1::ListSnapshotsRequest;

use crate::pull::containerd::Containerd;

/// Bound on each step, well inside a probe's timeout.
const STEP_TIMEOUT: Duration = Duration::from_secs(4);

/// Ok with a line to print when ready; an error saying what is missing otherwise.
pub async fn check(containerd: &Path, snapshotter: &str) -> anyhow::Result<String> {
    let connect = Containerd::connect(containerd, "default");
    let containerd_client = tokio::time::timeout(STEP_TIMEOUT, connect)
        .await
        .with_context(|| format!("containerd at {} did not answer", containerd.display()))??;
    let listed = containerd_client.ensure_snapshotter(snapshotter);
    let dialed = tokio::time::timeout(STEP_TIMEOUT, listed)
        .await
        .context("containerd did not list its snapshotters in time")??;
    let Some(dialed) = dialed else {
        bail!("containerd's snapshotter `{snapshotter}` is not a proxy plugin (no socket)");
    };
    let answered = async {
        let mut client = crate::client::connect(&dialed).await?;
        let request = ListSnapshotsRequest {
            snapshotter: snapshotter.to_owned(),
            filters: Vec::new(),
        };
        let mut stream = client
            .list(request)
            .await
            .context("list snapshots")?
            .into_inner();
        // The first message (or the stream's end) is the daemon's answer; the rest is not
        // needed to know it serves.
        stream.message().await.context("read the listing")?;
        anyhow::Ok(())
    };
    tokio::time::timeout(STEP_TIMEOUT, answered)
        .await
        .with_context(|| format!("the daemon at {} did not answer in time", dialed.display()))?
        .with_context(|| {
            format!(
                "containerd lists snapshotter `{snapshotter}` at {}, but the daemon does not answer there",
                dialed.display()
            )
        })?;
    Ok(format!(
        "ready: containerd lists snapshotter `{snapshotter}` and the daemon answers at {}",
        dialed.display()
    ))
}
