//! Compatibility with the reference producer: a layer converted by stargz-snapshotter's
//! `ctr-remote` is read through our footer/TOC/index/chunk path, and our builder's TOC for the
//! same input agrees with ctr-remote's on everything but compressed offsets.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use flate2::read::{GzDecoder, MultiGzDecoder};
use shoal_formats::estargz::footer::FOOTER_SIZE;
use shoal_formats::estargz::index::{OPAQUE_XATTR, S_IFCHR, S_IFLNK};
use shoal_formats::estargz::{
    build, decompress_chunk, parse_footer, parse_toc, verify, BuildOptions, EntryType, Index,
    ParsedToc, Sha256Digest, Toc, TOC_DIGEST_ANNOTATION,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/estargz")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn open(blob: &[u8]) -> (ParsedToc, Index) {
    let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
    let parsed = parse_toc(&blob[footer.toc_offset as usize..blob.len() - footer.size]).unwrap();
    let index = Index::new(&parsed.toc, footer.toc_offset).unwrap();
    (parsed, index)
}

fn original_files() -> Vec<(String, Vec<u8>)> {
    let gz = fixture("original.tar.gz");
    let mut archive = tar::Archive::new(GzDecoder::new(&gz[..]));
    let mut files = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() == tar::EntryType::Regular {
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.push((path, data));
        }
    }
    files
}

fn json_field<'a>(value: &'a serde_json::Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_str()
        .unwrap_or_else(|| panic!("missing {path:?}"))
}

#[test]
fn ctr_remote_blob_reads_through_our_index() {
    let blob = fixture("ctr-remote.esgz");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fixture("ctr-remote.manifest.json")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&fixture("ctr-remote.config.json")).unwrap();
    let layer = &manifest["layers"][0];
    let (parsed, index) = open(&blob);

    let annotated = json_field(layer, &["annotations", TOC_DIGEST_ANNOTATION]);
    assert_eq!(parsed.digest.to_string(), annotated);
    assert_eq!(
        Sha256Digest::of(&blob).to_string(),
        json_field(layer, &["digest"])
    );
    let mut stream = Vec::new();
    MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut stream)
        .unwrap();
    assert_eq!(
        Sha256Digest::of(&stream).to_string(),
        config["rootfs"]["diff_ids"][0].as_str().unwrap()
    );

    for (path, content) in original_files() {
        if path.contains(".wh.") {
            continue;
        }
        let ino = index.lookup_path(&path).unwrap_or_else(|| panic!("{path}"));
        let mut data = Vec::new();
        for chunk in index.chunks_for(ino, 0, u64::MAX).unwrap() {
            let bytes = decompress_chunk(
                &blob[chunk.blob_offset as usize..chunk.blob_end as usize],
                chunk,
            )
            .unwrap();
            verify(&bytes, &chunk.digest, &path, chunk.file_offset).unwrap();
            data.extend(bytes);
        }
        assert_eq!(data, content, "{path}");
    }
    let big = index.lookup_path("bin/big").unwrap();
    assert_eq!(index.chunks_for(big, 0, u64::MAX).unwrap().len(), 4);
    assert_eq!(
        index.lookup_path("bin/link"),
        index.lookup_path("bin/small")
    );
    let sym = index.node(index.lookup_path("sym").unwrap()).unwrap();
    assert_eq!(sym.attr.file_type(), S_IFLNK);
    let gone = index.node(index.lookup_path("etc/gone").unwrap()).unwrap();
    assert_eq!((gone.attr.file_type(), gone.attr.rdev()), (S_IFCHR, 0));
    let opt = index.node(index.lookup_path("opt").unwrap()).unwrap();
    assert_eq!(opt.xattrs[OPAQUE_XATTR], b"y");
    let x = index.node(index.lookup_path("etc/x").unwrap()).unwrap();
    assert_eq!(x.xattrs["user.k"], b"v");
    assert_eq!(index.prefetch_end(), None);
}

/// The TOC with compressed positions cleared (they depend on the deflate encoder) and user and
/// group names resolved as readers do (the reference builder restarts its "only when changed"
/// tracking in each of its parallel workers, so where names repeat varies).
fn layout_free(mut toc: Toc) -> Toc {
    let mut users = HashMap::new();
    let mut groups = HashMap::new();
    for entry in &mut toc.entries {
        entry.offset = 0;
        if entry.kind == EntryType::Chunk {
            continue;
        }
        for (names, id, name) in [
            (&mut users, entry.uid, &mut entry.user_name),
            (&mut groups, entry.gid, &mut entry.group_name),
        ] {
            if name.is_empty() {
                *name = names.get(&id).cloned().unwrap_or_default();
            } else {
                names.insert(id, name.clone());
            }
        }
    }
    toc
}

#[test]
fn our_toc_matches_ctr_remote_apart_from_offsets() {
    let (reference, _) = open(&fixture("ctr-remote.esgz"));
    let mut blob = Vec::new();
    let options = BuildOptions {
        chunk_size: 65536,
        ..BuildOptions::default()
    };
    let output = build(&fixture("original.tar.gz")[..], &mut blob, options).unwrap();
    let (ours, _) = open(&blob);
    assert_eq!(ours.digest, output.toc_digest);
    assert_eq!(layout_free(ours.toc), layout_free(reference.toc));
}
