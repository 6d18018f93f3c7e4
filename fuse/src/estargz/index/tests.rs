use super::*;
use crate::estargz::toc::decode_toc_json;

const TOC_OFFSET: u64 = 10_000;

fn index(json: &str) -> Result<Index, IndexError> {
    let toc = decode_toc_json(json.as_bytes()).unwrap().toc;
    Index::new(&toc, TOC_OFFSET)
}

fn toc(entries: &str) -> String {
    format!(r#"{{"version":1,"entries":[{entries}]}}"#)
}

#[test]
fn go_style_chunks_get_sizes_and_member_ends() {
    // As the reference writer emits them: chunkSize omitted on the last chunk.
    let index = index(&toc(r#"
        {"name":"big","type":"reg","size":10,"offset":100,"chunkSize":4},
        {"name":"big","type":"chunk","offset":200,"chunkOffset":4,"chunkSize":4},
        {"name":"big","type":"chunk","offset":300,"chunkOffset":8},
        {"name":"small","type":"reg","size":3,"offset":400},
        {"name":"packed","type":"reg","size":2,"offset":400,"innerOffset":512}
    "#))
    .unwrap();
    let big = index.lookup_path("big").unwrap();
    let chunks = index.chunks_for(big, 0, 10).unwrap();
    let shape: Vec<_> = chunks
        .iter()
        .map(|c| (c.file_offset, c.size, c.blob_offset, c.blob_end))
        .collect();
    assert_eq!(
        shape,
        [(0, 4, 100, 200), (4, 4, 200, 300), (8, 2, 300, 400)]
    );
    let packed = index.lookup_path("packed").unwrap();
    let chunk = &index.chunks_for(packed, 0, 2).unwrap()[0];
    assert_eq!(
        (chunk.blob_offset, chunk.blob_end, chunk.inner_offset),
        (400, TOC_OFFSET, 512)
    );
}

#[test]
fn whole_file_digest_stands_in_for_single_chunk() {
    let digest = crate::estargz::Sha256Digest::of(b"abc");
    let index = index(&toc(&format!(
        r#"{{"name":"f","type":"reg","size":3,"offset":1,"digest":"{digest}"}}"#
    )))
    .unwrap();
    let f = index.lookup_path("f").unwrap();
    assert_eq!(index.chunks_for(f, 0, 3).unwrap()[0].digest, Some(digest));
}

#[test]
fn names_are_cleaned_and_later_duplicates_win() {
    let index = index(&toc(r#"
        {"name":"/etc/../../etc/passwd","type":"reg","mode":384},
        {"name":"./etc/passwd","type":"reg","mode":420},
        {"name":"etc/x","type":"reg"},
        {"name":"etc/.wh.x","type":"reg"},
        {"name":"etc/.wh.gone","type":"reg"},
        {"name":"etc/gone","type":"symlink","linkName":"x"}
    "#))
    .unwrap();
    let passwd = index
        .node(index.lookup_path("etc/passwd").unwrap())
        .unwrap();
    assert_eq!(passwd.attr.mode, S_IFREG | 0o644);
    let etc = index.lookup_path("etc").unwrap();
    let names: Vec<_> = index
        .children(etc)
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["gone", "passwd", "x"]);
    // A whiteout never hides a real entry of the same layer, whatever the order.
    let x = index.node(index.lookup_path("etc/x").unwrap()).unwrap();
    assert_eq!(x.attr.file_type(), S_IFREG);
    let gone = index.node(index.lookup_path("etc/gone").unwrap()).unwrap();
    assert_eq!(gone.attr.file_type(), S_IFLNK);
}

#[test]
fn explicit_directory_after_implicit_keeps_children_and_takes_attrs() {
    let index = index(&toc(r#"
        {"name":"a/b/f","type":"reg"},
        {"name":"a/","type":"dir","mode":448,"uid":7}
    "#))
    .unwrap();
    let a = index.node(index.lookup_path("a").unwrap()).unwrap();
    assert_eq!(
        (a.attr.mode, a.attr.uid, a.attr.nlink),
        (S_IFDIR | 0o700, 7, 3)
    );
    assert!(index.lookup_path("a/b/f").is_some());
    let b = index.node(index.lookup_path("a/b").unwrap()).unwrap();
    assert_eq!(b.attr.mode, S_IFDIR | 0o755);
}

#[test]
fn hardlink_chains_resolve_and_count_links() {
    let index = index(&toc(r#"
        {"name":"l2","type":"hardlink","linkName":"l1"},
        {"name":"f","type":"reg","size":1,"offset":5},
        {"name":"l1","type":"hardlink","linkName":"/f"}
    "#))
    .unwrap();
    let f = index.lookup_path("f").unwrap();
    assert_eq!(index.lookup_path("l1"), Some(f));
    assert_eq!(index.lookup_path("l2"), Some(f));
    assert_eq!(index.node(f).unwrap().attr.nlink, 3);
}

#[test]
fn landmarks_are_hidden_and_reported() {
    let index = index(&toc(r#"
        {"name":"a","type":"reg","size":1,"offset":10},
        {"name":".prefetch.landmark","type":"reg","size":1,"offset":50},
        {"name":"b","type":"reg","size":1,"offset":90}
    "#))
    .unwrap();
    assert_eq!(index.prefetch_end(), Some(50));
    assert!(index.lookup_path(".prefetch.landmark").is_none());
    let a = index.lookup_path("a").unwrap();
    assert_eq!(index.chunks_for(a, 0, 1).unwrap()[0].blob_end, 50);
}

#[test]
fn empty_toc_is_an_empty_root() {
    let index = index(&toc("")).unwrap();
    assert_eq!(index.len(), 1);
    assert_eq!(index.root().attr.mode, S_IFDIR | 0o755);
    assert_eq!(index.prefetch(), Prefetch::Unspecified);
}

#[test]
fn inconsistent_tocs_are_errors() {
    let cases = [
        (r#"{"name":"x","type":"chunk","offset":1}"#, "OrphanChunk"),
        (
            r#"{"name":"d","type":"dir"},{"name":"d","type":"chunk","offset":1}"#,
            "OrphanChunk",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":4}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":4},
               {"name":"f","type":"chunk","offset":2,"chunkOffset":5}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":40}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":1,"offset":10000}"#,
            "DataOffsetOutOfRange",
        ),
        (
            r#"{"name":"f","type":"reg","size":100000000,"offset":1}"#,
            "ChunkTooLarge",
        ),
        (
            r#"{"name":"a","type":"reg"},{"name":"a/b","type":"reg"}"#,
            "PathConflict",
        ),
        (
            r#"{"name":"a/b","type":"reg"},{"name":"a","type":"fifo"}"#,
            "PathConflict",
        ),
        (r#"{"name":"./","type":"reg"}"#, "RootNotDirectory"),
        (
            r#"{"name":"h","type":"hardlink","linkName":"nope"}"#,
            "HardlinkTargetMissing",
        ),
        (
            r#"{"name":"a","type":"hardlink","linkName":"b"},{"name":"b","type":"hardlink","linkName":"a"}"#,
            "HardlinkTargetMissing",
        ),
        (
            r#"{"name":"d","type":"dir"},{"name":"h","type":"hardlink","linkName":"d"}"#,
            "HardlinkToDirectory",
        ),
        (r#"{"name":"a\u0000b","type":"reg"}"#, "InvalidName"),
    ];
    for (entries, expected) in cases {
        let err = index(&toc(entries)).unwrap_err();
        assert!(
            format!("{err:?}").starts_with(expected),
            "{entries}: {err:?}"
        );
    }
}
