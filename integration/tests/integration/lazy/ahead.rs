//! An image's layers above the first are opened while containerd still prepares the first:
//! their TOCs are fetched side by side, not one Prepare after another.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use super::{base_layer, ensure_all_lazy, ensure_sums, random_bytes, sha256_hex, Stack};
use crate::fixture::{privileged, wait_until, Fixture};
use crate::proxy::Fault;
use crate::tree;

/// How long the proxy holds each request for the bottom layer's blob. containerd cannot prepare
/// the layers above before the bottom one is in, so any request for their blobs answered while
/// the bottom's first one is held was made ahead of their Prepare. Long, so that the check does
/// not depend on how fast a loaded machine issues those requests.
const BOTTOM_DELAY: Duration = Duration::from_secs(8);

#[test]
fn the_layers_above_the_first_are_opened_while_it_is_prepared() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        let mut expected = BTreeMap::new();
        let mut layers = vec![base_layer()?];
        for name in ["middle", "top"] {
            let bytes = random_bytes(1 << 20)?;
            expected.insert(format!("/data/{name}"), sha256_hex(&bytes));
            layers.push(vec![
                tree::dir("/data", 0o755),
                tree::file(format!("/data/{name}"), bytes, 0o644),
            ]);
        }
        let image = stack.publish(fixture, "ahead", &layers)?;
        let [bottom, middle, top] = image.layers.as_slice() else {
            anyhow::bail!("3 layers expected, the manifest has {}", image.layers.len());
        };
        let proxy = stack.registry.proxy();
        proxy.reset();
        proxy.inject(&bottom.digest, Fault::Delay(BOTTOM_DELAY));
        let answered = |digest: &str| -> u64 {
            proxy
                .stats()
                .iter()
                .filter(|(path, _)| path.contains(digest))
                .map(|(_, stats)| stats.requests)
                .sum()
        };

        let pulled = std::thread::scope(|scope| {
            let pull = scope.spawn(|| stack.rpull(&image.estargz));
            let ahead = wait_until(
                "requests for the upper layers' blobs",
                BOTTOM_DELAY * 3,
                || Ok(answered(&middle.digest) > 0 && answered(&top.digest) > 0),
            );
            let bottom_answered = answered(&bottom.digest);
            proxy.clear_faults();
            let pulled = pull.join().expect("the rpull thread panicked");
            ahead.context("the upper layers were never read")?;
            anyhow::ensure!(
                bottom_answered == 0,
                "the upper layers were read only after the bottom layer's first answer: \
                 not ahead of their Prepare ({:#?})",
                proxy.stats()
            );
            pulled
        })?;
        ensure_all_lazy(&pulled, 3)?;

        // Prepared from the layers opened ahead, they serve the same files.
        ensure_sums(&stack, &image.estargz, "ahead", &expected)?;
        Ok(())
    });
}
