//! The ImageService kubelet talks to: every call forwarded to containerd's CRI plugin as it
//! came, `PullImage`'s credentials recorded for the image first, `RemoveImage`'s image
//! forgotten after.

use cri_tonic::transport::Channel;
use cri_tonic::{Request, Response, Status};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use shoal_fetcher::{image_key, ImageRef, PullSecrets};
use tracing::{debug, info, warn};

use super::auth::PullAuth;

pub struct ImageProxy {
    containerd: ImageServiceClient<Channel>,
    secrets: PullSecrets,
}

impl ImageProxy {
    pub fn new(containerd: ImageServiceClient<Channel>, secrets: PullSecrets) -> ImageProxy {
        ImageProxy {
            containerd,
            secrets,
        }
    }

    fn containerd(&self) -> ImageServiceClient<Channel> {
        self.containerd.clone()
    }

    /// Every reference containerd knows `spec`'s image by (its tags and digests), for
    /// forgetting them all: `RemoveImage` removes the image, however it was named, and kubelet
    /// names it by its id.
    async fn references_of(&self, spec: Option<&ImageSpec>) -> Vec<ImageRef> {
        let mut names: Vec<String> = spec.map(|s| s.image.clone()).into_iter().collect();
        let status = self
            .containerd()
            .image_status(ImageStatusRequest {
                image: spec.cloned(),
                verbose: false,
            })
            .await;
        match status {
            Ok(reply) => {
                if let Some(image) = reply.into_inner().image {
                    names.extend(image.repo_tags);
                    names.extend(image.repo_digests);
                }
            }
            Err(status) => debug!(
                code = ?status.code(),
                message = status.message(),
                "image status before removal failed"
            ),
        }
        // An id (`sha256:...`) is no reference: ImageStatus answered for it.
        names
            .iter()
            .filter_map(|name| ImageRef::parse(name).ok())
            .collect()
    }
}

#[cri_tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.containerd().list_images(request.into_inner()).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.containerd().image_status(request.into_inner()).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let pull = request.into_inner();
        let name = pull.image.as_ref().map_or("", |spec| spec.image.as_str());
        let image = ImageRef::parse(name).ok();
        // Recorded before containerd pulls: its Prepares reach the snapshotter during the
        // pull, and the lazy mount reads the image's manifest and TOC there and then.
        let auth = PullAuth::of(pull.auth.as_ref());
        let replaced = match (&image, auth) {
            (Some(image), PullAuth::Basic(credential)) => {
                Some(self.secrets.record(image, credential))
            }
            (Some(image), PullAuth::Unusable(why)) => {
                warn!(
                    image = %image_key(image),
                    why,
                    "pull credentials Shoal cannot use; lazy reads of the image use the \
                     node's own"
                );
                None
            }
            _ => None,
        };
        let pulled = self.containerd().pull_image(pull).await;
        let Some(image) = image else {
            return pulled;
        };
        match (&pulled, replaced) {
            (Err(_), Some(replaced)) => self.secrets.restore(replaced),
            (Err(_), None) => {}
            (Ok(_), Some(_)) => {
                info!(image = %image_key(&image), "pull secret recorded for lazy reads");
            }
            // The latest pull's credentials are the image's: one without usable ones withdraws what
            // an earlier pull recorded.
            (Ok(_), None) if self.secrets.forget(&image) => {
                info!(image = %image_key(&image), "pulled without credentials; pull secret forgotten");
            }
            (Ok(_), None) => {}
        }
        pulled
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let remove = request.into_inner();
        let references = self.references_of(remove.image.as_ref()).await;
        let removed = self.containerd().remove_image(remove).await?;
        for image in &references {
            if self.secrets.forget(image) {
                info!(image = %image_key(image), "image removed; pull secret forgotten");
            }
        }
        Ok(removed)
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.containerd().image_fs_info(request.into_inner()).await
    }
}
