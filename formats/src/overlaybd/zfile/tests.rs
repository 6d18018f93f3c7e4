use super::*;

fn sample(len: usize) -> Vec<u8> {
    // Compressible but not trivial: runs of a counter with some noise.
    (0..len)
        .map(|i| ((i / 7) as u8) ^ ((i % 13) as u8))
        .collect()
}

fn parts(file: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let info = ZFileInfo::parse(&file[..512], &file[file.len() - 512..]).unwrap();
    let range = info.jump_table_range(file.len() as u64).unwrap();
    (
        &file[..512],
        &file[file.len() - 512..],
        &file[range.start as usize..range.end as usize],
    )
}

#[test]
fn compress_then_read_round_trips_both_algorithms() {
    for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
        for len in [0usize, 1, 4095, 4096, 4097, 50_000] {
            let raw = sample(len);
            let file = compress(&raw, 4096, algorithm).unwrap();
            let reader = ZFileReader::open(file.as_slice()).unwrap();
            let zfile = reader.zfile();
            assert_eq!(zfile.algorithm(), algorithm);
            assert_eq!(zfile.uncompressed_size(), len as u64);
            assert_eq!(zfile.block_count(), len.div_ceil(4096) as u64);
            let mut back = vec![0u8; len];
            reader.read_exact_at(0, &mut back).unwrap();
            assert_eq!(back, raw, "{algorithm:?} len {len}");
        }
    }
}

#[test]
fn unaligned_reads_span_blocks() {
    let raw = sample(20_000);
    let file = compress(&raw, 1024, Algorithm::Lz4).unwrap();
    let reader = ZFileReader::open(file).unwrap();
    let mut buf = vec![0u8; 3000];
    reader.read_exact_at(1000, &mut buf).unwrap();
    assert_eq!(buf, raw[1000..4000]);
    assert!(reader.read_exact_at(19_000, &mut buf).is_err());
}

