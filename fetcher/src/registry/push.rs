//! Pushing to a registry: blob existence checks, monolithic blob uploads (`POST` then `PUT
//! ?digest=`) and manifest `PUT`s.
//!
//! Pushes go to the registry itself, never to a mirror. They authenticate like reads, but a
//! token is always asked for `repository:<name>:pull,push`, whatever scope the challenge named,
//! so a pull-only token cached by earlier reads is replaced once and then serves both.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::LOCATION;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Body, Method, StatusCode, Url};

use super::challenge::{Access, Answer};
use super::error::PushError;
use super::failure::HttpFailure;
use super::{Endpoint, RegistryClient, RequestError, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::reference::ImageRef;

/// Uploads get their per-attempt deadline stretched by their size at this rate, so a large
/// layer on a slow link is not cut off by a deadline meant for small requests.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 1 << 20;
/// The header registries confirm a stored blob's or manifest's digest with.
const CONTENT_DIGEST: &str = "docker-content-digest";

/// Where the bytes of a blob to upload come from; a file is reopened for each attempt, so a
/// retried upload never holds the blob in memory.
#[derive(Debug, Clone)]
pub enum BlobContent {
    Bytes(Bytes),
    File(PathBuf),
}

/// What [`RegistryClient::push_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The registry already had the blob; nothing was sent.
    Present,
    Uploaded,
}

/// A pushed manifest's digest and the URL it was stored at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub digest: Digest,
    pub url: String,
}

/// A final response to a push request: only the head matters.
struct PushReply {
    status: StatusCode,
    headers: HeaderMap,
}

impl RegistryClient {
    /// Whether `image`'s repository holds blob `digest` (`HEAD /v2/<name>/blobs/<digest>`).
    pub async fn blob_exists(&self, image: &ImageRef, digest: &Digest) -> Result<bool, PushError> {
        let endpoint = self.push_endpoint(image);
        let url = blob_url(&endpoint, image, &format!("blobs/{digest}"));
        let fail = |cause| PushError::CheckBlob {
            url: url.clone(),
            cause,
        };
        let parsed = parse_url(&url).map_err(fail)?;
        let deadline = self.inner.policy.timeout;
        let reply = self
            .retrying(|| {
                self.send_authorized(&endpoint, image, Method::HEAD, &parsed, None, deadline)
            })
            .await
            .map_err(|error| request_error(error, fail))?;
        // Registries backed by object storage answer an existing blob with a redirect to it.
        match reply.status {
            status if status.is_success() || status.is_redirection() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(fail(HttpFailure::Status {
                status: status.as_u16(),
            })),
        }
    }

