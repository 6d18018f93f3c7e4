//! Where snapshots live on disk and which mounts containerd gets for them.
//!
//! The layout is containerd's overlayfs snapshotter's, so tools and operators find what they
//! expect: `<root>/snapshots/<id>/fs` is a snapshot's upper (or only) directory and
//! `<root>/snapshots/<id>/work` its overlayfs work directory.
//!
//! Architecture Invariant: mount lists are a pure function of (kind, id, parent ids); nothing in
//! here touches the filesystem, so every layout rule is unit-tested without root.

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

use crate::metadata::Kind;

/// Paths and mount rules for one snapshotter root.
#[derive(Debug, Clone)]
pub struct Layout {
    snapshots: PathBuf,
    /// Pass `index=off` to overlayfs, as containerd does when the kernel has the parameter,
    /// so that layers shared between overlays do not trip the inode index check.
    index_off: bool,
}

impl Layout {
    pub fn new(root: &Path, index_off: bool) -> Layout {
        Layout {
            snapshots: root.join("snapshots"),
            index_off,
        }
    }

    /// Probes the running kernel the way containerd does.
    pub fn detect(root: &Path) -> Layout {
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        Layout::new(root, index_off)
    }

    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    pub fn upper(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Mounts for snapshot `id` of `kind` whose ancestors are `parents`, nearest first.
    pub fn mounts(&self, kind: Kind, id: u64, parents: &[u64]) -> Vec<Mount> {
        let ro = kind == Kind::View;
        match parents {
            [] => vec![bind(&self.upper(id), if ro { "ro" } else { "rw" })],
            [only] if ro => vec![bind(&self.upper(*only), "ro")],
            _ => {
                let mut options = Vec::new();
                if self.index_off {
                    options.push("index=off".to_string());
                }
                if !ro {
                    options.push(format!("workdir={}", self.work(id).display()));
                    options.push(format!("upperdir={}", self.upper(id).display()));
                }
                let lower: Vec<String> = parents
                    .iter()
                    .map(|p| self.upper(*p).display().to_string())
                    .collect();
                options.push(format!("lowerdir={}", lower.join(":")));
                vec![Mount {
                    r#type: "overlay".into(),
                    source: "overlay".into(),
                    target: String::new(),
                    options,
                }]
            }
        }
    }
}

fn bind(path: &Path, mode: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: path.display().to_string(),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(Path::new("/r"), true)
    }

    #[test]
    fn lone_snapshots_are_bind_mounts() {
        let active = layout().mounts(Kind::Active, 1, &[]);
        assert_eq!(active[0].r#type, "bind");
        assert_eq!(active[0].source, "/r/snapshots/1/fs");
        assert_eq!(active[0].options, ["rw", "rbind"]);
        let view = layout().mounts(Kind::View, 1, &[]);
        assert_eq!(view[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn single_layer_view_binds_the_parent_read_only() {
        let view = layout().mounts(Kind::View, 7, &[3]);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].r#type, "bind");
        assert_eq!(view[0].source, "/r/snapshots/3/fs");
        assert_eq!(view[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn active_over_parents_is_overlay_with_lowerdirs_top_first() {
        let m = &layout().mounts(Kind::Active, 9, &[5, 4, 1])[0];
        assert_eq!(m.r#type, "overlay");
        assert_eq!(
            m.options,
            [
                "index=off",
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/5/fs:/r/snapshots/4/fs:/r/snapshots/1/fs",
            ]
        );
    }

    #[test]
    fn multi_layer_view_has_no_upper() {
        let m = &Layout::new(Path::new("/r"), false).mounts(Kind::View, 9, &[5, 4])[0];
        assert_eq!(m.options, ["lowerdir=/r/snapshots/5/fs:/r/snapshots/4/fs"]);
    }

    #[test]
    fn many_layers_keep_order() {
        let parents: Vec<u64> = (1..=128).rev().collect();
        let m = &layout().mounts(Kind::Active, 200, &parents)[0];
        let lower = m.options.last().unwrap();
        assert!(lower.starts_with("lowerdir=/r/snapshots/128/fs:/r/snapshots/127/fs"));
        assert!(lower.ends_with(":/r/snapshots/1/fs"));
        assert_eq!(lower.matches(':').count(), 127);
    }
}
