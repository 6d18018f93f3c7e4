//! Registry authentication: docker `config.json` credentials (inline, or from the credential
//! helpers it names), `WWW-Authenticate` challenges and the token cache.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::error::CredentialsError;
use super::helper;
use super::sources::CredentialSources;

/// Docker config files are small; a larger one is not a config file.
const MAX_DOCKER_CONFIG_BYTES: u64 = 4 << 20;
/// Lifetime the token spec assumes when a token server does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this long before they expire, so a request does not race the expiry.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// A user name and password for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl Credential {
    /// The credential in a base64 `user:password` text, as docker's `auth` fields and CRI's
    /// `AuthConfig.auth` hold it; `None` when it is not one.
    pub fn decode(encoded: &str) -> Option<Credential> {
        decode_auth("auth", encoded).ok()
    }

    /// The `Authorization: Basic` value for this credential.
    pub fn basic_header(&self) -> HeaderValue {
        let encoded = BASE64.encode(format!("{}:{}", self.username, self.password));
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never let a password reach a log line.
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

/// Credentials by registry host, as a docker `config.json` gives them: a helper for the host
/// (`credHelpers`), else the secret under `auths`, else the default helper (`credsStore`).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, Credential>,
    helpers: HashMap<String, String>,
    store: Option<String>,
    /// Where `docker-credential-<name>` programs are looked for.
    search: Vec<PathBuf>,
    /// The docker config these came from, and whether it existed.
    origin: Option<(PathBuf, bool)>,
    /// Its modification time when read, in seconds since the epoch.
    modified: Option<u64>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// Reads `path`; a missing file means no credentials, as for docker itself.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let read_error = |source| CredentialsError::ReadDockerConfig {
            path: path.to_owned(),
            source,
        };
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials {
                    origin: Some((path.to_owned(), false)),
                    ..Credentials::default()
                })
            }
            Err(error) => return Err(read_error(error)),
        };
        if metadata.len() > MAX_DOCKER_CONFIG_BYTES {
            return Err(CredentialsError::ParseDockerConfig {
                path: path.to_owned(),
                reason: format!("larger than {MAX_DOCKER_CONFIG_BYTES} bytes"),
            });
        }
        let text = std::fs::read(path).map_err(read_error)?;
        let mut credentials =
            Credentials::parse(&text).map_err(|reason| CredentialsError::ParseDockerConfig {
                path: path.to_owned(),
                reason,
            })?;
        credentials.origin = Some((path.to_owned(), true));
        credentials.modified = metadata
            .modified()
            .ok()
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|since| since.as_secs());
        Ok(credentials)
    }

    /// Where credentials for `host` were looked for, for an error that found none.
    pub fn looked_in(&self, host: &str) -> String {
        let host = canonical_host(host);
        let config = match &self.origin {
            Some((path, true)) => format!("{} (no entry for {host})", path.display()),
            Some((path, false)) => format!("{} (absent)", path.display()),
            None => "no docker config".to_owned(),
        };
        match self.helpers.get(&host).or(self.store.as_ref()) {
            Some(helper) => format!("{config} and docker-credential-{helper}"),
            None => config,
        }
    }

    /// Parses the JSON text of a docker `config.json`.
    pub fn parse(text: &[u8]) -> Result<Credentials, String> {
        let config: DockerConfig = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let mut by_host = HashMap::new();
        for (key, auth) in config.auths {
            let credential = match (auth.auth, auth.username, auth.password) {
                (Some(encoded), _, _) if !encoded.is_empty() => decode_auth(&key, &encoded)?,
                (_, Some(username), Some(password)) => Credential { username, password },
                // Entries without secrets (credential helpers) are not ours to use.
                _ => continue,
            };
            by_host.insert(canonical_host(&key), credential);
        }
        let helpers = config
            .cred_helpers
            .into_iter()
            .map(|(host, helper)| (canonical_host(&host), helper))
            .collect();
        Ok(Credentials {
            by_host,
            helpers,
            store: config.creds_store.filter(|store| !store.is_empty()),
            search: helper::search_path(),
            origin: None,
            modified: None,
        })
    }

    /// Where these credentials come from, host by host, without a secret.
    pub fn sources(&self) -> CredentialSources {
        CredentialSources {
            docker_config: self.origin.as_ref().map(|(path, _)| path.clone()),
            found: self.origin.as_ref().is_some_and(|(_, found)| *found),
            modified: self.modified,
            secrets: self.by_host.keys().cloned().collect(),
            helpers: self.helpers.clone().into_iter().collect(),
            store: self.store.clone(),
        }
    }

    /// Looks for credential helpers in `dirs` instead of `PATH`.
    pub fn searching(mut self, dirs: Vec<PathBuf>) -> Credentials {
        self.search = dirs;
        self
    }

    /// The credential for `host`, asking its helper if the configuration names one; `None`
    /// when nothing knows the host.
    pub async fn get(&self, host: &str) -> Result<Option<Credential>, CredentialsError> {
        let host = canonical_host(host);
        if let Some(name) = self.helpers.get(&host) {
            return helper::get(name, &host, &self.search).await;
        }
        if let Some(credential) = self.by_host.get(&host) {
            return Ok(Some(credential.clone()));
        }
        match &self.store {
            Some(name) => helper::get(name, &host, &self.search).await,
            None => Ok(None),
        }
    }
}

