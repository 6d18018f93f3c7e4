//! Which layer provides each file the recorded run read: the top-most layer that holds the path,
//! unless a layer above hides it (a whiteout of the path or of a parent, or an opaque parent
//! directory). Each layer then lists its own files, in the order they were first read.

use std::collections::HashSet;
use std::path::Path;

/// What one layer's tar holds, as root-relative paths without leading or trailing `/`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerFiles {
    /// Every entry the layer adds or replaces.
    pub entries: HashSet<String>,
    /// Paths a `.wh.NAME` entry removes.
    pub whiteouts: HashSet<String>,
    /// Directories a `.wh..wh..opq` entry empties of lower layers' content.
    pub opaque: HashSet<String>,
}

impl LayerFiles {
    /// Whether this layer hides `path` as lower layers have it.
    fn hides(&self, path: &str) -> bool {
        if self.whiteouts.contains(path) {
            return true;
        }
        ancestors(path).any(|dir| self.whiteouts.contains(dir) || self.opaque.contains(dir))
    }
}

/// The root-relative key of a path: components joined by `/`, no leading or trailing `/`.
pub fn path_key(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The strict ancestors of `path` (`a/b/c` gives `a/b`, then `a`), not the root.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.char_indices()
        .filter(|&(_, c)| c == '/')
        .map(move |(i, _)| &path[..i])
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
}

/// For each layer (bottom first, as `layers`), the paths of `accessed` it provides, each once,
/// in the order first read. Paths no layer provides (written by the run itself) are dropped.
pub fn attribute(accessed: &[String], layers: &[LayerFiles]) -> Vec<Vec<String>> {
    let mut per_layer = vec![Vec::new(); layers.len()];
    let mut seen = HashSet::new();
    for path in accessed {
        let key = path_key(Path::new(path));
        if key.is_empty() || !seen.insert(key.clone()) {
            continue;
        }
        for (index, layer) in layers.iter().enumerate().rev() {
            if layer.entries.contains(&key) {
                per_layer[index].push(key);
                break;
            }
            if layer.hides(&key) {
                break;
            }
        }
    }
    per_layer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[&str], whiteouts: &[&str], opaque: &[&str]) -> LayerFiles {
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        LayerFiles {
            entries: set(entries),
            whiteouts: set(whiteouts),
            opaque: set(opaque),
        }
    }

    fn owned(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn the_top_most_layer_holding_a_path_provides_it() {
        let layers = [
            layer(
                &["bin", "bin/sh", "app", "app/data", "app/data/a"],
                &[],
                &[],
            ),
            // Only files: the parent directories live in the layer below.
            layer(&["app/data/greeting", "bin/sh"], &[], &[]),
        ];
        let accessed = owned(&["/bin/sh", "/app/data/greeting", "/app/data/a", "/bin/sh"]);
        assert_eq!(
            attribute(&accessed, &layers),
            [
                owned(&["app/data/a"]),
                owned(&["bin/sh", "app/data/greeting"])
            ]
        );
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_files() {
        let layers = [
            layer(&["etc/old", "etc/keep", "var/lib/x"], &[], &[]),
            layer(&["etc/new"], &["etc/old", "var/lib"], &[]),
            layer(&["etc/newer"], &[], &["etc"]),
        ];
        let accessed = owned(&[
            "etc/keep",
            "etc/old",
            "var/lib/x",
            "etc/new",
            "etc/newer",
            "tmp/written-by-the-run",
        ]);
        // etc/keep and etc/new are under the opaque etc of the top layer: a read of them could
        // only have come from a file the run made, so nothing is attributed.
        assert_eq!(
            attribute(&accessed, &layers),
            [owned(&[]), owned(&[]), owned(&["etc/newer"])]
        );
    }

    #[test]
    fn keys_drop_leading_dots_and_slashes() {
        assert_eq!(path_key(Path::new("/usr/bin/")), "usr/bin");
        assert_eq!(path_key(Path::new("./usr//lib")), "usr/lib");
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a/b", "a"]);
    }
}
