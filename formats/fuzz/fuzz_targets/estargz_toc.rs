//! Fuzzes TOC decoding and the filesystem index built from it: the input is tried both as a
//! gzip TOC region and as raw `stargz.index.json` bytes. Any input must yield `Ok` or `Err`,
//! never a panic, hang or unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_formats::estargz::toc::decode_toc_json;
use shoal_formats::estargz::{parse_toc, Index, Ino, NodeKind};

/// Pretend TOC offset: data members must lie before it.
const TOC_OFFSET: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = parse_toc(data);
    let Ok(parsed) = decode_toc_json(data) else {
        return;
    };
    let built = Index::new(&parsed.toc, TOC_OFFSET);
    // Built as the JSON is decoded, the same tree or the same refusal.
    let streamed = Index::from_toc_json(data, TOC_OFFSET);
    let Ok(index) = built else {
        assert!(streamed.is_err());
        return;
    };
    let streamed = streamed.unwrap();
    assert!(index.nodes().eq(streamed.nodes()));
    for node in index.nodes() {
        assert_eq!(index.node(node.attr.ino), Some(node));
        match node.kind {
            NodeKind::Directory { children } => {
                let names: Vec<&str> = children.iter().map(|c| c.name).collect();
                assert!(names.windows(2).all(|w| w[0] < w[1]));
                for child in children.iter() {
                    assert_eq!(index.lookup(node.attr.ino, child.name), Some(child.ino));
                }
            }
            NodeKind::Regular { chunks } => {
                let mut next = 0;
                for chunk in chunks {
                    assert_eq!(chunk.file_offset, next);
                    assert!(chunk.blob_offset < chunk.blob_end && chunk.blob_end <= TOC_OFFSET);
                    next += chunk.size;
                }
                assert_eq!(next, if chunks.is_empty() { 0 } else { node.attr.size });
                let mid = node.attr.size / 2;
                let _ = index.chunks_for(node.attr.ino, mid, 1);
            }
            _ => {}
        }
    }
    assert_eq!(index.root().attr.ino, Ino::ROOT);
});
