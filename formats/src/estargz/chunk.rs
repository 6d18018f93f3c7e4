//! Decompressing and verifying one chunk of a regular file.
//!
//! In the reference layout a file's data starts a fresh gzip member (its tar header went into
//! the member before), so a chunk is `size` bytes at `inner_offset` (usually 0) of the stream
//! that starts at the chunk's blob offset.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

use super::digest::Sha256Digest;
use super::index::{Chunk, MAX_CHUNK_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("decompress chunk at blob offset {blob_offset}: {source}")]
    Decompress { blob_offset: u64, source: io::Error },
    #[error("chunk at blob offset {blob_offset} decompressed to {got} bytes, expected {expected}")]
    Truncated {
        blob_offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("{file}: chunk at file offset {file_offset} has digest {actual}, toc says {expected}")]
    ChunkDigestMismatch {
        file: String,
        file_offset: u64,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
}

/// Decompresses `chunk` from `compressed`, the blob bytes `chunk.blob_offset..chunk.blob_end`,
/// and returns exactly `chunk.size` bytes.
pub fn decompress_chunk(compressed: &[u8], chunk: &Chunk) -> Result<Vec<u8>, ChunkError> {
    decompress(
        compressed,
        chunk.blob_offset,
        chunk.inner_offset,
        chunk.size,
    )
}

/// Decompresses the gzip stream `compressed` (which starts at `blob_offset` in the blob, for
/// error messages), skips `inner_offset` bytes and returns the next `size` bytes.
pub fn decompress(
    compressed: &[u8],
    blob_offset: u64,
    inner_offset: u64,
    size: u64,
) -> Result<Vec<u8>, ChunkError> {
    if size > MAX_CHUNK_SIZE || inner_offset > MAX_CHUNK_SIZE {
        return Err(ChunkError::TooLarge {
            size: size.max(inner_offset),
            max: MAX_CHUNK_SIZE,
        });
    }
    let decompress_error = |source| ChunkError::Decompress {
        blob_offset,
        source,
    };
    // Several members may follow one another before `blob_end` when a producer packs small
    // files together; read across them like the reference reader does.
    let mut stream = MultiGzDecoder::new(compressed);
    let skipped = io::copy(&mut (&mut stream).take(inner_offset), &mut io::sink())
        .map_err(decompress_error)?;
    let truncated = |got| ChunkError::Truncated {
        blob_offset,
        expected: inner_offset + size,
        got,
    };
    if skipped != inner_offset {
        return Err(truncated(skipped));
    }
    // `size` is capped above, so this allocation is bounded.
    let mut out = Vec::with_capacity(size as usize);
    stream
        .take(size)
        .read_to_end(&mut out)
        .map_err(decompress_error)?;
    if out.len() as u64 != size {
        return Err(truncated(inner_offset + out.len() as u64));
    }
    Ok(out)
}

/// Checks decompressed chunk `data` of `file` against the TOC's chunk digest.
pub fn verify(
    data: &[u8],
    expected: &Sha256Digest,
    file: &str,
    file_offset: u64,
) -> Result<(), ChunkError> {
    let actual = Sha256Digest::of(data);
    if actual != *expected {
        return Err(ChunkError::ChunkDigestMismatch {
            file: file.to_owned(),
            file_offset,
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn returns_exact_bytes_after_inner_offset() {
        let member = gzip(b"headerDATA-and-padding");
        assert_eq!(decompress(&member, 0, 6, 4).unwrap(), b"DATA");
        let mut two = gzip(b"abc");
        two.extend(gzip(b"def"));
        assert_eq!(decompress(&two, 0, 2, 3).unwrap(), b"cde");
    }

    #[test]
    fn short_stream_is_truncated_error() {
        let err = decompress(&gzip(b"abc"), 9, 1, 5).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::Truncated {
                    blob_offset: 9,
                    expected: 6,
                    got: 3
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn corrupt_gzip_is_decompress_error() {
        let mut member = gzip(&[7u8; 1000]);
        member[12] ^= 0x55;
        member[13] ^= 0x55;
        let err = decompress(&member, 0, 0, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::Decompress { .. } | ChunkError::Truncated { .. }
            ),
            "{err}"
        );
        assert!(matches!(
            decompress(b"not gzip", 0, 0, 1),
            Err(ChunkError::Decompress { .. })
        ));
    }

    #[test]
    fn oversized_request_is_rejected_before_allocating() {
        assert!(matches!(
            decompress(&gzip(b"x"), 0, 0, u64::MAX),
            Err(ChunkError::TooLarge { .. })
        ));
    }

    #[test]
    fn verify_names_the_file_on_mismatch() {
        let expected = Sha256Digest::of(b"good");
        verify(b"good", &expected, "bin/sh", 0).unwrap();
        let err = verify(b"evil", &expected, "bin/sh", 4096).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bin/sh") && text.contains("4096"), "{text}");
        assert!(matches!(err, ChunkError::ChunkDigestMismatch { .. }));
    }
}
