//! Fuzzes eStargz blob opening from its end: footer parsing (current and legacy layouts), then
//! the TOC region, index construction and a bounded number of chunk reads. Any input must
//! yield `Ok` or `Err`, never a panic, hang or unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_formats::estargz::{
    decompress_chunk, footer::FOOTER_SIZE, parse_footer, parse_toc, verify, Footer, Index, NodeKind,
};

/// Chunks decompressed per input: enough to reach the data paths, bounded in time.
const MAX_CHUNKS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let tail = &data[data.len().saturating_sub(FOOTER_SIZE)..];
    let Ok(footer) = parse_footer(size, tail) else {
        return;
    };
    // Whatever parsed must re-encode to the bytes it came from.
    if footer.size == FOOTER_SIZE {
        assert_eq!(
            parse_footer(
                FOOTER_SIZE as u64 + footer.toc_offset + 1,
                &Footer::encode(footer.toc_offset)
            )
            .map(|f| f.toc_offset),
            Ok(footer.toc_offset)
        );
    }
    let region = &data[footer.toc_offset as usize..data.len() - footer.size];
    let Ok(parsed) = parse_toc(region) else {
        return;
    };
    let Ok(index) = Index::new(&parsed.toc, footer.toc_offset) else {
        return;
    };
    let mut budget = MAX_CHUNKS;
    for node in index.nodes() {
        let NodeKind::Regular { .. } = node.kind else {
            continue;
        };
        for chunk in index
            .chunks_for(node.attr.ino, 0, u64::MAX)
            .unwrap_or_default()
        {
            if budget == 0 {
                return;
            }
            budget -= 1;
            let compressed = &data[chunk.blob_offset as usize..chunk.blob_end as usize];
            if let Ok(bytes) = decompress_chunk(compressed, chunk) {
                assert_eq!(bytes.len() as u64, chunk.size);
                let path = index.path(node.attr.ino).unwrap_or_default();
                let _ = verify(&bytes, &chunk.digest, &path, chunk.file_offset);
            }
        }
    }
});
