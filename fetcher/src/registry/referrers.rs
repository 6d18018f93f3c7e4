//! Listing the referrers of a manifest (OCI distribution spec 1.1): `GET
//! /v2/<name>/referrers/<digest>` where the registry has that API, else the index kept at the
//! referrers tag `<algorithm>-<hex>` (the spec's fallback for registries without it, such as
//! docker-registry 2.x).

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};

use super::transport::BodyPlan;
use super::{HttpFailure, Manifest, RegistryClient, RegistryError, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::reference::ImageRef;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Where a manifest's referrers were listed, and the list.
#[derive(Debug, Clone)]
pub enum Referrers {
    /// The registry's referrers API answered with this index; it keeps it itself.
    Api(Manifest),
    /// The registry has no referrers API (404); this is the index at the referrers tag,
    /// `None` when the tag does not exist yet. Whoever adds a referrer updates it.
    Tag {
        tag: String,
        index: Option<Manifest>,
    },
}

/// The spec's fallback tag for the referrers of `subject`: `<algorithm>-<hex>`.
pub fn referrers_tag(subject: &Digest) -> String {
    let text = subject.as_str().replace(':', "-");
    text.chars().take(128).collect()
}

impl RegistryClient {
    /// The referrers of `subject` in `image`'s repository: from the referrers API, else (on
    /// 404, remembered for the host: one round trip less next time) from the referrers tag.
    pub async fn get_referrers(
        &self,
        image: &ImageRef,
        subject: &Digest,
    ) -> Result<Referrers, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let plan = BodyPlan::Full {
            limit: MAX_MANIFEST_BYTES,
        };
        let host = image.api_host().to_owned();
        let known_absent = self.inner.without_referrers_api.lock().contains(&host);
        let api = if known_absent {
            Err(RegistryError::FetchReferrers {
                url: String::new(),
                cause: HttpFailure::Status { status: 404 },
            })
        } else {
            self.execute(
                image,
                &format!("referrers/{subject}"),
                &headers,
                &plan,
                self.inner.policy,
                &|url, cause| RegistryError::FetchReferrers { url, cause },
            )
            .await
        };
        match api {
            Ok((_, reply)) => {
                return Ok(Referrers::Api(Manifest {
                    digest: Digest::of(&reply.body),
                    bytes: reply.body,
                    media_type: OCI_INDEX.to_owned(),
                }))
            }
            Err(error) if !is_not_found(&error) => return Err(error),
            Err(_) => {
                self.inner.without_referrers_api.lock().insert(host);
            }
        }
        let tag = referrers_tag(subject);
        let tagged = image
            .with_tag(&tag)
            .map_err(|_| RegistryError::FetchReferrers {
                url: format!("{}/{}:{tag}", image.host(), image.repository_name()),
                cause: HttpFailure::Malformed {
                    reason: "the referrers tag is not a valid tag".to_owned(),
                },
            })?;
        match self.get_manifest(&tagged).await {
            Ok(index) => Ok(Referrers::Tag {
                tag,
                index: Some(index),
            }),
            Err(error) if is_not_found(&error) => Ok(Referrers::Tag { tag, index: None }),
            Err(error) => Err(error),
        }
    }
}

/// Whether a read failed only because the registry has no such thing.
pub fn is_not_found(error: &RegistryError) -> bool {
    let cause = match error {
        RegistryError::FetchManifest { cause, .. }
        | RegistryError::FetchReferrers { cause, .. }
        | RegistryError::FetchBlob { cause, .. } => cause,
        _ => return false,
    };
    matches!(cause, HttpFailure::Status { status: 404 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_referrers_tag_is_the_digest_with_a_dash() {
        let digest = Digest::of(b"subject");
        let tag = referrers_tag(&digest);
        assert_eq!(tag, format!("sha256-{}", digest.hex()));
        assert!(ImageRef::parse(&format!("r.io/a:{tag}")).is_ok());
    }
}
