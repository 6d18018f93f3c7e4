//! What can still be read from a file that does not validate: the socket it names, so that
//! `shoal reload` and `shoal status` find a daemon whose file was broken after it started.

use std::path::{Path, PathBuf};

use crate::Config;

impl Config {
    /// The absolute `socket` that `path` names, if the file reads as TOML at all and has one;
    /// nothing else in it is checked.
    pub fn socket_named_in(path: &Path) -> Option<PathBuf> {
        let text = std::fs::read_to_string(path).ok()?;
        let table: toml::Table = text.parse().ok()?;
        let socket = PathBuf::from(table.get("socket")?.as_str()?);
        socket.is_absolute().then_some(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_a_bad_field_still_names_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "socket = \"/run/x.sock\"\n[cache]\nbogus = 1\n").unwrap();
        assert!(Config::load(&path).is_err());
        assert_eq!(
            Config::socket_named_in(&path),
            Some(PathBuf::from("/run/x.sock"))
        );
        std::fs::write(&path, "socket = \"relative.sock\"\n").unwrap();
        assert_eq!(Config::socket_named_in(&path), None);
        std::fs::write(&path, "socket = [\n").unwrap();
        assert_eq!(Config::socket_named_in(&path), None);
    }
}
