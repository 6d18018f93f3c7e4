//! What of a CRI `AuthConfig` Shoal can read registries with.

use k8s_cri::v1::AuthConfig;
use shoal_fetcher::Credential;

/// The credential a `PullImage` carried, as far as Shoal can use it.
#[derive(Debug, PartialEq, Eq)]
pub enum PullAuth {
    /// A user name and password (given as such, or base64 in `auth`).
    Basic(Credential),
    /// Only a token Shoal cannot answer a challenge with (`identity_token`, an OAuth2 refresh
    /// token; `registry_token`, a bearer token for containerd's own requests).
    Unusable(&'static str),
    /// No credentials at all: the image is public, or containerd has its own.
    Absent,
}

impl PullAuth {
    pub fn of(auth: Option<&AuthConfig>) -> PullAuth {
        let Some(auth) = auth else {
            return PullAuth::Absent;
        };
        if !auth.username.is_empty() && !auth.password.is_empty() {
            return PullAuth::Basic(Credential {
                username: auth.username.clone(),
                password: auth.password.clone(),
            });
        }
        if !auth.auth.is_empty() {
            return match Credential::decode(&auth.auth) {
                Some(credential) => PullAuth::Basic(credential),
                None => PullAuth::Unusable("`auth` is not base64 of `user:password`"),
            };
        }
        if !auth.identity_token.is_empty() {
            return PullAuth::Unusable("only an identity token");
        }
        if !auth.registry_token.is_empty() {
            return PullAuth::Unusable("only a registry token");
        }
        PullAuth::Absent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> PullAuth {
        PullAuth::Basic(Credential {
            username: user.into(),
            password: password.into(),
        })
    }

    #[test]
    fn every_form_kubelet_sends_is_read_or_named() {
        assert_eq!(PullAuth::of(None), PullAuth::Absent);
        assert_eq!(PullAuth::of(Some(&AuthConfig::default())), PullAuth::Absent);
        let given = AuthConfig {
            username: "robot".into(),
            password: "pw".into(),
            ..AuthConfig::default()
        };
        assert_eq!(PullAuth::of(Some(&given)), basic("robot", "pw"));
        // kubelet's own form for a docker config secret: `auth` only.
        let encoded = AuthConfig {
            auth: "cm9ib3Q6cDp3".into(),
            server_address: "reg.example".into(),
            ..AuthConfig::default()
        };
        assert_eq!(PullAuth::of(Some(&encoded)), basic("robot", "p:w"));
        let garbled = AuthConfig {
            auth: "!!".into(),
            ..AuthConfig::default()
        };
        assert!(matches!(
            PullAuth::of(Some(&garbled)),
            PullAuth::Unusable(_)
        ));
        let token = AuthConfig {
            identity_token: "t".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            PullAuth::of(Some(&token)),
            PullAuth::Unusable("only an identity token")
        );
    }
}
