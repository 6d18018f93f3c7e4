//! What differs between the configuration in force and a new one, and which of it a running
//! daemon can take without a restart.

use shoal_config::{CacheConfig, Config, LogConfig};

/// The fields that differ, by their TOML names.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Taken at once.
    pub applied: Vec<&'static str>,
    /// Kept as they were until the daemon restarts.
    pub restart: Vec<&'static str>,
}

impl Changes {
    pub fn between(old: &Config, new: &Config) -> Changes {
        let mut changes = Changes::default();
        let (a, b) = (&old.registry, &new.registry);
        changes.note(true, "registry.hosts", a.hosts != b.hosts);
        changes.note(
            true,
            "registry.docker_config",
            a.docker_config != b.docker_config,
        );
        changes.note(true, "registry.timeout_secs", a.timeout != b.timeout);
        changes.note(true, "registry.retries", a.retries != b.retries);
        changes.note(true, "registry.deadline_secs", a.deadline != b.deadline);
        changes.note(true, "log.level", old.log.level != new.log.level);
        changes.note(
            true,
            "cache.capacity",
            old.cache.capacity != new.cache.capacity,
        );

        changes.note(false, "root", old.root != new.root);
        changes.note(false, "socket", old.socket != new.socket);
        changes.note(false, "log.format", old.log.format != new.log.format);
        changes.note(
            false,
            "cache.block_size",
            old.cache.block_size != new.cache.block_size,
        );
        changes.note(false, "cache.memory", old.cache.memory != new.cache.memory);
        changes.note(false, "fetch", old.fetch != new.fetch);
        changes.note(false, "metrics.address", old.metrics != new.metrics);
        changes.note(false, "peers", old.peers != new.peers);
        changes.note(false, "handover", old.handover != new.handover);
        changes
    }

    fn note(&mut self, reloadable: bool, field: &'static str, differs: bool) {
        match (differs, reloadable) {
            (false, _) => {}
            (true, true) => self.applied.push(field),
            (true, false) => self.restart.push(field),
        }
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
             [log]\nlevel = \"debug\"\nformat = \"json\"\n\
             [registry.hosts.\"127.0.0.1:5000\"]\nplain_http = true\n\
             [peers]\nlisten = \"127.0.0.1:7420\"\nstatic = [\"127.0.0.1:7420\"]\n",
        );
        let changes = Changes::between(&old, &new);
        assert_eq!(
            changes.applied,
            ["registry.hosts", "log.level", "cache.capacity"]
        );
        assert_eq!(changes.restart, ["log.format", "cache.block_size", "peers"]);
        let kept = Changes::in_force(&old, &new);
        assert_eq!(kept.cache.capacity, new.cache.capacity);
        assert_eq!(kept.cache.block_size, old.cache.block_size);
        assert_eq!(kept.log.format, old.log.format);
        assert_eq!(kept.log.level, "debug");
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