fn decode_auth(key: &str, encoded: &str) -> Result<Credential, String> {
    let decoded = BASE64
        .decode(encoded.trim())
        .map_err(|e| format!("auths.\"{key}\".auth is not base64: {e}"))?;
    let text =
        String::from_utf8(decoded).map_err(|_| format!("auths.\"{key}\".auth is not utf-8"))?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| format!("auths.\"{key}\".auth is not `user:password`"))?;
    Ok(Credential {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// `https://index.docker.io/v1/`, `registry-1.docker.io` and `docker.io` are one registry.
pub(super) fn canonical_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest)?;
        let get = |name: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.clone())
        };
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    }
}

/// `key=value` or `key="quoted, value"` pairs separated by commas.
fn parse_params(text: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_owned();
        let after = after.trim_start();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => value.push(chars.next()?.1),
                    (i, '"') => break i + 1,
                    (_, c) => value.push(c),
                }
            };
            (value, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((key, value));
        rest = after.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(params)
}

/// The body a token server answers with.
#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The bearer header value and how long it lives.
    pub fn into_header(self) -> Option<(HeaderValue, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Some((value, lifetime))
    }
}

/// (registry host, repository): what tokens are scoped to.
type Scope = (String, String);

/// `Authorization` values by (registry host, repository), each until it expires.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Scope, CachedAuth>>,
    /// One refresh at a time per scope; one entry per scope ever used.
    refreshes: Mutex<HashMap<Scope, Arc<tokio::sync::Mutex<()>>>>,
    /// Scopes whose registry refused us until we showed a configured credential: private
    /// repositories, whose blocks go only to peers that prove they may pull them. Kept after
    /// their token expires (one entry per scope ever used).
    credentialed: Mutex<HashSet<Scope>>,
}

#[derive(Debug, Clone)]
struct CachedAuth {
    header: HeaderValue,
    expires: Option<Instant>,
    /// Built from a pull secret current in this epoch: it ends with the epoch.
    epoch: Option<u64>,
}

impl TokenCache {
    /// The lock that refreshes of (`host`, `repository`) take, so that readers meeting the
    /// same expiry together fetch one token between them.
    pub fn refresh_lock(&self, host: &str, repository: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.refreshes
            .lock()
            .entry((host.to_owned(), repository.to_owned()))
            .or_default()
            .clone()
    }

    /// The cached value, unless it expired or was built from a pull secret of an epoch
    /// other than `epoch` (the pull secrets' now).
    pub fn get(&self, host: &str, repository: &str, epoch: u64) -> Option<HeaderValue> {
        let mut entries = self.entries.lock();
        let key = (host.to_owned(), repository.to_owned());
        let entry = entries.get(&key)?;
        let expired = entry
            .expires
            .is_some_and(|expires| Instant::now() >= expires);
        if expired || entry.epoch.is_some_and(|built| built != epoch) {
            entries.remove(&key);
            return None;
        }
        Some(entry.header.clone())
    }

