//! Answering a registry's 401: the one authentication loop that reads and pushes share.
//!
//! A request goes out with the cached `Authorization` of its (host, repository). A 401 is
//! answered once: under the pair's refresh lock, so that readers meeting the same expiry fetch
//! one token between them, a token someone else just fetched is tried first, else the
//! challenge is answered (a bearer token from the realm, or basic credentials). A second 401
//! after our own answer is final.

use std::future::Future;

use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};

use super::auth::{Challenge, Credential, TokenResponse};
use super::error::{CredentialsError, RegistryError};
use super::failure::{CredentialSearch, HttpFailure};
use super::retry::Budget;
use super::transport::BodyPlan;
use super::{Endpoint, RegistryClient, RequestError, MAX_TOKEN_RESPONSE_BYTES};

/// A challenge's answer: the `Authorization` value, how long it may be cached, whether a
/// configured credential went into it, and the pull secrets' epoch it lasts while.
type ChallengeAnswer = (HeaderValue, Option<std::time::Duration>, bool, Option<u64>);

/// The credential a 401 is answered with, and the pull secrets' epoch when it is one.
pub(super) struct Chosen {
    credential: Credential,
    epoch: Option<u64>,
}

/// Where a bearer challenge sends us for a token, and for what.
struct TokenRealm<'a> {
    realm: &'a str,
    service: Option<&'a str>,
    scope: &'a str,
}

/// What a request needs the registry to allow; it decides the scope of a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Reads take the scope the challenge names (`repository:<name>:pull` if none).
    Pull,
    /// Pushes always ask for `repository:<name>:pull,push`, whatever the challenge named, so a
    /// pull-only token cached by earlier reads is replaced once and then serves both.
    Push,
}

impl Access {
    fn scope(self, repository: &str, challenged: Option<&str>) -> String {
        match (self, challenged) {
            (Access::Pull, Some(scope)) => scope.to_owned(),
            (Access::Pull, None) => format!("repository:{repository}:pull"),
            (Access::Push, _) => format!("repository:{repository}:pull,push"),
        }
    }
}

/// The head of a final response, whatever its body.
pub(super) trait Answer {
    fn status(&self) -> StatusCode;
    fn headers(&self) -> &HeaderMap;
}

impl RegistryClient {
    /// Sends with `send(authorization)` until the answer is not a 401, answering a 401 as the
    /// module says. Any other status, success or not, is the caller's to judge.
    pub(super) async fn authorized<A, E, F, Fut>(
        &self,
        endpoint: &Endpoint<'_>,
        repository: &str,
        access: Access,
        budget: Budget,
        mut send: F,
    ) -> Result<A, RequestError<E>>
    where
        A: Answer,
        E: From<RegistryError>,
        F: FnMut(Option<HeaderValue>) -> Fut,
        Fut: Future<Output = Result<A, RequestError<E>>>,
    {
        let tokens = &self.inner.tokens;
        let epoch = || self.inner.pull_secrets.epoch();
        let mut borrowed = false;
        let mut answered = false;
        loop {
            let auth = tokens.get(endpoint.host, repository, epoch());
            let reply = send(auth.clone()).await?;
            if reply.status() != StatusCode::UNAUTHORIZED {
                return Ok(reply);
            }
            // A 401 after our own answer means fresh credentials were refused (or that
            // having none does not do); an earlier one may just mean that none were sent yet
            // or that a token expired before we expected.
            if answered {
                return Err(RequestError::Http(
                    match self
                        .credential(endpoint, repository)
                        .await
                        .map_err(RequestError::widen)?
                    {
                        Some(_) => HttpFailure::Unauthorized,
                        None => self.no_credentials(endpoint, repository),
                    },
                ));
            }
            let refresh = tokens.refresh_lock(endpoint.host, repository);
            let _one_refresh = refresh.lock().await;
            let current = tokens.get(endpoint.host, repository, epoch());
            if !borrowed && current.is_some() && current != auth {
                // Another request refreshed it while this one waited: try that first.
                borrowed = true;
                continue;
            }
            answered = true;
            tokens.remove(endpoint.host, repository);
            let (header, lifetime, credentialed, epoch) = self
                .answer_challenge(endpoint, repository, reply.headers(), access, budget)
                .await
                .map_err(RequestError::widen)?;
            tokens.insert(
                endpoint.host,
                repository,
                header,
                lifetime,
                credentialed,
                epoch,
            );
        }
    }

    /// The credential for `repository` on `endpoint`'s host: the latest pull secret of the
    /// repository (the one kubelet pulled the image with), else the one the docker config
    /// names for the host (a helper's is asked for afresh, for those may rotate), if any.
    pub(super) async fn credential(
        &self,
        endpoint: &Endpoint<'_>,
        repository: &str,
    ) -> Result<Option<Chosen>, RequestError> {
        if let Some(found) = self.inner.pull_secrets.find(endpoint.host, repository) {
            return Ok(Some(Chosen {
                credential: found.credential,
                epoch: Some(found.epoch),
            }));
        }
        let complete = |error: CredentialsError| RequestError::Complete(error.into());
        let mut credential = self
            .inner
            .credentials
            .get(endpoint.host)
            .await
            .map_err(complete)?;
        if let (None, Some(providers)) = (&credential, &self.inner.providers) {
            credential = providers
                .get(endpoint.host, repository)
                .await
                .map_err(complete)?;
        }
        Ok(credential.map(|credential| Chosen {
            credential,
            epoch: None,
        }))
    }

