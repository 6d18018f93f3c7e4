//! kubelet's `CredentialProviderConfig` (`kubelet.config.k8s.io/v1`), YAML or JSON, as kubelet's
//! `--image-credential-provider-config` names it.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::super::error::CredentialsError;
use super::duration;

const CONFIG_API_VERSION: &str = "kubelet.config.k8s.io/v1";
const CONFIG_KIND: &str = "CredentialProviderConfig";
/// The exec protocol version Shoal speaks.
pub const PLUGIN_API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";
/// Provider configs are small; a larger file is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// One plugin, as the config describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The executable's name in the plugin directory, and the plugin's name in errors.
    pub name: String,
    /// Image patterns this plugin serves (see [`super::matching`]).
    pub match_images: Vec<String>,
    /// How long an answer is cached when the plugin does not say.
    pub default_cache_duration: Duration,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProvider {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: String,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
}

#[derive(Deserialize)]
struct RawEnv {
    name: String,
    value: String,
}

/// Reads and checks the config at `path`.
pub fn load(path: &Path) -> Result<Vec<Provider>, CredentialsError> {
    let parse_error = |reason: String| CredentialsError::ParseProviderConfig {
        path: path.to_owned(),
        reason,
    };
    let read_error = |source| CredentialsError::ReadProviderConfig {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(parse_error(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    let text = std::fs::read(path).map_err(read_error)?;
    parse(&text).map_err(parse_error)
}

/// Parses a config's text (JSON is YAML too).
pub fn parse(text: &[u8]) -> Result<Vec<Provider>, String> {
    let raw: RawConfig = serde_yaml::from_slice(text).map_err(|e| e.to_string())?;
    if raw.api_version != CONFIG_API_VERSION || raw.kind != CONFIG_KIND {
        return Err(format!(
            "expected apiVersion {CONFIG_API_VERSION} and kind {CONFIG_KIND}, found {} {}",
            raw.api_version, raw.kind
        ));
    }
    let mut providers = Vec::new();
    for raw in raw.providers {
        let field = |what: &str| format!("provider `{}`: {what}", raw.name);
        if raw.name.is_empty() || raw.name.contains('/') || raw.name == "." || raw.name == ".." {
            return Err(format!("provider name `{}` is not a file name", raw.name));
        }
        if raw.api_version != PLUGIN_API_VERSION {
            return Err(field(&format!(
                "apiVersion {} is not {PLUGIN_API_VERSION}",
                raw.api_version
            )));
        }
        if raw.match_images.is_empty() {
            return Err(field("matchImages is empty"));
        }
        let default_cache_duration = duration::parse(&raw.default_cache_duration)
            .map_err(|why| field(&format!("defaultCacheDuration: {why}")))?;
        providers.push(Provider {
            name: raw.name,
            match_images: raw.match_images,
            default_cache_duration,
            args: raw.args,
            env: raw.env.into_iter().map(|e| (e.name, e.value)).collect(),
        });
    }
    Ok(providers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kubelets_yaml() {
        let text = br#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "reg.example:5000"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: node
"#;
        let providers = parse(text).unwrap();
        assert_eq!(providers.len(), 1);
        let ecr = &providers[0];
        assert_eq!(ecr.name, "ecr-credential-provider");
        assert_eq!(ecr.match_images.len(), 2);
        assert_eq!(ecr.default_cache_duration, Duration::from_secs(12 * 3600));
        assert_eq!(ecr.args, ["get-credentials"]);
        assert_eq!(ecr.env, [("AWS_PROFILE".to_owned(), "node".to_owned())]);
    }

    #[test]
    fn refuses_what_kubelet_refuses() {
        let provider = |name: &str, api: &str, images: &str, cache: &str| {
            format!(
                r#"{{"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
                "providers": [{{"name": "{name}", "apiVersion": "{api}", "matchImages": {images},
                "defaultCacheDuration": "{cache}"}}]}}"#
            )
        };
        let v1 = PLUGIN_API_VERSION;
        for (text, expected) in [
            (provider("p", v1, r#"["r"]"#, "1m"), None),
            (
                provider("../p", v1, r#"["r"]"#, "1m"),
                Some("not a file name"),
            ),
            (
                provider(
                    "p",
                    "credentialprovider.kubelet.k8s.io/v1alpha1",
                    r#"["r"]"#,
                    "1m",
                ),
                Some("apiVersion"),
            ),
            (provider("p", v1, "[]", "1m"), Some("matchImages is empty")),
            (
                provider("p", v1, r#"["r"]"#, "soon"),
                Some("defaultCacheDuration"),
            ),
            (
                r#"{"apiVersion": "v1", "kind": "Pod"}"#.to_owned(),
                Some("expected apiVersion"),
            ),
        ] {
            match (parse(text.as_bytes()), expected) {
                (Ok(_), None) => {}
                (Err(error), Some(expected)) => assert!(error.contains(expected), "{error}"),
                (result, expected) => panic!("{text}: {:?}, expected {expected:?}", result.err()),
            }
        }
    }
}
