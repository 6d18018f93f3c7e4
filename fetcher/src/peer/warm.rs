//! Spreading a preheated blob: the preheating node asks the blob's first nodes in rendezvous
//! order (its index owners first) to take the whole blob (`POST /v1/warm`). Each fetches it
//! as any read would (blocks from peers that hold them, the rest from the registry under the
//! owners' grants) and checks it against its digest before it shares a block of it: a blob
//! is verified whole or not shared, so a share is always a whole blob. Private blobs stay
//! gated: the asked node reads with its own credentials and proofs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::client::PeerFailure;
use super::member::PeerAddr;
use super::rendezvous;
use super::Peers;
use crate::digest::Digest;
use crate::reference::{BlobRef, ImageRef};

/// Blobs a node takes at once when asked; more get "busy".
pub const MAX_WARMING: usize = 4;
/// How long a node asked to take a blob may take: a whole blob from peers and the registry.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `POST /v1/warm`: take all of this blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Warm {
    /// `registry/repository`, where the blob lives.
    pub repository: String,
    pub digest: String,
    pub size: u64,
}

impl Warm {
    pub fn of(blob: &BlobRef) -> Warm {
        Warm {
            repository: format!("{}/{}", blob.image.host(), blob.image.repository_name()),
            digest: blob.digest.to_string(),
            size: blob.size,
        }
    }

    /// The blob asked for; `Err` names what is wrong with the request.
    pub fn blob(&self) -> Result<BlobRef, String> {
        let image = ImageRef::parse(&self.repository).map_err(|error| error.to_string())?;
        let digest = Digest::parse(&self.digest).map_err(|error| error.to_string())?;
        Ok(BlobRef::new(image, digest, self.size))
    }
}

/// What takes a whole blob on this node (the fetcher, which `peer/` does not know).
pub trait Warmer: Send + Sync {
    /// Brings all of `blob` into the cache and checks it against its digest; `Err`: why not.
    fn warm(&self, blob: BlobRef) -> BoxFuture<'static, Result<(), String>>;
}

impl Peers {
    /// Lets peers ask this node to take blobs, through `warmer`.
    pub fn set_warmer(&self, warmer: Arc<dyn Warmer>) {
        *self.warmer.write() = Some(warmer);
    }

    /// The live members but this node, in `blob`'s rendezvous order (its index owners
    /// first): who takes a share of it when it is spread.
    pub fn spread_order(&self, blob: &Digest) -> Vec<PeerAddr> {
        let live = self.members.live(Instant::now());
        let me = self.members.me();
        rendezvous::owners(blob, &live, live.len())
            .into_iter()
            .filter(|peer| Some(*peer) != me)
            .collect()
    }

    /// How many index owners each blob has.
    pub fn owners_per_blob(&self) -> usize {
        self.config.owners
    }

    /// Asks `peer` to take all of `blob`, waiting until it has (or `timeout`).
    pub async fn ask_to_warm(
        &self,
        peer: PeerAddr,
        blob: &BlobRef,
        timeout: Duration,
    ) -> Result<(), String> {
        self.client
            .warm(peer, &Warm::of(blob), timeout)
            .await
            .map_err(|failure| match failure {
                PeerFailure::Busy => "busy".to_owned(),
                other => other.to_string(),
            })
    }

    /// Serves a peer's `POST /v1/warm`: takes the blob, or says why not.
    pub(super) async fn warm(&self, warm: Warm) -> Result<(), (u16, String)> {
        let blob = warm.blob().map_err(|why| (400, why))?;
        let Some(warmer) = self.warmer.read().clone() else {
            return Err((503, "this node takes no blobs yet".into()));
        };
        let Ok(_slot) = self.warming.try_acquire() else {
            return Err((429, "busy taking other blobs".into()));
        };
        match tokio::time::timeout(WARM_TIMEOUT, warmer.warm(blob)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err((502, why)),
            Err(_) => Err((504, format!("not done within {WARM_TIMEOUT:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_request_names_the_blob_and_nothing_else() {
        let blob = BlobRef::new(
            ImageRef::parse("10.0.0.1:5000/team/app:v1").unwrap(),
            Digest::of(b"layer"),
            5,
        );
        let warm = Warm::of(&blob);
        assert_eq!(warm.repository, "10.0.0.1:5000/team/app");
        let back = warm.blob().unwrap();
        assert_eq!(back.image.host(), "10.0.0.1:5000");
        assert_eq!(back.image.repository_name(), "team/app");
        assert_eq!((back.digest, back.size), (blob.digest, 5));
        let bad = Warm {
            digest: "sha256:nothex".into(),
            ..warm
        };
        assert!(bad.blob().is_err());
    }
}
