//! The providers against real plugin scripts (`/bin/sh`) in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::CredentialProviders;

/// A plugin that appends its stdin to `calls` in `dir` and answers `answer`.
fn plugin(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn config(name: &str, images: &str, cache: &str) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: {name}
    matchImages: [{images}]
    defaultCacheDuration: "{cache}"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: ["get-credentials", "--region=test"]
    env:
      - name: TOKEN_PREFIX
        value: tok
"#
    )
}

/// An answer with `user` for `pattern`, cached as `key` for `duration` (none: omitted).
fn answer(pattern: &str, key: &str, duration: Option<&str>) -> String {
    let duration = duration.map_or(String::new(), |d| format!(r#""cacheDuration": "{d}","#));
    format!(
        r#"cat >> "$(dirname "$0")/calls"; echo >> "$(dirname "$0")/calls"
printf '%s' '{{"kind": "CredentialProviderResponse", "apiVersion": "credentialprovider.kubelet.k8s.io/v1", "cacheKeyType": "{key}", {duration} "auth": {{"{pattern}": {{"username": "AWS", "password": "'"$TOKEN_PREFIX-$1-$2"'"}}}}}}'"#
    )
}

fn calls(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn a_matching_plugin_is_run_with_its_args_and_env_and_its_answer_cached() {
    let dir = tempfile::tempdir().unwrap();
    plugin(
        dir.path(),
        "ecr",
        &answer("*.ecr.example", "Registry", None),
    );
    let providers = CredentialProviders::parse(
        config("ecr", r#""*.ecr.example""#, "1h").as_bytes(),
        dir.path(),
    )
    .unwrap();

    let got = providers.get("123.ecr.example", "team/app").await.unwrap();
    let got = got.expect("a credential from the plugin");
    assert_eq!(got.username, "AWS");
    assert_eq!(got.password, "tok-get-credentials---region=test");
    let asked = calls(dir.path());
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["kind"], "CredentialProviderRequest");
    assert_eq!(
        asked[0]["apiVersion"],
        "credentialprovider.kubelet.k8s.io/v1"
    );
    assert_eq!(asked[0]["image"], "123.ecr.example/team/app");

    // Cached by registry: another repository of the host does not run the plugin again.
    assert!(providers
        .get("123.ecr.example", "other")
        .await
        .unwrap()
        .is_some());
    assert_eq!(calls(dir.path()).len(), 1);
    // Images it does not match never run it.
    assert!(providers
        .get("gcr.example", "team/app")
        .await
        .unwrap()
        .is_none());
    assert_eq!(calls(dir.path()).len(), 1);
}

#[tokio::test]
async fn the_cache_lasts_as_long_as_the_plugin_says() {
    let dir = tempfile::tempdir().unwrap();
    // The plugin says 0s, over the provider's default of an hour: never cached.
    plugin(dir.path(), "p", &answer("reg.example", "Image", Some("0s")));
    let providers =
        CredentialProviders::parse(config("p", r#""reg.example""#, "1h").as_bytes(), dir.path())
            .unwrap();
    for _ in 0..2 {
        assert!(providers.get("reg.example", "app").await.unwrap().is_some());
    }
    assert_eq!(calls(dir.path()).len(), 2);

    // Keyed by image: each repository has its own answer.
    let dir = tempfile::tempdir().unwrap();
    plugin(dir.path(), "p", &answer("reg.example", "Image", Some("1h")));
    let providers =
        CredentialProviders::parse(config("p", r#""reg.example""#, "0s").as_bytes(), dir.path())
            .unwrap();
    for repository in ["a", "a", "b"] {
        assert!(providers
            .get("reg.example", repository)
            .await
            .unwrap()
            .is_some());
    }
    assert_eq!(calls(dir.path()).len(), 2);
}

#[tokio::test]
async fn an_answer_for_other_images_is_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    plugin(
        dir.path(),
        "p",
        &answer("elsewhere.example", "Global", None),
    );
    let providers =
        CredentialProviders::parse(config("p", r#""reg.example""#, "1h").as_bytes(), dir.path())
            .unwrap();
    assert!(providers.get("reg.example", "app").await.unwrap().is_none());
}

#[tokio::test]
async fn a_failing_garbled_missing_or_hanging_plugin_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    plugin(
        dir.path(),
        "broken",
        "echo 'token service down' >&2; exit 3",
    );
    plugin(dir.path(), "garbled", "echo 'not json'");
    plugin(
        dir.path(),
        "wrong",
        r#"echo '{"kind": "CredentialProviderResponse", "apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1", "cacheKeyType": "Image"}'"#,
    );
    // A plugin whose own child hangs: the whole process group is killed, not the shell alone.
    plugin(dir.path(), "hangs", "sleep 60 & wait");
    for (name, expected) in [
        ("broken", "token service down"),
        ("garbled", "unreadable answer"),
        ("wrong", "v1alpha1"),
        ("absent", "start"),
        ("hangs", "no answer within"),
    ] {
        let providers = CredentialProviders::parse(
            config(name, r#""reg.example""#, "1h").as_bytes(),
            dir.path(),
        )
        .unwrap()
        .with_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let error = providers.get("reg.example", "app").await.unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&format!("credential provider `{name}`"))
                && text.contains("reg.example/app")
                && text.contains(expected),
            "{text}"
        );
        // The timeout bounds a hanging plugin (generously: a loaded machine starts sh slowly).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} took {:?}",
            started.elapsed()
        );
    }
}
