//! Merging Shoal's settings into a node's existing containerd config (`shoal node-setup
//! containerd-config`): everything the file already has stays, comments included; only the
//! keys the snippet names are added or changed, and the file is rewritten only when one was.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

/// What a merge did to the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file already had every setting: not written.
    Unchanged,
    /// The file did not exist (or was empty) and now holds the snippet.
    Created,
    /// The file was rewritten; the original is kept at `backup`.
    Changed { backup: PathBuf },
}

/// Merges the snippet whose `version` matches the file's into `file`. A missing or empty file
/// takes the snippet of `default_version` (containerd 1.x: 2, 2.x: 3). A file that does not
/// parse, or whose version no snippet has, is refused untouched.
pub fn merge(
    file: &Path,
    snippets: &[PathBuf],
    default_version: Option<i64>,
) -> anyhow::Result<Outcome> {
    let mut parsed = Vec::new();
    for path in snippets {
        let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let snippet: DocumentMut = text
            .parse()
            .with_context(|| format!("parse the snippet {}", path.display()))?;
        let version = version_of(&snippet)
            .with_context(|| format!("the snippet {} has no `version`", path.display()))?;
        parsed.push((version, snippet));
    }
    let existing = match fs::read_to_string(file) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("read {}", file.display())),
    };
    let mut document: DocumentMut = match &existing {
        Some(text) => text.parse().with_context(|| {
            format!(
                "parse {} (left as it is; fix it, or move it away to start from Shoal's settings alone)",
                file.display()
            )
        })?,
        None => DocumentMut::new(),
    };
    let empty = document.as_table().is_empty();
    let version = match (version_of(&document), empty) {
        (Some(version), _) => version,
        (None, true) => default_version.with_context(|| {
            format!(
                "{} is missing or empty and no --default-version was given",
                file.display()
            )
        })?,
        (None, false) => bail!(
            "{} has no `version`, so containerd reads it as config version 1, whose plugin \
             names Shoal's settings do not use; add `version = 2` (containerd 1.x) after \
             checking its tables, or write it in version 2 or 3",
            file.display()
        ),
    };
    let Some((_, snippet)) = parsed.iter().find(|(v, _)| *v == version) else {
        let known: Vec<String> = parsed.iter().map(|(v, _)| v.to_string()).collect();
        bail!(
            "{} is containerd config version {version}; the snippets cover version {}",
            file.display(),
            known.join(" and ")
        );
    };
    // New tables go after everything the file has, in the snippet's order (the snippet's own
    // positions would interleave them with the file's tables).
    let mut next_position = last_position(document.as_table()) + 1;
    let changed = merge_table(
        document.as_table_mut(),
        snippet.as_table(),
        &mut next_position,
    );
    if !changed {
        return Ok(Outcome::Unchanged);
    }
    let backup = match &existing {
        Some(text) if !text.trim().is_empty() => Some(backup(file)?),
        _ => None,
    };
    write_atomically(file, &document.to_string())?;
    Ok(match backup {
        Some(backup) => Outcome::Changed { backup },
        None => Outcome::Created,
    })
}

fn version_of(document: &DocumentMut) -> Option<i64> {
    document.get("version").and_then(Item::as_integer)
}

/// The largest display position of any table in `table`.
fn last_position(table: &Table) -> usize {
    let mut last = table.position().unwrap_or(0);
    for (_, item) in table.iter() {
        match item {
            Item::Table(child) => last = last.max(last_position(child)),
            Item::ArrayOfTables(entries) => {
                for entry in entries.iter() {
                    last = last.max(last_position(entry));
                }
            }
            _ => {}
        }
    }
    last
}

/// Numbers `table` and its tables from `next` on, in order.
fn renumber(table: &mut Table, next: &mut usize) {
    table.set_position(*next);
    *next += 1;
    for (_, item) in table.iter_mut() {
        match item {
            Item::Table(child) => renumber(child, next),
            Item::ArrayOfTables(entries) => {
                for entry in entries.iter_mut() {
                    renumber(entry, next);
                }
            }
            _ => {}
        }
    }
}

/// Adds or sets every key of `from` in `into`; true when anything differed.
fn merge_table(into: &mut dyn TableLike, from: &Table, next: &mut usize) -> bool {
    let mut changed = false;
    for (key, item) in from.iter() {
        match item {
            Item::Table(table) => match into.get_mut(key).and_then(Item::as_table_like_mut) {
                Some(existing) => changed |= merge_table(existing, table, next),
                None => {
                    let mut table = table.clone();
                    renumber(&mut table, next);
                    into.insert(key, Item::Table(table));
                    changed = true;
                }
            },
            Item::ArrayOfTables(entries) => {
                if !matches!(into.get(key), Some(Item::ArrayOfTables(_))) {
                    into.insert(key, Item::ArrayOfTables(Default::default()));
                    changed = true;
                }
                let Some(Item::ArrayOfTables(existing)) = into.get_mut(key) else {
                    unreachable!("inserted above");
                };
                for entry in entries.iter() {
                    if !existing.iter().any(|have| holds(have, entry)) {
                        let mut entry = entry.clone();
                        renumber(&mut entry, next);
                        existing.push(entry);
                        changed = true;
                    }
                }
            }
            Item::Value(value) => {
                let same = into
                    .get(key)
                    .and_then(Item::as_value)
                    .is_some_and(|have| same_value(have, value));
                if !same {
                    let mut value = value.clone();
                    value.decor_mut().clear();
                    into.insert(key, Item::Value(value));
                    changed = true;
                }
            }
            Item::None => {}
        }
    }
    changed
}

