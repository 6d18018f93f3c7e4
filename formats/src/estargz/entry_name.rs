//! Normalization of tar entry names into root-relative paths.

/// Cleans a tar or TOC entry name into a path relative to the layer root, as the reference
/// implementation does with `path.Clean("/" + name)`: `.` and empty components vanish, `..`
/// never climbs above the root, a trailing `/` is dropped. The root itself is `""`.
pub fn clean_entry_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// Splits a cleaned path into its parent path and base name (`""` parent for top-level names).
pub fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_go_path_clean() {
        for (raw, clean) in [
            ("./", ""),
            ("/", ""),
            ("", ""),
            ("./etc/passwd", "etc/passwd"),
            ("/usr//bin/", "usr/bin"),
            ("../../etc/shadow", "etc/shadow"),
            ("a/b/../../../c", "c"),
            ("a/./b/.", "a/b"),
        ] {
            assert_eq!(clean_entry_name(raw), clean, "{raw:?}");
        }
    }

    #[test]
    fn splits_parent() {
        assert_eq!(split_parent("a/b/c"), ("a/b", "c"));
        assert_eq!(split_parent("c"), ("", "c"));
    }
}
