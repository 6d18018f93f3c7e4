//! Ordering of tar entries so that prioritized files (with their parent directories and
//! hardlink targets) come first, in the order they were listed.

use std::collections::{HashMap, HashSet};

use crate::estargz::entry_name::clean_entry_name;

use super::tar_stream::Kind;

/// How deep hardlink chains are followed when pulling targets forward.
const HARDLINK_DEPTH: usize = 64;

/// What ordering needs to know about one entry.
pub(super) struct Named<'a> {
    pub name: &'a str,
    pub kind: Kind,
    pub link_name: &'a str,
}

/// The chosen order: indices of prioritized entries, then of the rest, plus the listed paths
/// that are not in this layer.
pub(super) struct Order {
    pub prioritized: Vec<usize>,
    pub rest: Vec<usize>,
    pub missed: Vec<String>,
}

pub(super) fn order(entries: &[Named], prioritized: &[String]) -> Order {
    let cleaned: Vec<String> = entries.iter().map(|e| clean_entry_name(e.name)).collect();
    // A repeated name is represented by its last occurrence, which is what extraction keeps.
    let by_name: HashMap<&str, usize> = cleaned
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let mut picker = Picker {
        entries,
        by_name: &by_name,
        picked: HashSet::new(),
        order: Vec::new(),
    };
    let mut missed = Vec::new();
    for path in prioritized {
        let name = clean_entry_name(path);
        if by_name.contains_key(name.as_str()) {
            picker.pick_with_parents(&name, 0);
        } else if !picker.picked.contains(&name) {
            missed.push(path.clone());
        }
    }
    let picked = picker.picked;
    let rest = (0..entries.len())
        .filter(|&i| !picked.contains(&cleaned[i]))
        .collect();
    Order {
        prioritized: picker.order,
        rest,
        missed,
    }
}

struct Picker<'a, 'b> {
    entries: &'a [Named<'a>],
    by_name: &'b HashMap<&'b str, usize>,
    picked: HashSet<String>,
    order: Vec<usize>,
}

impl Picker<'_, '_> {
    /// Picks the root entry, every ancestor present in the layer, hardlink targets, then
    /// `name` itself. Ancestors missing from the tar are skipped (extraction creates them).
    fn pick_with_parents(&mut self, name: &str, depth: usize) {
        let mut ancestors = vec![""];
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            end += i;
            ancestors.push(&name[..end]);
            end += 1;
        }
        for ancestor in ancestors {
            self.pick(ancestor);
        }
        if let Some(&i) = self.by_name.get(name) {
            let entry = &self.entries[i];
            if entry.kind == Kind::Hardlink && depth < HARDLINK_DEPTH {
                let target = clean_entry_name(entry.link_name);
                if target != name {
                    self.pick_with_parents(&target, depth + 1);
                }
            }
        }
        self.pick(name);
    }

    fn pick(&mut self, name: &str) {
        if self.picked.contains(name) {
            return;
        }
        if let Some(&i) = self.by_name.get(name) {
            self.picked.insert(name.to_owned());
            self.order.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named<'a>(name: &'a str, kind: Kind, link_name: &'a str) -> Named<'a> {
        Named {
            name,
            kind,
            link_name,
        }
    }

    #[test]
    fn pulls_parents_and_link_targets_forward() {
        let entries = [
            named("./", Kind::Dir, ""),
            named("./etc/", Kind::Dir, ""),
            named("./etc/hosts", Kind::Reg, ""),
            named("./bin/", Kind::Dir, ""),
            named("./bin/busybox", Kind::Reg, ""),
            named("./bin/sh", Kind::Hardlink, "bin/busybox"),
        ];
        let order = order(
            &entries,
            &[
                "/bin/sh".to_owned(),
                "missing".to_owned(),
                "etc/hosts".to_owned(),
            ],
        );
        assert_eq!(order.prioritized, [0, 3, 4, 5, 1, 2]);
        assert!(order.rest.is_empty());
        assert_eq!(order.missed, ["missing"]);
    }

    #[test]
    fn files_whose_parents_live_in_a_lower_layer_are_still_prioritized() {
        // An upper layer of files only: the reference builder counts these as missing.
        let entries = [
            named("app/data/other", Kind::Reg, ""),
            named("app/data/greeting", Kind::Reg, ""),
        ];
        let order = order(&entries, &["/app/data/greeting".to_owned()]);
        assert_eq!(order.prioritized, [1]);
        assert_eq!(order.rest, [0]);
        assert!(order.missed.is_empty());
    }

    #[test]
    fn self_and_cyclic_hardlinks_terminate() {
        let entries = [
            named("a", Kind::Hardlink, "b"),
            named("b", Kind::Hardlink, "a"),
            named("c", Kind::Reg, ""),
        ];
        let order = order(&entries, &["a".to_owned()]);
        assert_eq!(order.prioritized, [0, 1]);
        assert_eq!(order.rest, [2]);
    }
}
