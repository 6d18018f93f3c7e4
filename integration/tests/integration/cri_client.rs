//! A blocking client of the CRI services (the `k8s-cri` crate, tonic 0.14) on a unix socket,
//! for the tests that drive containerd's CRI plugin as kubelet does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use cri_tonic::transport::{Channel, Endpoint, Uri};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, FilesystemUsage, Image, ImageFsInfoRequest, ImageSpec, ImageStatusRequest,
    ListImagesRequest, PullImageRequest, RemoveImageRequest, VersionRequest,
};

use crate::fixture::wait_until;

const CRI_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A blocking client of the CRI image and runtime services on containerd's socket.
pub(crate) struct Cri {
    runtime: tokio::runtime::Runtime,
    images: ImageServiceClient<Channel>,
    runtime_service: RuntimeServiceClient<Channel>,
}

impl Cri {
    pub(crate) fn connect(socket: &Path) -> Result<Cri> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("build the CRI client's runtime")?;
        let channel = channel(&runtime, socket)?;
        Ok(Cri {
            runtime,
            images: ImageServiceClient::new(channel.clone()),
            runtime_service: RuntimeServiceClient::new(channel),
        })
    }

    /// This client with its image calls sent to `socket` instead, as kubelet's are with
    /// `--image-service-endpoint`.
    pub(crate) fn with_image_service(mut self, socket: &Path) -> Result<Cri> {
        self.images = ImageServiceClient::new(channel(&self.runtime, socket)?);
        Ok(self)
    }

    /// `PullImage` with `auth`, as kubelet sends a pod's pull secret; the image id.
    pub(crate) fn pull_with(&self, reference: &str, auth: Option<AuthConfig>) -> Result<String> {
        let request = PullImageRequest {
            image: Some(spec(reference)),
            auth,
            ..PullImageRequest::default()
        };
        let mut client = self.images.clone();
        let reply = self
            .runtime
            .block_on(client.pull_image(request))
            .with_context(|| format!("CRI PullImage {reference}"))?;
        Ok(reply.into_inner().image_ref)
    }

    /// `RemoveImage` of `image` (kubelet's image GC names the image by its id).
    pub(crate) fn remove(&self, image: &str) -> Result<()> {
        let request = RemoveImageRequest {
            image: Some(spec(image)),
        };
        let mut client = self.images.clone();
        self.runtime
            .block_on(client.remove_image(request))
            .with_context(|| format!("CRI RemoveImage {image}"))?;
        Ok(())
    }

    /// Waits until the CRI plugin answers (it initialises after containerd's socket is up).
    pub(crate) fn wait_ready(&self) -> Result<String> {
        let mut version = String::new();
        wait_until(
            "the CRI plugin to answer Version",
            CRI_READY_TIMEOUT,
            || {
                let mut client = self.runtime_service.clone();
                let reply = self
                    .runtime
                    .block_on(client.version(VersionRequest::default()))
                    .context("CRI Version")?
                    .into_inner();
                version = format!("{} {}", reply.runtime_name, reply.runtime_version);
                Ok(true)
            },
        )?;
        Ok(version)
    }

    /// `PullImage`; returns the image reference the runtime reports (its config digest).
    pub(crate) fn pull(&self, reference: &str) -> Result<String> {
        let request = PullImageRequest {
            image: Some(spec(reference)),
            ..PullImageRequest::default()
        };
        let mut client = self.images.clone();
        let reply = self
            .runtime
            .block_on(client.pull_image(request))
            .with_context(|| format!("CRI PullImage {reference}"))?;
        Ok(reply.into_inner().image_ref)
    }

    /// `ImageStatus`: the image, or `None` when the runtime does not have it.
    pub(crate) fn status(&self, reference: &str) -> Result<Option<Image>> {
        let request = ImageStatusRequest {
            image: Some(spec(reference)),
            verbose: false,
        };
        let mut client = self.images.clone();
        let reply = self
            .runtime
            .block_on(client.image_status(request))
            .with_context(|| format!("CRI ImageStatus {reference}"))?;
        Ok(reply.into_inner().image)
    }

    /// `ImageFsInfo`: the image filesystems kubelet's image GC and eviction read.
    pub(crate) fn image_fs_info(&self) -> Result<Vec<FilesystemUsage>> {
        let mut client = self.images.clone();
        let reply = self
            .runtime
            .block_on(client.image_fs_info(ImageFsInfoRequest::default()))
            .context("CRI ImageFsInfo")?;
        Ok(reply.into_inner().image_filesystems)
    }

    /// `ListImages` without a filter.
    pub(crate) fn list(&self) -> Result<Vec<Image>> {
        let mut client = self.images.clone();
        let reply = self
            .runtime
            .block_on(client.list_images(ListImagesRequest::default()))
            .context("CRI ListImages")?;
        Ok(reply.into_inner().images)
    }
}

/// A channel to the gRPC services on unix socket `socket`.
fn channel(runtime: &tokio::runtime::Runtime, socket: &Path) -> Result<Channel> {
    let path: PathBuf = socket.to_owned();
    runtime
        .block_on(async move {
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
        })
        .with_context(|| format!("connect to the CRI services at {}", socket.display()))
}

fn spec(reference: &str) -> ImageSpec {
    ImageSpec {
        image: reference.to_owned(),
        ..ImageSpec::default()
    }
}
