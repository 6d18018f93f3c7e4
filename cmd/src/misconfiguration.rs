//! containerd misconfigurations the daemon's counters give away, each named with the setting
//! that fixes it: `shoal status` prints them under `fix:`.
//!
//! Both are layers that reached the snapshotter without what a lazy mount needs, counted as
//! fallbacks by kind (`shoal_lazy_fallbacks_total{reason=...}`):
//! - `missing_labels`: a Prepare asked for a remote snapshot (`containerd.io/snapshot.ref`)
//!   but carried no image reference or layer digest. containerd passes a layer's annotations
//!   to a proxy snapshotter only when told to: on 2.x through the transfer service and CRI,
//!   `enable_remote_snapshot_annotations` in the proxy plugin's exports; on 1.x through CRI,
//!   `disable_snapshot_annotations = false`.
//! - `unlabelled_unpack`: an unpack with no remote-snapshot labels at all (`ctr image pull` on
//!   containerd 1.x), which can never be lazy.

use std::collections::BTreeMap;

/// One line per misconfiguration the fallbacks show, with its fix.
pub fn fixes(fallbacks: &BTreeMap<String, u64>) -> Vec<String> {
    let mut fixes = Vec::new();
    if let Some(count) = fallbacks.get("missing_labels").filter(|n| **n > 0) {
        fixes.push(format!(
            "{count} layer(s) arrived without the annotations that locate them, so containerd \
             downloaded them: on containerd 2.x set `enable_remote_snapshot_annotations = \
             \"true\"` under `[proxy_plugins.shoal.exports]`; for CRI on 1.x set \
             `disable_snapshot_annotations = false` under \
             `[plugins.\"io.containerd.grpc.v1.cri\".containerd]`; restart containerd"
        ));
    }
    if let Some(count) = fallbacks.get("unlabelled_unpack").filter(|n| **n > 0) {
        fixes.push(format!(
            "{count} layer(s) unpacked with no remote-snapshot labels at all (`ctr image pull` \
             on containerd 1.x): pull with `shoal rpull`, or through CRI"
        ));
    }
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tell_tale_fallback_names_its_setting() {
        let none = BTreeMap::from([("not_lazy_format".to_owned(), 3)]);
        assert!(fixes(&none).is_empty());
        let both = BTreeMap::from([
            ("missing_labels".to_owned(), 4),
            ("unlabelled_unpack".to_owned(), 2),
            ("registry".to_owned(), 1),
        ]);
        let found = fixes(&both);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("4 layer(s)")
                && found[0].contains("enable_remote_snapshot_annotations")
        );
        assert!(found[1].starts_with("2 layer(s)") && found[1].contains("shoal rpull"));
    }
}
