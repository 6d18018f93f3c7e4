//! `<socket>.reload.json`: how the daemon's last reload went, for `shoal reload` to print.
//!
//! It sits beside the socket because the socket is what the daemon and the CLI agree on by
//! definition (the CLI found the daemon there), whatever config file each of them read.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// One reload's result, stamped with the daemon that made it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub pid: u32,
    /// Counts this daemon's reloads from 1.
    pub generation: u64,
    pub accepted: bool,
    /// What changed and what needs a restart, or why the new config was rejected.
    pub message: String,
}

pub fn path(socket: &Path) -> PathBuf {
    suffixed(socket, ".reload.json")
}

fn suffixed(socket: &Path, suffix: &str) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Outcome {
    /// Replaces the file whole (written beside it, then renamed), so a reader never sees
    /// half of it. Not fsynced: it only reports, and the next reload writes it again.
    pub fn write(&self, socket: &Path) -> anyhow::Result<()> {
        let path = path(socket);
        let staged = suffixed(socket, ".reload.json.tmp");
        let text = serde_json::to_vec(self).context("encode the reload outcome")?;
        std::fs::write(&staged, text).with_context(|| format!("write {}", staged.display()))?;
        std::fs::rename(&staged, &path)
            .with_context(|| format!("rename {} to {}", staged.display(), path.display()))
    }

    /// The last outcome, if there is one that parses.
    pub fn read(socket: &Path) -> Option<Outcome> {
        let text = std::fs::read(path(socket)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shoal.sock");
        assert_eq!(Outcome::read(&socket), None);
        let outcome = Outcome {
            pid: 7,
            generation: 2,
            accepted: false,
            message: "invalid value for `cache.block_size`".into(),
        };
        outcome.write(&socket).unwrap();
        assert_eq!(Outcome::read(&socket), Some(outcome));
        assert!(dir.path().join("shoal.sock.reload.json").exists());
    }
}
