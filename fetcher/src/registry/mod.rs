//! The OCI distribution client: manifests, whole small blobs and byte ranges of large ones.
//!
//! Every request goes to the host's configured mirrors in order, then to the host itself; on
//! each endpoint it authenticates on demand (bearer tokens or basic credentials), retries
//! transient failures with backoff, and follows redirects to blob storage.

mod access;
mod auth;
mod challenge;
mod error;
mod failure;
mod helper;
mod lent;
mod provider;
mod pull_secrets;
mod push;
mod referrers;
mod retry;
mod sources;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, RANGE};
use reqwest::{Client, StatusCode, Url};
use shoal_config::{HostConfig, RegistryConfig};
use tokio::time::Instant;

pub use auth::{Credential, Credentials};
pub use error::{CredentialsError, PushError, RegistryError};
pub use failure::HttpFailure;
pub use lent::LentAuthorization;
pub use provider::CredentialProviders;
pub use pull_secrets::{image_key, PullSecrets};
pub use push::{BlobContent, Pushed, PushedManifest};
pub use referrers::{is_not_found, Referrers, OCI_INDEX};
use retry::Budget;
pub use retry::RetryPolicy;
pub use sources::CredentialSources;

use crate::digest::Digest;
use crate::reference::{BlobRef, ImageRef};
use auth::TokenCache;
use challenge::{Access, Answer};
use transport::{BodyPlan, Reply};

/// Manifests and indexes are small; containerd refuses larger ones too.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// [`RegistryClient::get_blob`] is for configs and the like; layers go through ranges.
pub const MAX_WHOLE_BLOB_BYTES: u64 = 64 << 20;
const MAX_TOKEN_RESPONSE_BYTES: u64 = 1 << 20;

/// Media types a manifest request accepts: OCI and Docker, single-platform and lists.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A manifest or index as the registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    /// `Content-Type` without parameters.
    pub media_type: String,
    /// sha256 of `bytes`, verified against the reference's digest when it had one.
    pub digest: Digest,
}

/// A registry client; cheap to clone, all clones share connections and tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: BTreeMap<String, HostConfig>,
    /// Clients of hosts with their own TLS settings; every other host uses `default_client`.
    clients: HashMap<String, Client>,
    default_client: Client,
    credentials: Credentials,
    /// Asked before `credentials`, for the repository of the request; shared by every
    /// client a reload builds, and with the CRI proxy that records them.
    pull_secrets: PullSecrets,
    /// kubelet's credential provider plugins, asked after `credentials`.
    providers: Option<CredentialProviders>,
    tokens: TokenCache,
    policy: RetryPolicy,
    /// Hosts whose referrers API answered 404: asked at the referrers tag directly since.
    without_referrers_api: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Answer for Reply {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// One place a request can be sent: a mirror or the registry itself.
struct Endpoint<'a> {
    /// `host[:port]` as it appears in URLs.
    host: &'a str,
    plain_http: bool,
    client: &'a Client,
}

impl RegistryClient {
    /// Builds the client, reading credentials from `config.docker_config`.
    pub fn new(config: &RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let credentials = Credentials::load(&config.docker_config)?;
        RegistryClient::with_credentials(config, credentials)
    }

    /// [`new`](Self::new), asking `pull_secrets` first.
    pub fn with_pull_secrets(
        config: &RegistryConfig,
        pull_secrets: PullSecrets,
    ) -> Result<RegistryClient, RegistryError> {
        let credentials = Credentials::load(&config.docker_config)?;
        RegistryClient::build(config, credentials, pull_secrets)
    }

    pub fn with_credentials(
        config: &RegistryConfig,
        credentials: Credentials,
    ) -> Result<RegistryClient, RegistryError> {
        RegistryClient::build(config, credentials, PullSecrets::default())
    }

