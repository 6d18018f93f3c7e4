//! Whether the blob can hold what the chunks claim, checked once at open rather than found
//! out read by read: no two chunks decode the same bytes of a gzip member, and no member is
//! asked for more data than deflate can expand its compressed bytes to. A TOC claiming a huge
//! file over a few bytes of blob is refused here.

use super::{Index, IndexError, Ino, NodeKind, MAX_DEFLATE_RATIO};

/// One chunk's claim on the blob: its member, the decompressed range inside it, and whose.
struct Claim {
    blob_offset: u64,
    blob_end: u64,
    inner_start: u64,
    inner_end: u64,
    ino: Ino,
    file_offset: u64,
}

pub(super) fn check(index: &Index) -> Result<(), IndexError> {
    // Hardlinks share a node, so each chunk is seen once.
    let mut claims: Vec<Claim> = index
        .nodes()
        .filter_map(|node| match node.kind {
            NodeKind::Regular { chunks } => Some((node.attr.ino, chunks)),
            _ => None,
        })
        .flat_map(|(ino, chunks)| {
            chunks.iter().map(move |chunk| Claim {
                blob_offset: chunk.blob_offset,
                blob_end: chunk.blob_end,
                inner_start: chunk.inner_offset,
                // Both are capped at MAX_CHUNK_SIZE when the chunk is built.
                inner_end: chunk.inner_offset + chunk.size,
                ino,
                file_offset: chunk.file_offset,
            })
        })
        .collect();
    claims.sort_unstable_by_key(|c| (c.blob_offset, c.inner_start));
    let path = |claim: &Claim| {
        index
            .path(claim.ino)
            .unwrap_or_else(|| format!("inode {}", claim.ino.get()))
    };
    let mut member_end = 0u64;
    for (i, claim) in claims.iter().enumerate() {
        let same_member = i > 0 && claims[i - 1].blob_offset == claim.blob_offset;
        if same_member && claim.inner_start < member_end {
            return Err(IndexError::ChunksOverlap {
                path: path(claim),
                file_offset: claim.file_offset,
                blob_offset: claim.blob_offset,
            });
        }
        member_end = if same_member {
            member_end.max(claim.inner_end)
        } else {
            claim.inner_end
        };
        let compressed = claim.blob_end - claim.blob_offset;
        if member_end > compressed.saturating_mul(MAX_DEFLATE_RATIO) {
            return Err(IndexError::ChunkBeyondData {
                path: path(claim),
                blob_offset: claim.blob_offset,
                claimed: member_end,
                compressed,
            });
        }
    }
    Ok(())
}
