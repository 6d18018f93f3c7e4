//! A Snapshots API client over the daemon's unix socket.

use std::path::{Path, PathBuf};

use anyhow::Context;
use shoal_snapshotter::api::snapshots::v1::snapshots_client::SnapshotsClient;
use shoal_snapshotter::tonic::transport::{Channel, Endpoint, Uri};

pub type Client = SnapshotsClient<Channel>;

pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let path: PathBuf = socket.to_owned();
    // The URI is required by tonic but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .with_context(|| format!("connect to shoal-snapshotter at {}", socket.display()))?;
    Ok(SnapshotsClient::new(channel))
}
