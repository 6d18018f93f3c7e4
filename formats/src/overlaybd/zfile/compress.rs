//! ZFile writer: what the converter uses to compress an LSMT layer file.

use super::{
    crc32c_raw, Algorithm, HeaderTrailer, Record, ZFileError, BLOCK_CRC_SEED, HEADER_SIZE,
    MAX_BLOCK_SIZE,
};

/// Compresses `raw` into a ZFile with `block_size`-byte blocks, per-block CRCs and digests.
///
/// The header is written in its final form (information valid), as the reference converter
/// leaves it, so readers can use either end.
pub fn compress(raw: &[u8], block_size: u32, algorithm: Algorithm) -> Result<Vec<u8>, ZFileError> {
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(ZFileError::BlockSize { block_size });
    }
    let mut out = vec![0u8; HEADER_SIZE];
    let mut jump_table = Vec::with_capacity(raw.len().div_ceil(block_size as usize) * 4);
    for (index, block) in raw.chunks(block_size as usize).enumerate() {
        let start = out.len();
        let compressed =
            compress_block(block, algorithm).map_err(|source| ZFileError::Compress {
                index: index as u64,
                algorithm,
                source,
            })?;
        out.extend_from_slice(&compressed);
        let crc = crc32c_raw(BLOCK_CRC_SEED, &compressed);
        out.extend_from_slice(&crc.to_le_bytes());
        // A block of at most MAX_BLOCK_SIZE compresses to well under 4 GiB.
        let len = (out.len() - start) as u32;
        jump_table.extend_from_slice(&len.to_le_bytes());
    }
    let trailer = HeaderTrailer {
        flags: 0,
        index_offset: out.len() as u64,
        index_size: (jump_table.len() / 4) as u64,
        original_size: raw.len() as u64,
        index_crc: crc32c_raw(0, &jump_table),
        block_size,
        algorithm,
        level: 0,
        dict_size: 0,
        verify: true,
    };
    out.extend_from_slice(&jump_table);
    out.extend_from_slice(&trailer.encode(Record::Trailer));
    out[..HEADER_SIZE].copy_from_slice(&trailer.encode(Record::Header));
    Ok(out)
}

fn compress_block(
    block: &[u8],
    algorithm: Algorithm,
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    match algorithm {
        Algorithm::Lz4 => Ok(lz4_flex::block::compress(block)),
        // Level 0 selects zstd's default level, as the header's level 0 does for the reference.
        Algorithm::Zstd => Ok(zstd::bulk::compress(block, 0)?),
    }
}
