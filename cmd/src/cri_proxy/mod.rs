//! The CRI image-service proxy (`[cri_proxy]`): kubelet's `--image-service-endpoint`.
//!
//! kubelet passes a pod's pull secrets to containerd in `PullImage`, and containerd keeps them:
//! the snapshotter's lazy reads of that image's layers would find no credentials. Pointed at
//! this socket, kubelet's image calls come here first; each is forwarded to containerd's CRI
//! plugin unchanged, and the credentials of every pull are recorded in the fetcher's
//! [`PullSecrets`] (memory only) for the image's repository, refreshed by every pull and
//! forgotten when the image is removed. This is what stargz-snapshotter's CRI keychain does.

mod auth;
mod service;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cri_tonic::transport::{Endpoint, Server, Uri};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use shoal_config::CriProxyConfig;
use shoal_fetcher::PullSecrets;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use service::ImageProxy;

/// kubelet's own limit on CRI messages (an image list of a busy node is large).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The proxy serving; ends with the daemon's stop.
pub struct CriProxy {
    listen: PathBuf,
    task: JoinHandle<Result<(), cri_tonic::transport::Error>>,
}

impl CriProxy {
    /// Binds `config.listen` and serves there until `stop` turns true. containerd is dialled
    /// on the first call, so the proxy may start before it.
    pub async fn start(
        config: &CriProxyConfig,
        secrets: PullSecrets,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<CriProxy> {
        let containerd = connect(&config.containerd)?;
        let listener = crate::listener::bind_private(&config.listen, "cri_proxy.listen").await?;
        secrets.fed_by(format!("the CRI proxy at {}", config.listen.display()));
        let proxy = ImageProxy::new(containerd, secrets);
        let service = ImageServiceServer::new(proxy)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let shutdown = async move {
            if stop.wait_for(|stopped| *stopped).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let task = tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown),
        );
        info!(
            listen = %config.listen.display(),
            containerd = %config.containerd.display(),
            "CRI image-service proxy serving"
        );
        Ok(CriProxy {
            listen: config.listen.clone(),
            task,
        })
    }

    /// Waits for the proxy to end (after the stop), at most `deadline` (then its calls in
    /// flight are cut), and removes its socket.
    pub async fn finish(mut self, deadline: Duration) -> anyhow::Result<()> {
        let served = match tokio::time::timeout(deadline, &mut self.task).await {
            Ok(served) => served.context("CRI proxy task")?,
            Err(_) => {
                warn!(
                    ?deadline,
                    "CRI proxy calls still running after the drain deadline; cut"
                );
                self.task.abort();
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&self.listen);
        served.context("serve the CRI image service")
    }
}

/// A client of containerd's CRI image service, connected on first use.
fn connect(socket: &Path) -> anyhow::Result<ImageServiceClient<cri_tonic::transport::Channel>> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://[::]:50051")
        .context("containerd endpoint")?
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }));
    Ok(ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
