//! One run of a credential provider plugin: `<bin_dir>/<name> <args...>` with the provider's
//! environment added, a `CredentialProviderRequest` on stdin and a `CredentialProviderResponse`
//! on stdout (`credentialprovider.kubelet.k8s.io/v1`). A plugin that has not answered within
//! the timeout is killed, with every process it started (its own process group).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::super::auth::Credential;
use super::super::error::CredentialsError;
use super::config::{Provider, PLUGIN_API_VERSION};
use super::duration;

/// Answers are a few kilobytes; more is not an answer.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What the cached answer is keyed by, as the plugin says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum CacheKeyType {
    /// This image only.
    Image,
    /// Every image of the registry.
    Registry,
    /// Every image the provider matches.
    Global,
}

/// A plugin's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub cache_key_type: CacheKeyType,
    /// `None`: the provider's `defaultCacheDuration`.
    pub cache_duration: Option<Duration>,
    /// Credentials by image pattern.
    pub auth: BTreeMap<String, Credential>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAnswer {
    kind: String,
    api_version: String,
    cache_key_type: CacheKeyType,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, RawAuth>,
}

#[derive(Deserialize)]
struct RawAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// Runs `provider` for `image` (`host/repository`).
pub async fn run(
    provider: &Provider,
    bin_dir: &Path,
    image: &str,
    timeout: Duration,
) -> Result<Answer, CredentialsError> {
    let fail = |reason: String| CredentialsError::CredentialProvider {
        provider: provider.name.clone(),
        image: image.to_owned(),
        reason,
    };
    let program = bin_dir.join(&provider.name);
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&provider.args)
        .envs(provider.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = spawn(&mut command)
        .await
        .map_err(|e| fail(format!("start {}: {e}", program.display())))?;
    let group = child.id();
    let request = serde_json::json!({
        "kind": "CredentialProviderRequest",
        "apiVersion": PLUGIN_API_VERSION,
        "image": image,
    });
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading its input still gets to answer.
        let _ = stdin.write_all(request.to_string().as_bytes()).await;
    }
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.map_err(|e| fail(format!("wait: {e}")))?,
        Err(_) => {
            if let Some(pid) = group.and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(fail(format!("no answer within {timeout:?}; killed")));
        }
    };
    if !output.status.success() {
        let said: String = String::from_utf8_lossy(&output.stderr)
            .trim()
            .chars()
            .take(200)
            .collect();
        return Err(fail(format!("exited with {}: {said}", output.status)));
    }
    if output.stdout.len() > MAX_ANSWER_BYTES {
        return Err(fail(format!("answered more than {MAX_ANSWER_BYTES} bytes")));
    }
    let raw: RawAnswer = serde_json::from_slice(&output.stdout)
        .map_err(|e| fail(format!("unreadable answer: {e}")))?;
    if raw.kind != "CredentialProviderResponse" || raw.api_version != PLUGIN_API_VERSION {
        return Err(fail(format!(
            "answered {} {}, not CredentialProviderResponse {PLUGIN_API_VERSION}",
            raw.kind, raw.api_version
        )));
    }
    let cache_duration = raw
        .cache_duration
        .map(|text| duration::parse(&text))
        .transpose()
        .map_err(|why| fail(format!("cacheDuration: {why}")))?;
    Ok(Answer {
        cache_key_type: raw.cache_key_type,
        cache_duration,
        auth: raw
            .auth
            .into_iter()
            .map(|(pattern, auth)| {
                (
                    pattern,
                    Credential {
                        username: auth.username,
                        password: auth.password,
                    },
                )
            })
            .collect(),
    })
}

/// Starts `command`, again a few times while the program is busy being written (ETXTBSY: a
/// plugin being replaced, or a writer's descriptor that a process forked elsewhere in this
/// daemon holds until it execs).
async fn spawn(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match command.spawn() {
            Err(error)
                if error.raw_os_error() == Some(nix::libc::ETXTBSY) && attempt < ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            spawned => return spawned,
        }
    }
}
