//! Where credentials come from, without a secret: what a daemon tells a client that wants to
//! know whether both of them would send a registry the same credentials.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The sources a docker `config.json` gives, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialSources {
    /// The docker config read; none: credentials given otherwise (tests).
    pub docker_config: Option<PathBuf>,
    /// Whether it existed.
    pub found: bool,
    /// Its modification time when it was read, in seconds since the epoch.
    pub modified: Option<u64>,
    /// Hosts with a secret under `auths` (the host names only).
    pub secrets: BTreeSet<String>,
    /// `credHelpers`: a helper per host.
    pub helpers: BTreeMap<String, String>,
    /// `credsStore`: the helper of every other host.
    pub store: Option<String>,
}

impl CredentialSources {
    /// Where the credential for `host` comes from, in the order [`Credentials::get`] asks:
    /// `credential helper docker-credential-NAME`, `docker config PATH`, or `none`.
    ///
    /// [`Credentials::get`]: super::Credentials::get
    pub fn for_host(&self, host: &str) -> String {
        let host = super::auth::canonical_host(host);
        let helper = |name: &String| format!("credential helper docker-credential-{name}");
        if let Some(name) = self.helpers.get(&host) {
            return helper(name);
        }
        if self.secrets.contains(&host) {
            return match &self.docker_config {
                Some(path) => format!("docker config {}", path.display()),
                None => "docker config".to_owned(),
            };
        }
        self.store
            .as_ref()
            .map_or_else(|| "none".to_owned(), helper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Credentials;

    #[test]
    fn each_host_is_named_with_the_source_asked_first() {
        let credentials = Credentials::parse(
            br#"{"auths": {"a.example": {"auth": "dTpw"}, "b.example": {"auth": "dTpw"}},
                "credHelpers": {"b.example": "gcr"}, "credsStore": "pass"}"#,
        )
        .unwrap();
        let sources = credentials.sources();
        assert!(!format!("{sources:?}").contains("dTpw"), "{sources:?}");
        assert_eq!(
            sources.for_host("b.example"),
            "credential helper docker-credential-gcr"
        );
        assert_eq!(
            sources.for_host("c.example"),
            "credential helper docker-credential-pass"
        );
        // Inline secrets come before the store.
        assert_eq!(sources.for_host("a.example"), "docker config");
        let loaded = CredentialSources {
            docker_config: Some("/root/.docker/config.json".into()),
            store: None,
            ..sources
        };
        assert_eq!(
            loaded.for_host("a.example"),
            "docker config /root/.docker/config.json"
        );
        assert_eq!(loaded.for_host("c.example"), "none");
    }
}
