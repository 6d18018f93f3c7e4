//! Spreading a preheated image: once every blob is here, verified and announced, the first
//! `nodes` other nodes in each blob's rendezvous order (its index owners first) are asked to
//! take the whole blob over the peer protocol (`POST /v1/warm`): each fetches it from the
//! nodes that hold it, checks it against its digest and shares it from then on. A node that
//! cannot (busy, down, refused a private blob) is reported and the job still succeeds: the
//! preheating node holds every block.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use shoal_fetcher::peer::{PeerAddr, Peers, WARM_TIMEOUT};
use shoal_fetcher::BlobRef;
use tracing::{info, warn};

use super::jobs::{BlobOutcome, Jobs};
use super::run::blob_url;

/// Blobs being taken by other nodes at once, over all of them.
const AT_ONCE: usize = 8;

/// Asks the nodes each blob goes to; records each (node, blob) in `outcomes`.
pub async fn spread(
    peers: &Peers,
    jobs: &Jobs,
    id: u64,
    blobs: &[BlobRef],
    nodes: Option<u64>,
    timeout: Duration,
    outcomes: &mut Vec<BlobOutcome>,
) {
    let per_blob = nodes.unwrap_or(peers.owners_per_blob() as u64);
    let asks: Vec<(PeerAddr, BlobRef)> = blobs
        .iter()
        .flat_map(|blob| {
            peers
                .spread_order(&blob.digest)
                .into_iter()
                .take(usize::try_from(per_blob).unwrap_or(usize::MAX))
                .map(move |peer| (peer, blob.clone()))
        })
        .collect();
    let mut by_node: BTreeMap<PeerAddr, bool> =
        asks.iter().map(|(peer, _)| (*peer, true)).collect();
    jobs.progress(id, |p| {
        p.phase = "spreading".into();
        p.nodes_asked = by_node.len() as u64;
    });
    let timeout = timeout.min(WARM_TIMEOUT);
    let answers: Vec<(PeerAddr, BlobRef, Result<(), String>)> = stream::iter(asks)
        .map(|(peer, blob)| async move {
            let answer = peers.ask_to_warm(peer, &blob, timeout).await;
            (peer, blob, answer)
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    for (peer, blob, answer) in answers {
        if let Err(why) = &answer {
            warn!(job = id, %peer, blob = %blob.digest, why, "a node did not take a preheated blob");
            by_node.insert(peer, false);
        }
        outcomes.push(BlobOutcome {
            url: blob_url(&blob),
            node: Some(peer.0),
            failure: answer.err(),
        });
    }
    let spread = by_node.values().filter(|took| **took).count() as u64;
    info!(
        job = id,
        nodes = by_node.len(),
        took_all = spread,
        "preheat spread"
    );
    jobs.progress(id, |p| p.nodes_spread = spread);
}
