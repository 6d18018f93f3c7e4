//! Tracing set-up: text or JSON lines on stderr, filtered by `log.level` (or `RUST_LOG`).

use anyhow::Context;
use shoal_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Transport crates whose debug output is frame-level noise; a bare `log.level = "debug"`
/// keeps them at info. Explicit directives (`h2=trace`) still reach them.
const NOISY: &[&str] = &["h2", "hyper", "tower", "tonic", "reqwest", "rustls"];

pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(directives(&config.level)),
    }
    .with_context(|| format!("invalid log.level {:?}", config.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|err| anyhow::anyhow!("install tracing subscriber: {err}"))
}

fn directives(level: &str) -> String {
    let bare = ["trace", "debug"].contains(&level.trim());
    if !bare {
        return level.to_string();
    }
    let quiet: Vec<String> = NOISY.iter().map(|c| format!("{c}=info")).collect();
    format!("{level},{}", quiet.join(","))
}