    /// Uploads blob `digest` of `size` bytes to `image`'s repository unless it is there already.
    /// The registry verifies the digest; a reply naming another one is an error too.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        digest: &Digest,
        size: u64,
        content: &BlobContent,
    ) -> Result<Pushed, PushError> {
        if self.blob_exists(image, digest).await? {
            return Ok(Pushed::Present);
        }
        if let BlobContent::File(path) = content {
            let actual = std::fs::metadata(path)
                .map_err(|source| PushError::ReadUpload {
                    digest: digest.clone(),
                    path: path.clone(),
                    source,
                })?
                .len();
            if actual != size {
                return Err(PushError::PushBlob {
                    url: path.display().to_string(),
                    digest: digest.clone(),
                    cause: HttpFailure::Length {
                        expected: size,
                        actual,
                    },
                });
            }
        }
        let endpoint = self.push_endpoint(image);
        let start_url = blob_url(&endpoint, image, "blobs/uploads/");
        let deadline =
            self.inner.policy.timeout + Duration::from_secs(size / MIN_UPLOAD_BYTES_PER_SEC);
        // A failed PUT may have consumed its upload session, so each attempt starts a new one.
        self.retrying(|| async {
            let location = self.start_upload(&endpoint, image, &start_url).await?;
            let mut url = location;
            url.query_pairs_mut().append_pair("digest", digest.as_str());
            let body = Upload {
                content,
                size,
                digest,
                content_type: HeaderValue::from_static("application/octet-stream"),
            };
            let reply = self
                .send_authorized(&endpoint, image, Method::PUT, &url, Some(&body), deadline)
                .await?;
            if reply.status != StatusCode::CREATED {
                return Err(RequestError::Http(HttpFailure::Status {
                    status: reply.status.as_u16(),
                }));
            }
            confirm_digest(&reply.headers, digest)?;
            Ok(())
        })
        .await
        .map_err(|error| {
            request_error(error, |cause| PushError::PushBlob {
                url: start_url.clone(),
                digest: digest.clone(),
                cause,
            })
        })?;
        Ok(Pushed::Uploaded)
    }

    /// Stores `bytes` as the manifest `image` names (its tag, or its digest), with
    /// `media_type` as its `Content-Type`.
    pub async fn put_manifest(
        &self,
        image: &ImageRef,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PushedManifest, PushError> {
        let endpoint = self.push_endpoint(image);
        let url = blob_url(
            &endpoint,
            image,
            &format!("manifests/{}", image.manifest_reference()),
        );
        let fail = |cause| PushError::PushManifest {
            url: url.clone(),
            cause,
        };
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(fail(HttpFailure::TooLarge {
                limit: MAX_MANIFEST_BYTES,
            }));
        }
        let digest = Digest::of(&bytes);
        let content_type = HeaderValue::from_str(media_type).map_err(|_| {
            fail(HttpFailure::Malformed {
                reason: format!("media type `{media_type}` is not header text"),
            })
        })?;
        let parsed = parse_url(&url).map_err(fail)?;
        let content = BlobContent::Bytes(bytes.clone());
        let body = Upload {
            content: &content,
            size: bytes.len() as u64,
            digest: &digest,
            content_type,
        };
        let deadline = self.inner.policy.timeout;
        self.retrying(|| async {
            let reply = self
                .send_authorized(
                    &endpoint,
                    image,
                    Method::PUT,
                    &parsed,
                    Some(&body),
                    deadline,
                )
                .await?;
            if reply.status != StatusCode::CREATED {
                return Err(RequestError::Http(HttpFailure::Status {
                    status: reply.status.as_u16(),
                }));
            }
            confirm_digest(&reply.headers, &digest)
        })
        .await
        .map_err(|error| request_error(error, fail))?;
        Ok(PushedManifest { digest, url })
    }

    /// The registry itself: the last of [`RegistryClient::endpoints`], after the mirrors.
    fn push_endpoint<'a>(&'a self, image: &'a ImageRef) -> Endpoint<'a> {
        let mut endpoints = self.endpoints(image);
        endpoints
            .pop()
            .expect("the registry itself is always an endpoint")
    }

    /// `POST /v2/<name>/blobs/uploads/`: the session's URL from `Location`.
    async fn start_upload(
        &self,
        endpoint: &Endpoint<'_>,
        image: &ImageRef,
        start_url: &str,
    ) -> Result<Url, RequestError<PushError>> {
        let url = parse_url(start_url).map_err(RequestError::Http)?;
        let deadline = self.inner.policy.timeout;
        let reply = self
            .send_authorized(endpoint, image, Method::POST, &url, None, deadline)
            .await?;
        if reply.status != StatusCode::ACCEPTED {
            return Err(RequestError::Http(HttpFailure::Status {
                status: reply.status.as_u16(),
            }));
        }
        let location = reply
            .headers
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                RequestError::Http(HttpFailure::Malformed {
                    reason: "upload started without a location".to_owned(),
                })
            })?;
        upload_location(&url, location).map_err(RequestError::Http)
    }

    /// Retries transient failures (transport, timeouts, 408, 429, 5xx) of `attempt` with the
    /// client's backoff policy.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, RequestError<PushError>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RequestError<PushError>>>,
    {
        let policy = self.inner.policy;
        let mut retry = 0;
        loop {
            match attempt().await {
                Err(RequestError::Http(failure))
                    if failure.is_transient() && retry < policy.retries =>
                {
                    let delay = policy.delay(retry, None);
                    tracing::debug!(%failure, ?delay, retry, "retrying registry push request");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// One request, answering a 401 with push-scoped credentials. Any other final status is
    /// the caller's to judge.
    async fn send_authorized(
        &self,
        endpoint: &Endpoint<'_>,
        image: &ImageRef,
        method: Method,
        url: &Url,
        body: Option<&Upload<'_>>,
        deadline: Duration,
    ) -> Result<PushReply, RequestError<PushError>> {
        // Pushes are bounded per request by their callers; a token fetch on its own.
        let budget = self.inner.policy.start();
        self.authorized(
            endpoint,
            image.repository_name(),
            Access::Push,
            budget,
            |auth| {
                let method = method.clone();
                async move {
                    let request = send_once(endpoint, method, url, auth.as_ref(), body);
                    tokio::time::timeout(deadline, request).await.unwrap_or(Err(
                        RequestError::Http(HttpFailure::TimedOut { after: deadline }),
                    ))
                }
            },
        )
        .await
    }
}

impl Answer for PushReply {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// A request body with its size, its type, and for errors, its digest.
struct Upload<'a> {
    content: &'a BlobContent,
    size: u64,
    digest: &'a Digest,
    content_type: HeaderValue,
}

impl Upload<'_> {
    async fn body(&self) -> Result<Body, RequestError<PushError>> {
        match self.content {
            BlobContent::Bytes(bytes) => Ok(Body::from(bytes.clone())),
            BlobContent::File(path) => {
                let file = tokio::fs::File::open(path).await.map_err(|source| {
                    RequestError::Complete(PushError::ReadUpload {
                        digest: self.digest.clone(),
                        path: path.clone(),
                        source,
                    })
                })?;
                Ok(Body::from(file))
            }
        }
    }
}

/// Sends one request without following redirects; credentials go only to `url`'s own
/// registry, which is where every push URL points.
async fn send_once(
    endpoint: &Endpoint<'_>,
    method: Method,
    url: &Url,
    auth: Option<&HeaderValue>,
    body: Option<&Upload<'_>>,
) -> Result<PushReply, RequestError<PushError>> {
    let mut request = endpoint.client.request(method, url.clone());
    if let Some(auth) = auth.filter(|_| same_registry(endpoint, url)) {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    request = match body {
        Some(upload) => {
            let body = upload.body().await?;
            request
                .header(CONTENT_TYPE, upload.content_type.clone())
                .header(CONTENT_LENGTH, upload.size)
                .body(body)
        }
        // Registries want an explicit empty body on a POST that starts an upload.
        None => request.header(CONTENT_LENGTH, 0),
    };
    let response = request
        .send()
        .await
        .map_err(|error| RequestError::Http(super::transport::send_failure(url, error)))?;
    Ok(PushReply {
        status: response.status(),
        headers: response.headers().clone(),
    })
}

fn same_registry(endpoint: &Endpoint<'_>, url: &Url) -> bool {
    let authority = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => return false,
    };
    authority == endpoint.host
}

fn blob_url(endpoint: &Endpoint<'_>, image: &ImageRef, path: &str) -> String {
    format!(
        "{}://{}/v2/{}/{path}",
        if endpoint.plain_http { "http" } else { "https" },
        endpoint.host,
        image.repository_name(),
    )
}

fn parse_url(url: &str) -> Result<Url, HttpFailure> {
    Url::parse(url).map_err(|e| HttpFailure::Malformed {
        reason: format!("url: {e}"),
    })
}

/// Resolves an upload session's `Location` (absolute, or relative to the request) and keeps it
/// on the registry's scheme: a session URL elsewhere would take the blob somewhere unasked.
fn upload_location(request: &Url, location: &str) -> Result<Url, HttpFailure> {
    let url = request.join(location).map_err(|e| HttpFailure::Malformed {
        reason: format!("upload location `{location}`: {e}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HttpFailure::Malformed {
            reason: format!("upload location `{location}` is not http(s)"),
        });
    }
    Ok(url)
}

/// A `Docker-Content-Digest` that names another digest means the registry stored something
/// other than what was sent.
fn confirm_digest(headers: &HeaderMap, expected: &Digest) -> Result<(), RequestError<PushError>> {
    let Some(stored) = headers.get(CONTENT_DIGEST).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    if stored == expected.as_str() {
        return Ok(());
    }
    Err(RequestError::Http(HttpFailure::Malformed {
        reason: format!(
            "registry stored {} instead of {expected}",
            stored.chars().take(80).collect::<String>()
        ),
    }))
}

/// Names an HTTP failure after the operation; a complete error passes through.
fn request_error(
    error: RequestError<PushError>,
    fail: impl FnOnce(HttpFailure) -> PushError,
) -> PushError {
    match error {
        RequestError::Http(cause) => fail(cause),
        RequestError::Complete(error) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_resolve_against_the_request() {
        let request = Url::parse("http://127.0.0.1:5000/v2/app/blobs/uploads/").unwrap();
        let relative = upload_location(&request, "/v2/app/blobs/uploads/abc?_state=x").unwrap();
        assert_eq!(
            relative.as_str(),
            "http://127.0.0.1:5000/v2/app/blobs/uploads/abc?_state=x"
        );
        let absolute =
            upload_location(&request, "http://127.0.0.1:5000/v2/app/blobs/uploads/d").unwrap();
        assert_eq!(absolute.path(), "/v2/app/blobs/uploads/d");
        assert!(upload_location(&request, "file:///etc/passwd").is_err());
    }

    #[test]
    fn a_mismatched_content_digest_is_an_error() {
        let expected = Digest::of(b"a");
        let mut headers = HeaderMap::new();
        assert!(confirm_digest(&headers, &expected).is_ok());
        headers.insert(
            CONTENT_DIGEST,
            HeaderValue::from_str(expected.as_str()).unwrap(),
        );
        assert!(confirm_digest(&headers, &expected).is_ok());
        let other = Digest::of(b"b");
        headers.insert(
            CONTENT_DIGEST,
            HeaderValue::from_str(other.as_str()).unwrap(),
        );
        assert!(confirm_digest(&headers, &expected).is_err());
    }
}
