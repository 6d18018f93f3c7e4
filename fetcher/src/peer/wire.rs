//! The peer protocol's messages, JSON over HTTP/2:
//!
//! - `GET /health` → [`Health`]: liveness, and the node's id (how a node finds itself among
//!   the members).
//! - `POST /v1/announce` [`Announce`]: "I hold these blocks of this blob" to the blob's owners.
//! - `POST /v1/lookup` [`Lookup`] → [`LookupReply`]: per block, who holds it, or whether the
//!   asker should fetch it from the registry itself or wait for another node that is.
//! - `POST /v1/renew` [`Renew`]: "I am still fetching these blocks from the registry": the
//!   owner keeps the asker's exclusive right to fetch them, so nodes waiting for them keep
//!   waiting instead of fetching them too.
//! - `GET /v1/blobs/<digest>` with `Range: bytes=a-b`: block bytes from a holder's cache;
//!   404 when it does not hold them, 429 when it is busy. Blocks of a blob from a private
//!   repository also need [`PROOF_REPOSITORY`] and [`PROOF_AUTHORIZATION`] (see
//!   [`gate`](super::gate)); 403 without them, or when the registry refuses them.
//! - `GET /v1/traces/<image>/<blob>`: the learned-prefetch trace the node keeps for that
//!   image's layer blob, as bytes ([`trace`](super::trace)); 404 without one, and the same
//!   proof as for blocks for a private repository's blob.

use serde::{Deserialize, Serialize};

use super::blockset::MAX_SHARED_BLOCKS;

/// The repository (on the registry the holder fetched the blob from) a block request's
/// proof of pull access is for.
pub const PROOF_REPOSITORY: &str = "shoal-repository";
/// The `Authorization` value the requester reads that repository with: its proof.
pub const PROOF_AUTHORIZATION: &str = "shoal-pull-authorization";

/// Answers larger than this are refused.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// An announcement's body: the largest block set's hex and room for the rest; larger ones
/// are refused with 413.
pub const MAX_ANNOUNCE_BYTES: usize = (MAX_SHARED_BLOCKS / 4) as usize + 1024;
/// A lookup's or renewal's body, a few hundred bytes when honest; larger ones get 413.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Blocks one lookup may ask about.
pub const MAX_LOOKUP_BLOCKS: u64 = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    /// The announcer's peer address, as members know it.
    pub from: String,
    pub blob: String,
    pub block_size: u64,
    /// [`BlockSet`](super::blockset::BlockSet) hex.
    pub blocks: String,
    /// The full set the announcer holds (a lease renewal), not an addition.
    pub replace: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lookup {
    /// The asker's peer address; absent until it has found itself among the members.
    pub from: Option<String>,
    pub blob: String,
    pub block_size: u64,
    pub first: u64,
    pub count: u64,
}

/// Blocks `first..first+count` of `blob` that `from` was told to fetch and still is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renew {
    pub from: String,
    pub blob: String,
    pub block_size: u64,
    pub first: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LookupReply {
    /// One per block asked about, in order.
    pub blocks: Vec<Advice>,
}

/// What an owner tells an asker about one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Advice {
    /// Fetch it from these nodes, in this order (least loaded first).
    Holders { holders: Vec<String> },
    /// Nobody holds it: fetch it from the registry, then announce it.
    Fetch,
    /// `holder` is fetching it from the registry right now: ask again after `retry_ms`.
    Wait { holder: String, retry_ms: u64 },
}
