//! Tracing set-up: text or JSON lines on stderr, filtered by `log.level` (or `RUST_LOG`).
//!
//! Colour only reaches a terminal: a file, a pipe or journald gets plain text. The filter can
//! be replaced while the daemon runs ([`LogLevel::set`]), which is how a reload changes
//! `log.level`.

use std::io::IsTerminal;

use anyhow::Context;
use shoal_config::{LogConfig, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Transport crates whose debug output is frame-level noise; a bare `log.level = "debug"`
/// keeps them at info. Explicit directives (`h2=trace`) still reach them.
const NOISY: &[&str] = &["h2", "hyper", "tower", "tonic", "reqwest", "rustls"];

/// What fuser logs that asks nothing of an operator: a reply the kernel no longer waits for
/// (ENOENT: its request was interrupted, as when a container exits during a read answered from
/// a task) is an ERROR from `fuser::reply`. A read that fails is logged by Shoal (`read
/// failed`), whether or not its reply arrives. (Shoal mounts FUSE itself; fuser's own mount
/// code, whose second unmount warned, is not used.)
const FUSER_QUIET: &str = "fuser::reply=off";

/// The installed subscriber's filter, replaceable while the daemon runs.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogLevel {
    /// Replaces the filter with the one `config` asks for (`RUST_LOG` still wins).
    pub fn set(&self, config: &LogConfig) -> anyhow::Result<()> {
        let filter = filter(config)?;
        self.handle
            .reload(filter)
            .map_err(|err| anyhow::anyhow!("replace the log filter: {err}"))
    }
}

/// Installs the process's subscriber on stderr.
pub fn init(config: &LogConfig) -> anyhow::Result<LogLevel> {
    let (filter, handle) = reload::Layer::new(filter(config)?);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let output = match config.format {
        LogFormat::Text => output.boxed(),
        LogFormat::Json => output.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|err| anyhow::anyhow!("install tracing subscriber: {err}"))?;
    Ok(LogLevel { handle })
}

/// The filter `config` asks for, unless `RUST_LOG` names one; an invalid one is an error
/// naming `log.level`.
pub fn filter(config: &LogConfig) -> anyhow::Result<EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(directives(&config.level)),
    }
    .with_context(|| format!("invalid log.level {:?}", config.level))
}

fn directives(level: &str) -> String {
    let bare = ["trace", "debug"].contains(&level.trim());
    if !bare {
        return format!("{FUSER_QUIET},{level}");
    }
    let quiet: Vec<String> = NOISY.iter().map(|c| format!("{c}=info")).collect();
    format!("{FUSER_QUIET},{level},{}", quiet.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuser_reply_errors_are_quiet_at_every_level() {
        assert_eq!(directives("info"), "fuser::reply=off,info");
        assert!(directives("debug").starts_with("fuser::reply=off,debug,h2=info"));
        for level in ["info", "debug", "warn,shoal_fetcher=debug"] {
            EnvFilter::try_new(directives(level)).unwrap();
        }
    }
}