    fn build(
        config: &RegistryConfig,
        credentials: Credentials,
        pull_secrets: PullSecrets,
    ) -> Result<RegistryClient, RegistryError> {
        let policy = RetryPolicy {
            retries: config.retries,
            timeout: config.timeout,
            deadline: config.deadline,
        };
        let providers = match &config.credential_providers {
            Some(providers) => Some(CredentialProviders::load(
                &providers.config,
                &providers.bin_dir,
            )?),
            None => None,
        };
        let default_client = build_client("default", &HostConfig::default(), &policy)?;
        let mut clients = HashMap::new();
        for (host, host_config) in &config.hosts {
            if host_config.insecure_skip_verify || host_config.ca.is_some() {
                clients.insert(host.clone(), build_client(host, host_config, &policy)?);
            }
        }
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                hosts: config.hosts.clone(),
                clients,
                default_client,
                credentials,
                pull_secrets,
                providers,
                tokens: TokenCache::default(),
                policy,
                without_referrers_api: Default::default(),
            }),
        })
    }

    /// The pull secrets this client asks first.
    pub fn pull_secrets(&self) -> &PullSecrets {
        &self.inner.pull_secrets
    }

    /// Where this client's credentials come from, host by host, without a secret.
    pub fn credential_sources(&self) -> CredentialSources {
        self.inner.credentials.sources()
    }

    /// Fetches the manifest or index `image` names.
    pub async fn get_manifest(&self, image: &ImageRef) -> Result<Manifest, RegistryError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.index.v1+json, \
                 application/vnd.oci.image.manifest.v1+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json, \
                 application/vnd.docker.distribution.manifest.v2+json",
            ),
        );
        let path = format!("manifests/{}", image.manifest_reference());
        let plan = BodyPlan::Full {
            limit: MAX_MANIFEST_BYTES,
        };
        let (url, reply) = self
            .execute(
                image,
                &path,
                &headers,
                &plan,
                self.inner.policy,
                &|url, cause| RegistryError::FetchManifest { url, cause },
            )
            .await?;
        let digest = Digest::of(&reply.body);
        if let Some(expected) = image.digest() {
            if *expected != digest {
                return Err(RegistryError::VerifyDigest {
                    url,
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        let media_type = reply
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .unwrap_or("")
            .trim()
            .to_owned();
        Ok(Manifest {
            bytes: reply.body,
            media_type,
            digest,
        })
    }

    /// Fetches a whole small blob (an image config, a TOC) and verifies its digest.
    pub async fn get_blob(&self, blob: &BlobRef) -> Result<Bytes, RegistryError> {
        if blob.size > MAX_WHOLE_BLOB_BYTES {
            return Err(RegistryError::BlobTooLarge {
                digest: blob.digest.clone(),
                size: blob.size,
                limit: MAX_WHOLE_BLOB_BYTES,
            });
        }
        let path = format!("blobs/{}", blob.digest);
        let plan = BodyPlan::Full { limit: blob.size };
        let (url, reply) = self
            .execute(
                &blob.image,
                &path,
                &HeaderMap::new(),
                &plan,
                self.inner.policy,
                &|url, cause| RegistryError::FetchBlob { url, cause },
            )
            .await?;
        let actual = Digest::of(&reply.body);
        if actual != blob.digest {
            return Err(RegistryError::VerifyDigest {
                url,
                expected: blob.digest.clone(),
                actual,
            });
        }
        Ok(reply.body)
    }

    /// Fetches bytes `range` of `blob` with an HTTP range request. The bytes are exactly the
    /// requested ones, but unverified: only the caller knows the digests of pieces of a blob.
    pub async fn get_blob_range(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        self.blob_range(blob, range, self.inner.policy).await
    }

    /// [`get_blob_range`](Self::get_blob_range) with one attempt of at most `limit` (or the
    /// client's own timeout and deadline, when shorter), and no retry: a look at whether the
    /// registry answers again, for a block whose full fetch failed moments ago.
    pub async fn get_blob_range_briefly(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        limit: std::time::Duration,
    ) -> Result<Bytes, RegistryError> {
        self.blob_range(blob, range, self.inner.policy.brief(limit))
            .await
    }

    async fn blob_range(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        policy: RetryPolicy,
    ) -> Result<Bytes, RegistryError> {
        if range.start > range.end || range.end > blob.size {
            return Err(RegistryError::RangeOutOfBounds {
                digest: blob.digest.clone(),
                range,
                size: blob.size,
            });
        }
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let mut headers = HeaderMap::new();
        let spec = format!("bytes={}-{}", range.start, range.end - 1);
        headers.insert(
            RANGE,
            HeaderValue::from_str(&spec).expect("digits and `bytes=-` are valid header text"),
        );
        let path = format!("blobs/{}", blob.digest);
        let plan = BodyPlan::Range {
            range: range.clone(),
            blob_size: blob.size,
        };
        let (_, reply) = self
            .execute(
                &blob.image,
                &path,
                &headers,
                &plan,
                policy,
                &|url, cause| RegistryError::FetchRange {
                    url,
                    range: range.clone(),
                    cause,
                },
            )
            .await?;
        Ok(reply.body)
    }

    /// Runs one request against the mirrors, then the registry, returning the first success
    /// and the URL that served it, or the registry's own error.
    async fn execute(
        &self,
        image: &ImageRef,
        path: &str,
        headers: &HeaderMap,
        plan: &BodyPlan,
        policy: RetryPolicy,
        fail: &(dyn Fn(String, HttpFailure) -> RegistryError + Sync),
    ) -> Result<(String, Reply), RegistryError> {
        let endpoints = self.endpoints(image);
        // One deadline for the whole request, mirrors and retries included, so that a caller
        // (a FUSE read) waits at most `registry.deadline_secs` however the registry misbehaves.
        let budget = policy.start();
        let mut last_error = None;
        for endpoint in &endpoints {
            let url = format!(
                "{}://{}/v2/{}/{path}",
                if endpoint.plain_http { "http" } else { "https" },
                endpoint.host,
                image.repository_name(),
            );
            let result = match Url::parse(&url) {
                Ok(parsed) => {
                    self.execute_on(
                        endpoint,
                        image.repository_name(),
                        &parsed,
                        headers,
                        plan,
                        budget,
                    )
                    .await
                }
                Err(e) => Err(RequestError::Http(HttpFailure::Malformed {
                    reason: format!("url: {e}"),
                })),
            };
            match result {
                Ok(reply) => return Ok((url, reply)),
                Err(error) => {
                    let error = match error {
                        RequestError::Http(cause) => fail(url.clone(), cause),
                        RequestError::Complete(error) => error,
                    };
                    tracing::debug!(endpoint = endpoint.host, %error, "registry endpoint failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("the registry itself is always an endpoint"))
    }

    fn endpoints<'a>(&'a self, image: &'a ImageRef) -> Vec<Endpoint<'a>> {
        let inner = &self.inner;
        let config = |host: &str| inner.hosts.get(host);
        let own = config(image.host()).or_else(|| config(image.api_host()));
        let mut endpoints = Vec::new();
        for mirror in own.map(|c| c.mirrors.as_slice()).unwrap_or_default() {
            endpoints.push(Endpoint {
                host: mirror,
                plain_http: config(mirror).is_some_and(|c| c.plain_http),
                client: inner.client(mirror),
            });
        }
        endpoints.push(Endpoint {
            host: image.api_host(),
            plain_http: own.is_some_and(|c| c.plain_http),
            client: inner
                .clients
                .get(image.host())
                .unwrap_or_else(|| inner.client(image.api_host())),
        });
        endpoints
    }

    /// One endpoint: authenticate on demand, retry transient failures.
    async fn execute_on(
        &self,
        endpoint: &Endpoint<'_>,
        repository: &str,
        url: &Url,
        headers: &HeaderMap,
        plan: &BodyPlan,
        budget: Budget,
    ) -> Result<Reply, RequestError> {
        let reply = self
            .authorized(
                endpoint,
                repository,
                Access::Pull,
                budget,
                |auth| async move {
                    self.send_with_retries(
                        endpoint.client,
                        url,
                        headers,
                        auth.as_ref(),
                        plan,
                        budget,
                    )
                    .await
                },
            )
            .await?;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(RequestError::Http(HttpFailure::Status {
                status: reply.status.as_u16(),
            }))
        }
    }

    /// Attempts until one succeeds, fails for good, the retry budget is spent or `until`
    /// passes. Each attempt (connect, headers and body) gets `timeout`, cut short by `until`,
    /// so a body that stalls after its headers costs one attempt. Returns the final reply,
    /// whatever its status, unless that status was transient.
    async fn send_with_retries(
        &self,
        client: &Client,
        url: &Url,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
        plan: &BodyPlan,
        budget: Budget,
    ) -> Result<Reply, RequestError> {
        let Budget { policy, until } = budget;
        let mut retry = 0;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Earlier endpoints (mirrors) used the whole deadline.
                return Err(RequestError::Http(HttpFailure::TimedOut {
                    after: policy.deadline,
                }));
            }
            let limit = policy.timeout.min(left);
            let outcome =
                tokio::time::timeout(limit, transport::attempt(client, url, headers, auth, plan))
                    .await
                    .unwrap_or(Err(HttpFailure::TimedOut { after: limit }));
            let (failure, reply_headers) = match outcome {
                Ok(reply) => {
                    let failure = HttpFailure::Status {
                        status: reply.status.as_u16(),
                    };
                    if !failure.is_transient() {
                        return Ok(reply);
                    }
                    (failure, Some(reply.headers))
                }
                Err(failure) => (failure, None),
            };
            if !failure.is_transient() || retry >= policy.retries {
                return Err(RequestError::Http(failure));
            }
            let delay = policy.delay(retry, reply_headers.as_ref());
            if Instant::now() + delay >= until {
                return Err(RequestError::Http(HttpFailure::Deadline {
                    deadline: policy.deadline,
                    attempts: retry + 1,
                    last: Box::new(failure),
                }));
            }
            tracing::debug!(%url, %failure, ?delay, retry, "retrying registry request");
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }
}

impl Inner {
    fn client(&self, host: &str) -> &Client {
        self.clients.get(host).unwrap_or(&self.default_client)
    }
}

/// How one endpoint failed: an HTTP failure the caller names after its operation, or an
/// already complete error `E` (a token fetch, a credential helper; for a push, also the
/// file being uploaded).
enum RequestError<E = RegistryError> {
    Http(HttpFailure),
    Complete(E),
}

impl RequestError {
    /// The same failure, for a caller whose complete errors are `E` (a push's).
    fn widen<E: From<RegistryError>>(self) -> RequestError<E> {
        match self {
            RequestError::Http(failure) => RequestError::Http(failure),
            RequestError::Complete(error) => RequestError::Complete(error.into()),
        }
    }
}

fn build_client(
    host: &str,
    config: &HostConfig,
    policy: &RetryPolicy,
) -> Result<Client, RegistryError> {
    let mut builder = Client::builder()
        // Redirects are followed by hand so that credentials never leave the registry.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(policy.timeout)
        .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")));
    if config.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(ca) = &config.ca {
        for certificate in read_ca_file(ca)? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|source| RegistryError::BuildClient {
            host: host.to_owned(),
            source,
        })
}

fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, RegistryError> {
    let pem = std::fs::read(path).map_err(|source| RegistryError::ReadCaFile {
        path: path.to_owned(),
        source,
    })?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| RegistryError::ParseCaFile {
        path: path.to_owned(),
        source,
    })
}
