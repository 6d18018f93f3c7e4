//! An `Authorization` lent for one job: a preheat whose caller sent the registry credential
//! to read the image with (Harbor sends a pull token with every preheat). It is put where the
//! registry client keeps the tokens it got itself, for the image's repository on the registry
//! itself, and taken back when the job ends; nothing of it is written anywhere.

use std::time::Duration;

use reqwest::header::HeaderValue;

use super::RegistryClient;
use crate::reference::ImageRef;

/// The lent `Authorization`; dropping it takes it back (unless a fresher one replaced it).
pub struct LentAuthorization {
    client: RegistryClient,
    host: String,
    repository: String,
    header: HeaderValue,
}

impl RegistryClient {
    /// Reads of `image`'s repository at its registry use `authorization` until the returned
    /// guard is dropped (or `lifetime` ends). It counts as a configured credential: the
    /// repository's blobs are private, shared with peers only as the pull gate allows.
    pub fn lend_authorization(
        &self,
        image: &ImageRef,
        mut authorization: HeaderValue,
        lifetime: Duration,
    ) -> LentAuthorization {
        authorization.set_sensitive(true);
        let (host, repository) = (image.api_host(), image.repository_name());
        self.inner.tokens.insert(
            host,
            repository,
            authorization.clone(),
            Some(lifetime),
            true,
            None,
        );
        LentAuthorization {
            client: self.clone(),
            host: host.to_owned(),
            repository: repository.to_owned(),
            header: authorization,
        }
    }
}

impl Drop for LentAuthorization {
    fn drop(&mut self) {
        self.client
            .inner
            .tokens
            .remove_if(&self.host, &self.repository, &self.header);
    }
}
