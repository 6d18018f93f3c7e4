//! What lazy layers are opened and mounted with, as the configuration says now: one cell that
//! the formats and the mounter read at each open and each mount, and that a reload of the
//! daemon's configuration writes. A change applies from the next layer on; a layer mounted
//! already keeps the prefetch it was mounted with.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use shoal_config::Config;
use shoal_fuse::layer::Prefetch;

/// The settings a layer is opened and mounted with.
#[derive(Debug, Clone, Copy)]
pub struct MountSettings {
    /// What a mounted layer fetches ahead of its reads (`fetch.prefetch`, `fetch.background`,
    /// `fetch.background_rate`, `fetch.complete_after_percent`).
    pub prefetch: Prefetch,
    /// How long finding and opening a layer may take, whatever its format
    /// (`registry.timeout_secs`): a registry that hangs must not hang containerd's Prepare.
    pub resolve_timeout: Duration,
}

impl MountSettings {
    pub fn of(config: &Config) -> MountSettings {
        MountSettings {
            prefetch: Prefetch {
                landmark: config.fetch.prefetch,
                background_rate: config
                    .fetch
                    .background
                    .then_some(config.fetch.background_rate.0),
                complete_after: config
                    .fetch
                    .complete_after_percent
                    .map(|percent| f64::from(percent) / 100.0),
            },
            resolve_timeout: config.registry.timeout,
        }
    }
}

/// A shared [`MountSettings`]; clones share it.
#[derive(Debug, Clone)]
pub struct MountPolicy(Arc<RwLock<MountSettings>>);

impl MountPolicy {
    pub fn new(settings: MountSettings) -> MountPolicy {
        MountPolicy(Arc::new(RwLock::new(settings)))
    }

    /// The settings in force now.
    pub fn get(&self) -> MountSettings {
        *self.0.read()
    }

    /// Replaces the settings for every layer opened or mounted from now on.
    pub fn set(&self, settings: MountSettings) {
        *self.0.write() = settings;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_see_what_is_set() {
        let config =
            Config::parse("[fetch]\nbackground = true\nbackground_rate = \"1MiB\"\n").unwrap();
        let policy = MountPolicy::new(MountSettings::of(&Config::default()));
        let held = policy.clone();
        assert_eq!(held.get().prefetch.background_rate, None);
        policy.set(MountSettings::of(&config));
        assert_eq!(held.get().prefetch.background_rate, Some(1 << 20));
        assert_eq!(held.get().resolve_timeout, config.registry.timeout);
    }
}
