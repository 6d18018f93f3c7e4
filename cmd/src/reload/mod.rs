//! Reloading the daemon's configuration on SIGHUP (sent by `shoal reload` or by hand).
//!
//! The file the daemon started with is read again and validated whole; an invalid one is
//! rejected, logged, and the configuration in force stays. A valid one is taken where a running
//! daemon can take it safely (registry hosts, mirrors, credentials, timeouts, log level, cache
//! cap, and the prefetch of layers mounted from then on); every other difference is named as
//! needing a restart, with why, and left as it was. Each reload logs one line and leaves its
//! outcome in `<socket>.reload.json` ([`outcome`]).

mod changes;
pub mod outcome;
pub mod request;
pub mod settings;

use std::path::PathBuf;

use anyhow::Context;
use shoal_config::Config;
use shoal_fetcher::Fetcher;
use shoal_snapshotter::{MountPolicy, MountSettings};
use tracing::{info, warn};

pub use changes::Changes;
pub use outcome::Outcome;
pub use settings::DaemonSettings;

use crate::logging::LogLevel;

/// What a reload can change, and the configuration in force.
pub struct Reloader {
    /// The file given with `--config` (none: the default file, if it exists).
    path: Option<PathBuf>,
    current: Config,
    fetcher: Fetcher,
    /// What layers are opened and mounted with.
    policy: MountPolicy,
    log: LogLevel,
    generation: u64,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        current: Config,
        fetcher: Fetcher,
        policy: MountPolicy,
        log: LogLevel,
    ) -> Self {
        let reloader = Reloader {
            path,
            current,
            fetcher,
            policy,
            log,
            generation: 0,
        };
        reloader.publish();
        reloader
    }

    /// Writes what the daemon reads registries with now, for `shoal rpull` to compare.
    fn publish(&self) {
        let settings = DaemonSettings::of(
            &self.current,
            settings::config_source(self.path.as_deref()),
            self.fetcher.credential_sources(),
        );
        if let Err(error) = settings.write(&self.current.socket) {
            warn!(
                error = format!("{error:#}"),
                "cannot record the registry settings for shoal rpull"
            );
        }
    }

    /// Reads the file again and applies what it can; logs the outcome and writes it for
    /// `shoal reload`. Blocking: reads files, and a smaller cache cap evicts at once.
    pub fn reload(&mut self) -> Outcome {
        self.generation += 1;
        let source = self.source();
        let (accepted, message) = match self.apply() {
            Ok(changes) => {
                self.publish();
                let message = describe(&source, &changes);
                info!(
                    config = %source,
                    changed = %fields(&changes.applied),
                    restart_needed = %fields(&changes.restart_fields()),
                    "config reloaded"
                );
                (true, message)
            }
            Err(error) => {
                let error = format!("{error:#}");
                warn!(
                    config = %source,
                    %error,
                    "config reload rejected; the configuration in force is kept"
                );
                (
                    false,
                    format!("{source} rejected, the configuration in force is kept: {error}"),
                )
            }
        };
        let outcome = Outcome {
            pid: std::process::id(),
            generation: self.generation,
            accepted,
            message,
        };
        if let Err(error) = outcome.write(&self.current.socket) {
            warn!(
                error = format!("{error:#}"),
                "cannot record the reload's outcome"
            );
        }
        outcome
    }

    fn apply(&mut self) -> anyhow::Result<Changes> {
        let new = crate::load_config(self.path.as_deref())?;
        crate::logging::filter(&new.log)?;
        let changes = Changes::between(&self.current, &new);
        // The one step that can still refuse the file (credentials, CA files) comes first,
        // so that a refusal leaves everything as it was.
        self.fetcher
            .reload_registry(&new.registry)
            .context("build the registry client")?;
        if new.cache.capacity != self.current.cache.capacity {
            if let Err(error) = self.fetcher.cache().set_capacity(new.cache.capacity.0) {
                warn!(%error, "cannot evict down to the new cache.capacity yet");
            }
        }
        if new.log.level != self.current.log.level {
            self.log.set(&new.log)?;
        }
        let in_force = Changes::in_force(&self.current, &new);
        self.policy.set(MountSettings::of(&in_force));
        self.current = in_force;
        Ok(changes)
    }

    fn source(&self) -> String {
        settings::config_source(self.path.as_deref())
    }
}

/// One token for a log field: `a,b`, or `none`.
fn fields(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    }
}

fn list(fields: &[&str]) -> String {
    if fields.is_empty() {
        "none".to_string()
    } else {
        fields.join(", ")
    }
}

fn describe(source: &str, changes: &Changes) -> String {
    let mut message = format!(
        "{source} reloaded: changed: {} (credentials read again)",
        list(&changes.applied)
    );
    if !changes.restart.is_empty() {
        let restart: Vec<String> = changes
            .restart
            .iter()
            .map(|restart| format!("{} ({})", restart.field, restart.why))
            .collect();
        message.push_str(&format!(
            "; needs a restart, kept as before: {}",
            restart.join(", ")
        ));
    }
    message
}