/// Whether `have` already holds every value `wanted` sets (an array entry to leave alone).
fn holds(have: &Table, wanted: &Table) -> bool {
    wanted
        .iter()
        .all(|(key, item)| match (have.get(key), item) {
            (Some(Item::Value(have)), Item::Value(wanted)) => same_value(have, wanted),
            _ => false,
        })
}

/// Equal as TOML values, whatever their quoting or comments.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Integer(a), Value::Integer(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        (Value::Float(a), Value::Float(b)) => a.value() == b.value(),
        _ => a.to_string().trim() == b.to_string().trim(),
    }
}

/// Copies `file` to `<file>.shoal-backup-<unix seconds>` (a new name each change, so the
/// original survives any number of later merges).
fn backup(file: &Path) -> anyhow::Result<PathBuf> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut name = file.as_os_str().to_owned();
    name.push(format!(".shoal-backup-{seconds}"));
    let mut backup = PathBuf::from(name);
    let mut n = 1;
    while backup.exists() {
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".shoal-backup-{seconds}.{n}"));
        backup = PathBuf::from(name);
        n += 1;
    }
    fs::copy(file, &backup)
        .with_context(|| format!("back {} up to {}", file.display(), backup.display()))?;
    Ok(backup)
}

/// A rename over the file, so containerd never reads half of it; keeps the file's mode.
fn write_atomically(file: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = file
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut staged = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create a file in {}", dir.display()))?;
    staged
        .write_all(text.as_bytes())
        .and_then(|()| staged.as_file().sync_all())
        .with_context(|| format!("write {}", staged.path().display()))?;
    let mode = fs::metadata(file)
        .map(|meta| meta.permissions())
        .unwrap_or_else(|_| std::os::unix::fs::PermissionsExt::from_mode(0o644));
    fs::set_permissions(staged.path(), mode)
        .with_context(|| format!("set the mode of {}", staged.path().display()))?;
    staged
        .persist(file)
        .with_context(|| format!("replace {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = "version = 2\n[proxy_plugins.shoal]\n  type = \"snapshot\"\n  \
                      address = \"/run/shoal/shoal.sock\"\n\
                      [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  \
                      snapshotter = \"shoal\"\n  disable_snapshot_annotations = false\n";
    const V3: &str = "version = 3\n[proxy_plugins.shoal]\n  type = \"snapshot\"\n\
                      [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  \
                      platform = \"linux/amd64\"\n  snapshotter = \"overlayfs\"\n\
                      [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  \
                      platform = \"linux/amd64\"\n  snapshotter = \"shoal\"\n";

    fn setup(existing: Option<&str>) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        if let Some(text) = existing {
            fs::write(&file, text).unwrap();
        }
        let v2 = dir.path().join("v2.toml");
        let v3 = dir.path().join("v3.toml");
        fs::write(&v2, V2).unwrap();
        fs::write(&v3, V3).unwrap();
        (dir, file, vec![v2, v3])
    }

    #[test]
    fn keeps_what_the_file_had_and_changes_only_the_snippets_keys() {
        let original =
            "# node config\nversion = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  \
                        snapshotter = \"overlayfs\" # default\n  default_runtime_name = \"runc\"\n";
        let (_dir, file, snippets) = setup(Some(original));
        let Outcome::Changed { backup } = merge(&file, &snippets, None).unwrap() else {
            panic!("expected a change");
        };
        assert_eq!(fs::read_to_string(backup).unwrap(), original);
        let merged: toml::Value = toml::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        let cri = &merged["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(cri["snapshotter"].as_str(), Some("shoal"));
        assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
        assert_eq!(
            merged["proxy_plugins"]["shoal"]["address"].as_str(),
            Some("/run/shoal/shoal.sock")
        );
        assert!(fs::read_to_string(&file)
            .unwrap()
            .starts_with("# node config\n"));
        assert_eq!(merge(&file, &snippets, None).unwrap(), Outcome::Unchanged);
    }

    #[test]
    fn array_entries_are_added_once() {
        let original =
            "version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  \
                        platform = \"linux/amd64\"\n  snapshotter = \"overlayfs\"\n";
        let (_dir, file, snippets) = setup(Some(original));
        assert!(matches!(
            merge(&file, &snippets, None).unwrap(),
            Outcome::Changed { .. }
        ));
        assert_eq!(merge(&file, &snippets, None).unwrap(), Outcome::Unchanged);
        let merged: toml::Value = toml::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        let entries = merged["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            .as_array()
            .unwrap();
        let snapshotters: Vec<_> = entries
            .iter()
            .map(|e| e["snapshotter"].as_str().unwrap())
            .collect();
        assert_eq!(snapshotters, ["overlayfs", "shoal"]);
    }

    #[test]
    fn refuses_what_it_cannot_read_without_touching_it() {
        for bad in [
            "version = 2\n[plugins\n",
            "[plugins.cri]\nx = 1\n",
            "version = 4\n",
        ] {
            let (dir, file, snippets) = setup(Some(bad));
            assert!(merge(&file, &snippets, None).is_err(), "{bad}");
            assert_eq!(fs::read_to_string(&file).unwrap(), bad);
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "{bad}");
        }
    }

    #[test]
    fn a_missing_file_takes_the_default_versions_snippet() {
        let (_dir, file, snippets) = setup(None);
        assert!(merge(&file, &snippets, None).is_err());
        assert_eq!(merge(&file, &snippets, Some(3)).unwrap(), Outcome::Created);
        assert!(fs::read_to_string(&file).unwrap().contains("version = 3"));
    }
}
