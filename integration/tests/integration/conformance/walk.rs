//! The suite's Walk check (List with filters), plus the filter forms it leaves out: `!=` and
//! `~=`, quoted keys, and several filters OR'ed, with containerd's semantics (a `!=` selector
//! matches a snapshot that lacks the field, since containerd compares the empty value).

use super::conformance;
use crate::client::{self, Labels};
use crate::fixture::privileged;

fn walk_labels(extra: Option<&str>) -> Labels {
    let mut labels = client::labels(&[("containerd.io/gc.root", "check-walk")]);
    if let Some(value) = extra {
        labels.insert("l".to_owned(), value.to_owned());
    }
    labels
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    names.sort();
    names
}

#[test]
fn walk() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        api.prepare_labeled("a-np", "", walk_labels(None))?;
        api.prepare_labeled("p-tmp", "", walk_labels(None))?;
        api.commit_labeled("p", "p-tmp", walk_labels(None))?;
        api.prepare_labeled("a", "p", walk_labels(None))?;
        api.view_labeled("v", "p", walk_labels(None))?;
        api.prepare_labeled("p-wl-tmp", "", walk_labels(None))?;
        api.commit_labeled("p-wl", "p-wl-tmp", walk_labels(Some("1")))?;
        api.prepare_labeled("a-wl", "p-wl", walk_labels(Some("2")))?;
        api.view_labeled("v-wl", "p-wl", walk_labels(Some("3")))?;
        api.prepare_labeled("a-np-wl", "", walk_labels(Some("2")))?;

        let gc = r#"labels."containerd.io/gc.root"==check-walk"#;
        let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
            // The suite's own cases.
            (
                sorted(&["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
                vec![gc],
            ),
            (
                sorted(&["a-np", "a", "a-wl", "a-np-wl"]),
                vec![r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            ),
            (
                sorted(&["v", "v-wl"]),
                vec![r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
            ),
            (
                sorted(&["p", "p-wl"]),
                vec![r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
            ),
            (sorted(&["p", "a-np-wl"]), vec!["name==p", "name==a-np-wl"]),
            (sorted(&["a-wl"]), vec!["name==a-wl,labels.l"]),
            (sorted(&["a", "v"]), vec!["parent==p"]),
            (
                sorted(&["a", "v", "a-wl", "v-wl"]),
                vec![r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
            ),
            (
                sorted(&["p-wl", "a-wl", "v-wl", "a-np-wl"]),
                vec!["labels.l"],
            ),
            (sorted(&["a-wl", "a-np-wl"]), vec!["labels.l==2"]),
            // Beyond the suite: regular expressions, quoted values, `!=` on a missing label,
            // and OR across filters of different fields.
            (sorted(&["a-np", "a-np-wl"]), vec!["name~=^a-np"]),
            (sorted(&["p-wl", "v-wl"]), vec!["labels.l~=^[13]$"]),
            (sorted(&["a-wl", "a-np-wl"]), vec![r#"labels."l"=="2""#]),
            (
                sorted(&["a-np", "p", "a", "v", "p-wl", "v-wl"]),
                vec!["labels.l!=2"],
            ),
            (
                sorted(&["a", "v", "v-wl"]),
                vec!["parent==p", "kind==view,labels.l==3"],
            ),
            (sorted(&["p"]), vec!["name==p,kind==committed,parent==\"\""]),
        ];
        let mut failures = Vec::new();
        for (index, (expected, filters)) in cases.iter().enumerate() {
            match api.list_names(filters) {
                Ok(actual) if &actual == expected => {}
                Ok(actual) => failures.push(format!(
                    "[{index}] {filters:?}: expected {expected:?}, got {actual:?}"
                )),
                Err(status) => failures.push(format!("[{index}] {filters:?}: {status}")),
            }
        }
        anyhow::ensure!(
            failures.is_empty(),
            "List filters:\n  {}",
            failures.join("\n  ")
        );
        Ok(())
    });
}
