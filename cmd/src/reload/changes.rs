//! What differs between the configuration in force and a new one, and which of it a running
//! daemon can take without a restart.

use shoal_config::{CacheConfig, Config, FetchConfig, LogConfig};

/// The fields that differ, by their TOML names.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Taken at once.
    pub applied: Vec<&'static str>,
    /// Kept as they were until the daemon restarts, each with why.
    pub restart: Vec<Restart>,
}

/// A field a running daemon cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub field: &'static str,
    pub why: &'static str,
}

impl Changes {
    pub fn between(old: &Config, new: &Config) -> Changes {
        let mut changes = Changes::default();
        let (a, b) = (&old.registry, &new.registry);
        changes.apply("registry.hosts", a.hosts != b.hosts);
        changes.apply("registry.docker_config", a.docker_config != b.docker_config);
        changes.apply(
            "registry.credential_provider_config",
            a.credential_providers != b.credential_providers,
        );
        changes.apply("registry.timeout_secs", a.timeout != b.timeout);
        changes.apply("registry.retries", a.retries != b.retries);
        changes.apply("registry.deadline_secs", a.deadline != b.deadline);
        changes.apply("log.level", old.log.level != new.log.level);
        changes.apply("cache.capacity", old.cache.capacity != new.cache.capacity);
        // Read at each mount: layers mounted from now on take them, mounted ones keep theirs.
        let (f, g) = (&old.fetch, &new.fetch);
        changes.apply("fetch.prefetch", f.prefetch != g.prefetch);
        changes.apply("fetch.background", f.background != g.background);
        changes.apply(
            "fetch.background_rate",
            f.background_rate != g.background_rate,
        );
        changes.apply(
            "fetch.complete_after_percent",
            f.complete_after_percent != g.complete_after_percent,
        );

        changes.restart(
            "root",
            "it holds the store, the cache and the mounts",
            old.root != new.root,
        );
        changes.restart(
            "socket",
            "containerd is connected to it",
            old.socket != new.socket,
        );
        changes.restart(
            "log.format",
            "the log writer is built at start",
            old.log.format != new.log.format,
        );
        changes.restart(
            "cache.block_size",
            "the cached blocks on disk have the old size",
            old.cache.block_size != new.cache.block_size,
        );
        changes.restart(
            "cache.memory",
            "the chunk reader's memory is sized at start",
            old.cache.memory != new.cache.memory,
        );
        changes.restart(
            "fetch.max_concurrent",
            "the fetches in flight hold permits of the old limit",
            f.max_concurrent != g.max_concurrent,
        );
        changes.restart(
            "fetch.learn",
            "learned prefetch is set up at start",
            f.learn != g.learn
                || f.learn_settle != g.learn_settle
                || f.learn_max_bytes != g.learn_max_bytes
                || f.learn_push != g.learn_push,
        );
        changes.restart(
            "metrics.address",
            "the listener is bound at start",
            old.metrics != new.metrics,
        );
        changes.restart(
            "peers",
            "the peer listener, membership and owner index are set up at start",
            old.peers != new.peers,
        );
        changes.restart(
            "handover",
            "the fd holder is attached at start",
            old.handover != new.handover,
        );
        changes.restart(
            "cri_proxy",
            "the proxy's socket is bound at start",
            old.cri_proxy != new.cri_proxy,
        );
        changes.restart(
            "preheat",
            "the preheat API is bound at start",
            old.preheat != new.preheat,
        );
        changes
    }

    fn apply(&mut self, field: &'static str, differs: bool) {
        if differs {
            self.applied.push(field);
        }
    }

    fn restart(&mut self, field: &'static str, why: &'static str, differs: bool) {
        if differs {
            self.restart.push(Restart { field, why });
        }
    }

    /// The names of the fields that need a restart.
    pub fn restart_fields(&self) -> Vec<&'static str> {
        self.restart.iter().map(|restart| restart.field).collect()
    }

    /// `old` with the reloadable parts of `new`: what is in force after the reload.
    pub fn in_force(old: &Config, new: &Config) -> Config {
        Config {
            registry: new.registry.clone(),
            log: LogConfig {
                level: new.log.level.clone(),
                format: old.log.format,
            },
            cache: CacheConfig {
                capacity: new.cache.capacity,
                ..old.cache.clone()
            },
            fetch: FetchConfig {
                max_concurrent: old.fetch.max_concurrent,
                learn: old.fetch.learn,
                learn_settle: old.fetch.learn_settle,
                learn_max_bytes: old.fetch.learn_max_bytes,
                learn_push: old.fetch.learn_push,
                ..new.fetch.clone()
            },
            ..old.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn reloadable_and_restart_fields_are_told_apart() {
        let old = config("[cache]\ncapacity = \"1GiB\"\n");
        let new = config(
            "[cache]\ncapacity = \"2GiB\"\nblock_size = \"4MiB\"\n\
             [fetch]\nbackground = true\nmax_concurrent = 8\n\
             [log]\nlevel = \"debug\"\nformat = \"json\"\n\
             [registry.hosts.\"127.0.0.1:5000\"]\nplain_http = true\n\
             [peers]\nlisten = \"127.0.0.1:7420\"\nstatic = [\"127.0.0.1:7420\"]\n",
        );
        let changes = Changes::between(&old, &new);
        assert_eq!(
            changes.applied,
            [
                "registry.hosts",
                "log.level",
                "cache.capacity",
                "fetch.background"
            ]
        );
        assert_eq!(
            changes.restart_fields(),
            [
                "log.format",
                "cache.block_size",
                "fetch.max_concurrent",
                "peers"
            ]
        );
        assert!(changes
            .restart
            .iter()
            .all(|restart| !restart.why.is_empty()));
        let kept = Changes::in_force(&old, &new);
        assert_eq!(kept.cache.capacity, new.cache.capacity);
        assert_eq!(kept.cache.block_size, old.cache.block_size);
        assert_eq!(kept.log.format, old.log.format);
        assert_eq!(kept.log.level, "debug");
        assert!(kept.fetch.background);
        assert_eq!(kept.fetch.max_concurrent, old.fetch.max_concurrent);
        assert!(kept.peers.is_none());
        // What is in force differs from the file only where a restart is needed.
        let again = Changes::between(&kept, &new);
        assert!(again.applied.is_empty(), "{again:?}");
        assert_eq!(again.restart, changes.restart);
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let old = config("");
        assert_eq!(Changes::between(&old, &old.clone()), Changes::default());
    }
}
