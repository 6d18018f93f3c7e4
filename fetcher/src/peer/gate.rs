//! [`PullGate`]: blocks of a private repository go only to a peer that proves it may pull
//! that repository itself.
//!
//! A blob is private when this node's own read of it needed a configured credential (the
//! registry refused an anonymous request). A request for its blocks must then come over
//! mutual TLS, name a repository of the same registry and carry the `Authorization` the
//! requester reads that repository with; the gate asks the registry itself, with one HEAD
//! of the blob using exactly that value, whether it lets its holder pull the blob. An answer
//! is remembered for [`PROOF_TTL`] (tokens live about that long; a revoked credential is
//! refused again within it), so a cold start costs the registry one HEAD per requester and
//! blob. Blobs of public repositories need no proof.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::HeaderMap;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use reqwest::header::HeaderValue;
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use super::shareable::Audience;
use super::wire::{PROOF_AUTHORIZATION, PROOF_REPOSITORY};
use crate::digest::Digest;
use crate::reference::ImageRef;
use crate::registry::RegistryClient;

/// How long the registry's answer to one proof is trusted.
pub const PROOF_TTL: Duration = Duration::from_secs(60);
/// Proofs remembered at once; the oldest are checked again when they are asked for.
const PROOFS_CAP: usize = 4096;

/// Why a request for private blocks was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Without mutual TLS a credential would cross the network in the clear.
    NoTls,
    /// The request carried no proof, or an unreadable one.
    NoProof,
    /// The registry did not let the proof pull the blob (or could not be asked).
    Refused,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoTls => "blocks of a private repository are served over mutual tls only",
            Refusal::NoProof => "blocks of a private repository need a proof of pull access",
            Refusal::Refused => "the registry did not accept the proof of pull access",
        }
    }
}

/// A proof as remembered: the blob, the repository it names, and a hash of the credential
/// (never the credential itself).
type ProofKey = (Digest, String, [u8; 32]);

pub struct PullGate {
    /// The registry client in force (replaced whole on reload), whose settings reach the
    /// registry, and whose reads say which repositories are private.
    registry: Arc<RwLock<RegistryClient>>,
    /// The registry's verdicts on proofs, and when each was given.
    proofs: Mutex<LruCache<ProofKey, (bool, Instant)>>,
}

