//! Docker credential helpers (`credsStore`, `credHelpers` in `config.json`): the program
//! `docker-credential-<name>`, run as `get` with the registry's server URL on stdin, answers
//! `{"ServerURL": .., "Username": .., "Secret": ..}` on stdout, or fails saying the
//! credentials are not found.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::auth::Credential;
use super::error::CredentialsError;

/// A helper that has not answered by then is not going to (it may be waiting on a prompt).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Helpers answer with a few hundred bytes; more is not an answer.
const MAX_ANSWER_BYTES: usize = 64 << 10;

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The directories of `PATH`, where helpers are looked up.
pub fn search_path() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default()
}

/// What helper `name` knows for `host`: `None` when it has no credentials for it.
pub async fn get(
    name: &str,
    host: &str,
    search: &[PathBuf],
) -> Result<Option<Credential>, CredentialsError> {
    let fail = |reason: String| CredentialsError::CredentialHelper {
        helper: name.to_owned(),
        host: host.to_owned(),
        reason,
    };
    let program = format!("docker-credential-{name}");
    let path = find(&program, search)
        .ok_or_else(|| fail(format!("{program} is not in the search path")))?;
    let mut child = tokio::process::Command::new(&path)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("start {}: {e}", path.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input still gets to answer.
        let _ = stdin.write_all(server_url(host).as_bytes()).await;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| fail(format!("no answer within {HELPER_TIMEOUT:?}")))?
        .map_err(|e| fail(format!("wait: {e}")))?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        if said.to_ascii_lowercase().contains("not found") {
            return Ok(None);
        }
        let said: String = said.trim().chars().take(200).collect();
        return Err(fail(format!("exited with {}: {said}", output.status)));
    }
    if output.stdout.len() > MAX_ANSWER_BYTES {
        return Err(fail(format!("answered more than {MAX_ANSWER_BYTES} bytes")));
    }
    let answer: Answer = serde_json::from_slice(&output.stdout)
        .map_err(|e| fail(format!("unreadable answer: {e}")))?;
    Ok(Some(Credential {
        username: answer.username,
        password: answer.secret,
    }))
}

/// The server URL docker hands helpers: Docker Hub under its historical name, other
/// registries by host.
fn server_url(host: &str) -> String {
    match host {
        "docker.io" => "https://index.docker.io/v1/".to_owned(),
        other => other.to_owned(),
    }
}

fn find(program: &str, search: &[PathBuf]) -> Option<PathBuf> {
    search
        .iter()
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A helper that knows one registry, echoes what it was asked in the username, and
    /// fails like the real ones for any other.
    fn helper(dir: &Path, name: &str, body: &str) {
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn a_helper_answers_known_registries_and_not_others() {
        let dir = tempfile::tempdir().unwrap();
        helper(
            dir.path(),
            "fake",
            r#"read server
case "$server" in
  reg.example:5000|https://index.docker.io/v1/)
    printf '{"ServerURL":"%s","Username":"robot","Secret":"s3cret"}' "$server" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#,
        );
        let search = [dir.path().to_owned()];
        let found = get("fake", "reg.example:5000", &search).await.unwrap();
        let found = found.expect("credentials for a known registry");
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("robot", "s3cret")
        );
        assert!(get("fake", "docker.io", &search).await.unwrap().is_some());
        assert!(get("fake", "other.example", &search)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_missing_broken_or_garbled_helper_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "broken", "echo 'keychain locked' >&2; exit 3");
        helper(dir.path(), "garbled", "echo 'not json'");
        let search = [dir.path().to_owned()];
        for (name, expected) in [
            ("absent", "not in the search path"),
            ("broken", "keychain locked"),
            ("garbled", "unreadable answer"),
        ] {
            let error = get(name, "reg.example", &search).await.unwrap_err();
            let text = error.to_string();
            assert!(
                text.contains(expected) && text.contains(name) && text.contains("reg.example"),
                "{text}"
            );
        }
    }
}