    pub(super) fn no_credentials(&self, endpoint: &Endpoint<'_>, repository: &str) -> HttpFailure {
        let mut looked_in = self.inner.credentials.looked_in(endpoint.host);
        if let Some(providers) = &self.inner.providers {
            looked_in = format!(
                "{looked_in}, credential providers {}",
                providers.names().join(", ")
            );
        }
        if let Some(secrets) = self.inner.pull_secrets.looked_in(endpoint.host, repository) {
            looked_in = format!("{secrets}, {looked_in}");
        }
        HttpFailure::NoCredentials {
            searched: Box::new(CredentialSearch {
                host: endpoint.host.to_owned(),
                looked_in,
            }),
        }
    }

    /// Answers a 401's challenge with the `Authorization` value to retry with, how long it
    /// may be cached (a token's lifetime; basic credentials do not expire), whether a
    /// configured credential went into it (else it is an anonymous token), and the pull
    /// secrets' epoch it lasts while, when a pull secret answered it.
    async fn answer_challenge(
        &self,
        endpoint: &Endpoint<'_>,
        repository: &str,
        headers: &HeaderMap,
        access: Access,
        budget: Budget,
    ) -> Result<ChallengeAnswer, RequestError> {
        let values: Vec<&str> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let challenges: Vec<Challenge> =
            values.iter().filter_map(|v| Challenge::parse(v)).collect();
        let chosen = self.credential(endpoint, repository).await?;
        let epoch = chosen.as_ref().and_then(|chosen| chosen.epoch);
        let credential = chosen.as_ref().map(|chosen| &chosen.credential);
        let bearer = challenges.iter().find_map(|challenge| match challenge {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic => None,
        });
        if let Some((realm, service, scope)) = bearer {
            let scope = access.scope(repository, scope.as_deref());
            let (header, lifetime) = self
                .fetch_token(
                    endpoint,
                    repository,
                    TokenRealm {
                        realm,
                        service: service.as_deref(),
                        scope: &scope,
                    },
                    credential,
                    budget,
                )
                .await?;
            return Ok((header, Some(lifetime), credential.is_some(), epoch));
        }
        match (challenges.first(), credential) {
            (Some(Challenge::Basic), Some(credential)) => {
                Ok((credential.basic_header(), None, true, epoch))
            }
            (Some(Challenge::Basic), None) => Err(RequestError::Http(
                self.no_credentials(endpoint, repository),
            )),
            _ => Err(RequestError::Http(HttpFailure::Challenge {
                header: values.join(", ").chars().take(200).collect(),
            })),
        }
    }

    async fn fetch_token(
        &self,
        endpoint: &Endpoint<'_>,
        repository: &str,
        asked: TokenRealm<'_>,
        credential: Option<&Credential>,
        budget: Budget,
    ) -> Result<(HeaderValue, std::time::Duration), RequestError> {
        let TokenRealm {
            realm,
            service,
            scope,
        } = asked;
        let fail = |cause| {
            RequestError::Complete(RegistryError::FetchToken {
                url: realm.to_owned(),
                cause,
            })
        };
        let mut url = Url::parse(realm).map_err(|e| {
            fail(HttpFailure::Malformed {
                reason: format!("realm: {e}"),
            })
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail(HttpFailure::Malformed {
                reason: "realm is not http(s)".to_owned(),
            }));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        // The realm is a different server: it gets the registry's TLS settings but only the
        // basic credential, which is what token servers exchange for a token.
        let basic = credential.map(Credential::basic_header);
        let plan = BodyPlan::Full {
            limit: MAX_TOKEN_RESPONSE_BYTES,
        };
        let reply = self
            .send_with_retries(
                endpoint.client,
                &url,
                &HeaderMap::new(),
                basic.as_ref(),
                &plan,
                budget,
            )
            .await
            .map_err(|error| match error {
                RequestError::Http(cause) => fail(cause),
                other => other,
            })?;
        if !reply.status.is_success() {
            if reply.status == StatusCode::UNAUTHORIZED && credential.is_none() {
                return Err(RequestError::Http(
                    self.no_credentials(endpoint, repository),
                ));
            }
            return Err(fail(HttpFailure::Status {
                status: reply.status.as_u16(),
            }));
        }
        let response: TokenResponse = serde_json::from_slice(&reply.body).map_err(|e| {
            fail(HttpFailure::Malformed {
                reason: format!("token json: {e}"),
            })
        })?;
        response.into_header().ok_or_else(|| {
            fail(HttpFailure::Malformed {
                reason: "token response has no usable token".to_owned(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Access;

    #[test]
    fn pushes_ask_for_push_scope_whatever_the_challenge_named() {
        let named = Some("repository:team/app:pull");
        assert_eq!(
            Access::Pull.scope("team/app", named),
            "repository:team/app:pull"
        );
        assert_eq!(
            Access::Pull.scope("team/app", None),
            "repository:team/app:pull"
        );
        assert_eq!(
            Access::Push.scope("team/app", named),
            "repository:team/app:pull,push"
        );
    }
}