impl PullGate {
    pub fn new(registry: Arc<RwLock<RegistryClient>>) -> PullGate {
        PullGate {
            registry,
            proofs: Mutex::new(LruCache::new(
                NonZeroUsize::new(PROOFS_CAP).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn registry(&self) -> RegistryClient {
        self.registry.read().clone()
    }

    /// Who may have blocks of `image`'s blobs that this node read: peers that may pull
    /// them, when the registry wanted this node's credential for them.
    pub fn audience(&self, image: &ImageRef) -> Audience {
        if self.registry().needs_credentials(image) {
            Audience::PullersFrom(image.host().to_owned())
        } else {
            Audience::Anyone
        }
    }

    /// The headers proving this node may pull `image`'s repository, if it reads it with a
    /// credential; sent only over mutual TLS, and only to holders of its blocks.
    pub fn proof(&self, image: &ImageRef) -> Option<[(&'static str, HeaderValue); 2]> {
        let mut authorization = self.registry().pull_authorization(image)?;
        authorization.set_sensitive(true);
        let repository = HeaderValue::from_str(image.repository_name()).ok()?;
        Some([
            (PROOF_REPOSITORY, repository),
            (PROOF_AUTHORIZATION, authorization),
        ])
    }

    /// Whether a request with `headers` may have blocks of `blob`, private to `registry`
    /// (a host as references name it); `certified` says it came over mutual TLS. Returns
    /// whether the registry was asked.
    pub async fn admit(
        &self,
        registry: &str,
        blob: &Digest,
        certified: bool,
        headers: &HeaderMap,
    ) -> Result<bool, Refusal> {
        if !certified {
            return Err(Refusal::NoTls);
        }
        let repository = headers
            .get(PROOF_REPOSITORY)
            .and_then(|value| value.to_str().ok());
        let authorization = headers.get(PROOF_AUTHORIZATION).cloned();
        let (Some(repository), Some(authorization)) = (repository, authorization) else {
            return Err(Refusal::NoProof);
        };
        let Ok(image) = ImageRef::repository(registry, repository) else {
            return Err(Refusal::NoProof);
        };
        let key: ProofKey = (
            blob.clone(),
            image.repository_name().to_owned(),
            Sha256::digest(authorization.as_bytes()).into(),
        );
        let remembered = self.proofs.lock().get(&key).copied();
        if let Some((allowed, at)) = remembered {
            if at.elapsed() < PROOF_TTL {
                return if allowed {
                    Ok(false)
                } else {
                    Err(Refusal::Refused)
                };
            }
        }
        let verdict = self.registry().may_pull(&image, blob, &authorization).await;
        let allowed = match verdict {
            Ok(allowed) => {
                self.proofs.lock().put(key, (allowed, Instant::now()));
                allowed
            }
            Err(error) => {
                // Not remembered: the next request asks again.
                warn!(%blob, error = %crate::with_causes(&error), "cannot check a peer's pull access");
                false
            }
        };
        debug!(%blob, repository = image.repository_name(), allowed, "checked a peer's pull access");
        if allowed {
            Ok(true)
        } else {
            Err(Refusal::Refused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A registry that lets `Basic good` (and nothing else) pull any blob of `team/app`,
    /// counting the checks it answers.
    async fn registry() -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let asked = Arc::new(AtomicU64::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let allowed = request.method() == hyper::Method::HEAD
                        && request
                            .uri()
                            .path()
                            .starts_with("/v2/team/app/blobs/sha256:")
                        && request.headers().get("authorization").map(|v| v.as_bytes())
                            == Some(b"Basic good".as_slice());
                    let status = if allowed { 200 } else { 401 };
                    let reply = hyper::Response::builder()
                        .status(status)
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (host, asked)
    }

    fn gate(host: &str) -> PullGate {
        let config = shoal_config::Config::parse(&format!(
            "[registry.hosts.\"{host}\"]\nplain_http = true\n"
        ))
        .unwrap();
        let client = RegistryClient::with_credentials(
            &config.registry,
            crate::registry::Credentials::default(),
        )
        .unwrap();
        PullGate::new(Arc::new(RwLock::new(client)))
    }

    fn proof(repository: &str, authorization: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(PROOF_REPOSITORY, repository.parse().unwrap());
        headers.insert(PROOF_AUTHORIZATION, HeaderValue::from_static(authorization));
        headers
    }

    #[tokio::test]
    async fn only_a_proof_the_registry_accepts_over_tls_opens_private_blocks() {
        let (host, asked) = registry().await;
        let gate = gate(&host);
        let blob = Digest::of(b"private layer");
        let good = proof("team/app", "Basic good");

        // Without TLS, or without a proof, the registry is not even asked.
        assert_eq!(
            gate.admit(&host, &blob, false, &good).await,
            Err(Refusal::NoTls)
        );
        assert_eq!(
            gate.admit(&host, &blob, true, &HeaderMap::new()).await,
            Err(Refusal::NoProof)
        );
        assert_eq!(asked.load(Ordering::SeqCst), 0);

        // A credential the registry refuses, or one for a repository it does not grant.
        for refused in [
            proof("team/app", "Basic bad"),
            proof("team/other", "Basic good"),
        ] {
            assert_eq!(
                gate.admit(&host, &blob, true, &refused).await,
                Err(Refusal::Refused)
            );
        }
        assert_eq!(asked.load(Ordering::SeqCst), 2);

        // The good proof is checked once, then remembered; a refusal is remembered too.
        assert_eq!(gate.admit(&host, &blob, true, &good).await, Ok(true));
        assert_eq!(gate.admit(&host, &blob, true, &good).await, Ok(false));
        assert_eq!(
            gate.admit(&host, &blob, true, &proof("team/app", "Basic bad"))
                .await,
            Err(Refusal::Refused)
        );
        assert_eq!(asked.load(Ordering::SeqCst), 3);

        // A proof for one blob says nothing about another.
        let other = Digest::of(b"another layer");
        assert_eq!(gate.admit(&host, &other, true, &good).await, Ok(true));
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_registry_that_cannot_be_reached_admits_nobody() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        drop(listener);
        let gate = gate(&host);
        let blob = Digest::of(b"private layer");
        assert_eq!(
            gate.admit(&host, &blob, true, &proof("team/app", "Basic good"))
                .await,
            Err(Refusal::Refused)
        );
    }
}