#[test]
fn corrupt_header_digest_is_rejected() {
    let file = compress(&sample(9000), 4096, Algorithm::Lz4).unwrap();
    let (header, trailer, table) = parts(&file);
    let mut header = header.to_vec();
    header[100] ^= 0x40;
    let err = ZFile::parse(&header, trailer, table).unwrap_err();
    assert!(
        matches!(
            err,
            ZFileError::Digest {
                record: Record::Header,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_trailer_digest_is_rejected() {
    let mut file = compress(&sample(9000), 4096, Algorithm::Lz4).unwrap();
    let at = file.len() - 100;
    file[at] ^= 1;
    let err = ZFile::open(file.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            ZFileError::Digest {
                record: Record::Trailer,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_jump_table_crc_is_rejected() {
    let file = compress(&sample(9000), 4096, Algorithm::Lz4).unwrap();
    let (header, trailer, table) = parts(&file);
    let mut table = table.to_vec();
    // Keep the lengths plausible: move one byte between the first two blocks.
    let first = u32::from_le_bytes(table[0..4].try_into().unwrap());
    let second = u32::from_le_bytes(table[4..8].try_into().unwrap());
    table[0..4].copy_from_slice(&(first + 1).to_le_bytes());
    table[4..8].copy_from_slice(&(second - 1).to_le_bytes());
    let err = ZFile::parse(header, trailer, &table).unwrap_err();
    assert!(matches!(err, ZFileError::JumpTableChecksum { .. }), "{err}");
}

#[test]
fn flipped_block_byte_names_the_block() {
    let raw = sample(3 * 4096);
    let mut file = compress(&raw, 4096, Algorithm::Lz4).unwrap();
    let zfile = ZFile::open(file.as_slice()).unwrap();
    let block = zfile.block_range(1).unwrap();
    file[block.start as usize + 3] ^= 0x10;
    let compressed = &file[block.start as usize..block.end as usize];
    let err = zfile.decompress_block(compressed, 1).unwrap_err();
    assert!(
        matches!(err, ZFileError::BlockChecksum { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("block 1"), "{err}");
    let reader = ZFileReader::new(zfile, file);
    let mut buf = [0u8; 10];
    reader.read_exact_at(0, &mut buf).unwrap();
    assert!(reader.read_exact_at(4096, &mut buf).is_err());
}

#[test]
fn truncated_files_are_rejected() {
    let file = compress(&sample(9000), 4096, Algorithm::Zstd).unwrap();
    for cut in [0, 100, 600, file.len() / 2, file.len() - 1] {
        assert!(ZFile::open(&file[..cut]).is_err(), "cut at {cut}");
    }
    let (header, trailer, table) = parts(&file);
    let err = ZFile::parse(header, trailer, &table[..table.len() - 4]).unwrap_err();
    assert!(matches!(err, ZFileError::JumpTableLength { .. }), "{err}");
    let err = ZFile::parse(header, &trailer[..511], table).unwrap_err();
    assert!(
        matches!(err, ZFileError::RecordLength { len: 511, .. }),
        "{err}"
    );
}

#[test]
fn wrong_slice_and_block_index_are_errors() {
    let file = compress(&sample(5000), 4096, Algorithm::Lz4).unwrap();
    let zfile = ZFile::open(file.as_slice()).unwrap();
    assert!(matches!(
        zfile.decompress_block(&[1, 2, 3], 0),
        Err(ZFileError::CompressedLength { index: 0, .. })
    ));
    assert!(matches!(
        zfile.block_range(2),
        Err(ZFileError::BlockIndex { index: 2, count: 2 })
    ));
    assert_eq!(zfile.block_len(1).unwrap(), 5000 - 4096);
}

#[test]
fn unsupported_block_size_is_an_error() {
    assert!(matches!(
        compress(b"x", 0, Algorithm::Lz4),
        Err(ZFileError::BlockSize { block_size: 0 })
    ));
    assert!(compress(b"x", MAX_BLOCK_SIZE + 1, Algorithm::Lz4).is_err());
}

#[test]
fn raw_crc32c_matches_the_reference_convention() {
    // The reference's crc32c() of zeros stays 0; standard CRC32C of 4 zero bytes does not.
    assert_eq!(crc32c_raw(0, &[0; 4]), 0);
    assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
    // Streaming in pieces equals one pass, as the header digest relies on.
    let data = sample(1000);
    assert_eq!(
        crc32c_raw(7, &data),
        crc32c_raw(crc32c_raw(7, &data[..300]), &data[300..])
    );
}

#[test]
fn header_disagreeing_with_trailer_is_rejected() {
    let file = compress(&sample(9000), 4096, Algorithm::Lz4).unwrap();
    let (_, trailer, table) = parts(&file);
    let mut info = HeaderTrailer::parse_trailer(trailer).unwrap();
    info.original_size -= 1;
    let header = info.encode(Record::Header);
    let err = ZFile::parse(&header, trailer, table).unwrap_err();
    assert!(matches!(err, ZFileError::HeaderMismatch), "{err}");
}

#[test]
fn a_span_covers_exactly_the_blocks_of_a_range() {
    let raw = sample(10_000);
    let file = compress(&raw, 1024, Algorithm::Lz4).unwrap();
    let zfile = ZFile::open(file.as_slice()).unwrap();
    let span = zfile.span(1500..4100).unwrap();
    assert_eq!(span.blocks, 1..5);
    assert_eq!(span.keep, 476..3076);
    assert_eq!(span.compressed.start, zfile.block_range(1).unwrap().start);
    assert_eq!(span.compressed.end, zfile.block_range(4).unwrap().end);
    let compressed = &file[span.compressed.start as usize..span.compressed.end as usize];
    let blocks = zfile.decode_span(&span, compressed).unwrap();
    assert_eq!(blocks.len(), 4 * 1024);
    assert_eq!(blocks[span.keep.clone()], raw[1500..4100]);
    // The last block is short; an empty range needs no block; past the end is refused.
    let last = zfile.span(9990..10_000).unwrap();
    assert_eq!(
        zfile
            .decode_span(
                &last,
                &file[last.compressed.start as usize..last.compressed.end as usize]
            )
            .unwrap()
            .len(),
        10_000 - 9 * 1024
    );
    assert!(zfile.span(500..500).unwrap().blocks.is_empty());
    assert!(matches!(
        zfile.span(9000..10_001),
        Err(ZFileError::SpanRange { .. })
    ));
}
