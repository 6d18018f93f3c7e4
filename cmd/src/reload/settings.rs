//! `<socket>.settings.json`: how the daemon reads registries now (its config file, each
//! configured host's settings, where credentials come from, never a secret), for `shoal rpull`
//! to compare with its own. Beside the socket like the reload outcome, for the same reason: a
//! client finds the daemon by its socket, whatever config file it read itself. Stamped with the
//! daemon's pid, which a reader checks against the socket's listener, so a file a dead daemon
//! left is never believed; rewritten at start and by every accepted reload; root's alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use shoal_config::{Config, HostConfig};
use shoal_fetcher::CredentialSources;

/// What the daemon reads registries with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonSettings {
    pub pid: u32,
    /// The config file the daemon read, as [`config_source`] names it.
    pub config: String,
    /// `[registry.hosts]` as in force.
    pub hosts: BTreeMap<String, HostSettings>,
    pub credentials: CredentialSources,
}

/// One host's `[registry.hosts."HOST"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostSettings {
    pub plain_http: bool,
    pub insecure_skip_verify: bool,
    pub ca: Option<PathBuf>,
    pub mirrors: Vec<String>,
}

impl From<&HostConfig> for HostSettings {
    fn from(host: &HostConfig) -> HostSettings {
        HostSettings {
            plain_http: host.plain_http,
            insecure_skip_verify: host.insecure_skip_verify,
            ca: host.ca.clone(),
            mirrors: host.mirrors.clone(),
        }
    }
}

/// The config file `--config` names, else the default one, or the built-in defaults.
pub fn config_source(path: Option<&Path>) -> String {
    match path {
        Some(path) => path.display().to_string(),
        None if Path::new(crate::DEFAULT_CONFIG).exists() => crate::DEFAULT_CONFIG.to_owned(),
        None => format!("the built-in defaults (no {})", crate::DEFAULT_CONFIG),
    }
}

pub fn path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".settings.json");
    PathBuf::from(name)
}

impl DaemonSettings {
    pub fn of(config: &Config, source: String, credentials: CredentialSources) -> Self {
        DaemonSettings {
            pid: std::process::id(),
            config: source,
            hosts: config
                .registry
                .hosts
                .iter()
                .map(|(name, host)| (name.clone(), HostSettings::from(host)))
                .collect(),
            credentials,
        }
    }

    /// `host`'s settings, the defaults when the config names none.
    pub fn host(&self, host: &str) -> HostSettings {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    /// Replaces the file whole (written beside it, then renamed); 0600 from its creation. Not
    /// fsynced: it only reports, and every start writes it again, before binding the socket.
    pub fn write(&self, socket: &Path) -> anyhow::Result<()> {
        let path = path(socket);
        let mut staged = path.clone().into_os_string();
        staged.push(".tmp");
        let staged = PathBuf::from(staged);
        let text = serde_json::to_vec(self).context("encode the daemon's settings")?;
        // Written before the socket is bound, which makes its directory too.
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&staged);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .and_then(|mut file| file.write_all(&text))
            .with_context(|| format!("write {}", staged.display()))?;
        std::fs::rename(&staged, &path)
            .with_context(|| format!("rename {} to {}", staged.display(), path.display()))
    }

    /// The settings of the daemon listening on `socket` now; none when there is no such file,
    /// it does not parse, or another process wrote it.
    pub fn read_live(socket: &Path) -> Option<DaemonSettings> {
        let pid = super::request::listener_pid(socket).ok()?;
        let text = std::fs::read(path(socket)).ok()?;
        let settings: DaemonSettings = serde_json::from_slice(&text).ok()?;
        (settings.pid == pid).then_some(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_back_only_from_the_live_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shoal.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let config =
            Config::parse("[registry.hosts.\"r.example:5000\"]\nplain_http = true\n").unwrap();
        let mut settings = DaemonSettings::of(&config, "c.toml".into(), Default::default());
        settings.write(&socket).unwrap();
        assert_eq!(DaemonSettings::read_live(&socket), Some(settings.clone()));
        assert!(settings.host("r.example:5000").plain_http);
        assert_eq!(settings.host("other"), HostSettings::default());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(&socket))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Written by another process: not this listener's.
        settings.pid += 1;
        settings.write(&socket).unwrap();
        assert_eq!(DaemonSettings::read_live(&socket), None);
    }
}