    /// Stores `header`; `lifetime` is `None` for basic credentials, which do not expire.
    /// `credentialed` says whether it was obtained with a configured credential (not an
    /// anonymous token); `epoch` is the pull secrets' epoch when it was built from one.
    pub fn insert(
        &self,
        host: &str,
        repository: &str,
        header: HeaderValue,
        lifetime: Option<Duration>,
        credentialed: bool,
        epoch: Option<u64>,
    ) {
        if credentialed {
            self.credentialed
                .lock()
                .insert((host.to_owned(), repository.to_owned()));
        }
        let expires =
            lifetime.map(|lifetime| Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN));
        let mut entries = self.entries.lock();
        entries.insert(
            (host.to_owned(), repository.to_owned()),
            CachedAuth {
                header,
                expires,
                epoch,
            },
        );
    }

    /// Whether (`host`, `repository`) ever needed a configured credential.
    pub fn is_credentialed(&self, host: &str, repository: &str) -> bool {
        self.credentialed
            .lock()
            .contains(&(host.to_owned(), repository.to_owned()))
    }

    /// Removes the value of (`host`, `repository`) if it is still `header`.
    pub fn remove_if(&self, host: &str, repository: &str, header: &HeaderValue) {
        let mut entries = self.entries.lock();
        let key = (host.to_owned(), repository.to_owned());
        if entries
            .get(&key)
            .is_some_and(|entry| entry.header == *header)
        {
            entries.remove(&key);
        }
    }

    pub fn remove(&self, host: &str, repository: &str) {
        let mut entries = self.entries.lock();
        entries.remove(&(host.to_owned(), repository.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#;
        assert_eq!(
            Challenge::parse(header),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse("bearer realm=http://x/t"),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: None,
                scope: None,
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse(r#"Bearer realm="unterminated"#), None);
        assert_eq!(Challenge::parse("Negotiate abc"), None);
    }

    #[test]
    fn reads_docker_config_forms() {
        let text = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
            "reg.example:5000": {"username": "u", "password": "p"},
            "helper.example": {}
        }}"#;
        let credentials = Credentials::parse(text).unwrap();
        let get = |host: &str| futures::executor::block_on(credentials.get(host)).unwrap();
        let hub = get("registry-1.docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(get("reg.example:5000").unwrap().username, "u");
        assert!(get("helper.example").is_none());
        assert!(Credentials::parse(br#"{"auths": {"h": {"auth": "!!"}}}"#).is_err());
        assert!(format!("{hub:?}").contains("redacted"));
    }

    #[tokio::test]
    async fn helpers_come_before_inline_secrets_and_the_store_after_them() {
        let dir = tempfile::tempdir().unwrap();
        for (name, user) in [("special", "from-special"), ("store", "from-store")] {
            let path = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(
                &path,
                format!("#!/bin/sh\nprintf '{{\"Username\":\"{user}\",\"Secret\":\"x\"}}'\n"),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let text = br#"{
            "auths": {"inline.example": {"username": "inline", "password": "p"},
                      "both.example": {"username": "inline", "password": "p"}},
            "credHelpers": {"both.example": "special"},
            "credsStore": "store"
        }"#;
        let credentials = Credentials::parse(text)
            .unwrap()
            .searching(vec![dir.path().to_owned()]);
        let user = |host: &'static str| {
            let credentials = credentials.clone();
            async move { credentials.get(host).await.unwrap().unwrap().username }
        };
        assert_eq!(user("both.example").await, "from-special");
        assert_eq!(user("inline.example").await, "inline");
        assert_eq!(user("elsewhere.example").await, "from-store");
    }

    #[test]
    fn missing_docker_config_is_empty() {
        let credentials = Credentials::load(Path::new("/nonexistent/config.json")).unwrap();
        let got = futures::executor::block_on(credentials.get("docker.io")).unwrap();
        assert!(got.is_none());
    }

    #[test]
    fn tokens_expire() {
        let cache = TokenCache::default();
        let header = HeaderValue::from_static("Bearer t");
        cache.insert(
            "h",
            "r",
            header.clone(),
            Some(Duration::from_secs(1)),
            true,
            None,
        );
        // The expiry margin exceeds the lifetime, so the token is already stale.
        assert!(cache.get("h", "r", 0).is_none());
        // What needed a credential is remembered past its token.
        assert!(cache.is_credentialed("h", "r"));
        cache.insert(
            "h",
            "r",
            header.clone(),
            Some(Duration::from_secs(600)),
            false,
            None,
        );
        assert_eq!(cache.get("h", "r", 0), Some(header.clone()));
        assert!(cache.get("h", "other", 0).is_none());
        cache.insert(
            "h",
            "public",
            HeaderValue::from_static("Bearer a"),
            None,
            false,
            None,
        );
        assert!(!cache.is_credentialed("h", "public"));
    }

    #[test]
    fn what_a_pull_secret_built_ends_with_its_epoch() {
        let cache = TokenCache::default();
        let header = HeaderValue::from_static("Basic dTpw");
        cache.insert("h", "r", header.clone(), None, true, Some(3));
        assert_eq!(cache.get("h", "r", 3), Some(header.clone()));
        assert!(cache.get("h", "r", 4).is_none());
        // Gone for good, not only hidden.
        assert!(cache.get("h", "r", 3).is_none());
        // What no pull secret built lasts through any epoch.
        cache.insert("h", "r", header.clone(), None, true, None);
        assert_eq!(cache.get("h", "r", 9), Some(header));
    }
}
