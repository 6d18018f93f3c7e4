//! Pull access, as the peer network needs it for private repositories: whether this node's
//! reads of a repository needed a configured credential, the `Authorization` it reads with
//! (a peer's proof that it may pull), and a check of another node's proof with one HEAD of
//! the blob at the registry itself.

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;

use super::error::RegistryError;
use super::failure::HttpFailure;
use super::transport::send_failure;
use super::RegistryClient;
use crate::digest::Digest;
use crate::reference::ImageRef;

impl RegistryClient {
    /// Whether reading `image`'s repository from its registry (or a mirror of it) needed a
    /// configured credential: the registry refused an anonymous request.
    pub fn needs_credentials(&self, image: &ImageRef) -> bool {
        let tokens = &self.inner.tokens;
        self.endpoints(image)
            .iter()
            .any(|endpoint| tokens.is_credentialed(endpoint.host, image.repository_name()))
    }

    /// The `Authorization` this node reads `image`'s repository from the registry itself
    /// with, when that needed a configured credential and is still fresh; what a peer is
    /// shown as proof that this node may pull the repository.
    pub fn pull_authorization(&self, image: &ImageRef) -> Option<HeaderValue> {
        let (host, repository) = (image.api_host(), image.repository_name());
        let tokens = &self.inner.tokens;
        if !tokens.is_credentialed(host, repository) {
            return None;
        }
        tokens.get(host, repository, self.inner.pull_secrets.epoch())
    }

    /// Whether `authorization` lets its holder pull `blob` from `image`'s repository: one
    /// HEAD of the blob at the registry itself (never a mirror, which may check less), with
    /// that `Authorization` and nothing of this node's own. A redirect counts as allowed:
    /// the registry checks access before it sends a reader to storage.
    pub async fn may_pull(
        &self,
        image: &ImageRef,
        blob: &Digest,
        authorization: &HeaderValue,
    ) -> Result<bool, RegistryError> {
        let endpoints = self.endpoints(image);
        let endpoint = endpoints
            .last()
            .expect("the registry itself is always an endpoint");
        let url = format!(
            "{}://{}/v2/{}/blobs/{blob}",
            if endpoint.plain_http { "http" } else { "https" },
            endpoint.host,
            image.repository_name(),
        );
        let fail = |cause| RegistryError::CheckPullAccess {
            url: url.clone(),
            cause,
        };
        let parsed = Url::parse(&url).map_err(|e| {
            fail(HttpFailure::Malformed {
                reason: format!("url: {e}"),
            })
        })?;
        let response = endpoint
            .client
            .head(parsed.clone())
            .header(AUTHORIZATION, authorization.clone())
            .timeout(self.inner.policy.timeout)
            .send()
            .await
            .map_err(|error| fail(send_failure(&parsed, error)))?;
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(true);
        }
        match status.as_u16() {
            401 | 403 | 404 => Ok(false),
            other => Err(fail(HttpFailure::Status { status: other })),
        }
    }
}
