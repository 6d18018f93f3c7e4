use super::*;
use crate::estargz::toc::decode_toc_json;

const TOC_OFFSET: u64 = 10_000;

fn index(json: &str) -> Result<Index, IndexError> {
    index_at(json, TOC_OFFSET)
}

fn index_at(json: &str, toc_offset: u64) -> Result<Index, IndexError> {
    let toc = decode_toc_json(json.as_bytes()).unwrap().toc;
    Index::new(&toc, toc_offset)
}

fn toc(entries: &str) -> String {
    format!(r#"{{"version":1,"entries":[{entries}]}}"#)
}

#[test]
fn go_style_chunks_get_sizes_and_member_ends() {
    // As the reference writer emits them: chunkSize omitted on the last chunk.
    let index = index(&toc(r#"
        {"name":"big","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":"big","type":"chunk","offset":200,"chunkOffset":4,"chunkSize":4,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":"big","type":"chunk","offset":300,"chunkOffset":8,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":"small","type":"reg","size":3,"offset":400,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":"packed","type":"reg","size":2,"offset":400,"innerOffset":512,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
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
    assert_eq!(index.chunks_for(f, 0, 3).unwrap()[0].digest, digest);
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
        .map(|e| e.name)
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
        {"name":"f","type":"reg","size":1,"offset":5,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
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
        {"name":"a","type":"reg","size":1,"offset":10,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":".prefetch.landmark","type":"reg","size":1,"offset":50,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
        {"name":"b","type":"reg","size":1,"offset":90,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
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
        (
            r#"{"name":"x","type":"chunk","offset":1,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "OrphanChunk",
        ),
        (
            r#"{"name":"d","type":"dir"},{"name":"d","type":"chunk","offset":1,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "OrphanChunk",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":4,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":4,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
               {"name":"f","type":"chunk","offset":2,"chunkOffset":5,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":10,"offset":1,"chunkSize":40,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "ChunkLayout",
        ),
        (
            r#"{"name":"f","type":"reg","size":1,"offset":10000,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
            "DataOffsetOutOfRange",
        ),
        (
            r#"{"name":"f","type":"reg","size":100000000,"offset":1,"chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}"#,
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
            "HardlinkCycle",
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

const DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// `Index::new` on a thread with a small stack, as a recursion per path component would
/// overflow it long before the depth limit.
fn index_on_small_stack(json: String) -> Result<Index, IndexError> {
    let toc = decode_toc_json(json.as_bytes()).unwrap().toc;
    std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(move || Index::new(&toc, TOC_OFFSET))
        .unwrap()
        .join()
        .unwrap()
}

fn nested(depth: usize) -> String {
    vec!["d"; depth].join("/")
}

#[test]
fn deep_nesting_is_built_without_recursion_and_refused_past_the_limit() {
    // One file under the deepest nesting allowed: every ancestor is an implicit directory.
    let deepest = nested(MAX_DEPTH - 1);
    let index =
        index_on_small_stack(toc(&format!(r#"{{"name":"{deepest}/f","type":"reg"}}"#))).unwrap();
    assert_eq!(index.len(), MAX_DEPTH + 1);
    let f = index.lookup_path(&format!("{deepest}/f")).unwrap();
    assert_eq!(index.path(f).unwrap(), format!("{deepest}/f"));
    // What killed the daemon: one file under 6,000 directories (a path no unpack could make).
    let err = index_on_small_stack(toc(&format!(
        r#"{{"name":"{}/f","type":"reg"}}"#,
        nested(6000)
    )))
    .unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::PathTooLong {
                len: 12001,
                max: MAX_PATH_LEN,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().len() < 400, "{err}");
}

#[test]
fn names_and_paths_an_unpack_could_not_create_are_refused() {
    let longest = "n".repeat(MAX_NAME_LEN);
    index(&toc(&format!(r#"{{"name":"{longest}","type":"reg"}}"#))).unwrap();
    let cases = [
        (
            format!(
                r#"{{"name":"d/{}","type":"reg"}}"#,
                "n".repeat(MAX_NAME_LEN + 1)
            ),
            "NameTooLong",
        ),
        (
            format!(
                r#"{{"name":"d/{}/","type":"dir"}}"#,
                "n".repeat(MAX_NAME_LEN + 1)
            ),
            "NameTooLong",
        ),
        (
            format!(
                r#"{{"name":"{}","type":"reg"}}"#,
                vec!["n".repeat(200); 21].join("/")
            ),
            "PathTooLong",
        ),
        (
            format!(
                r#"{{"name":"l","type":"symlink","linkName":"{}"}}"#,
                "t".repeat(MAX_PATH_LEN + 1)
            ),
            "PathTooLong",
        ),
        (
            format!(r#"{{"name":"{}","type":"fifo"}}"#, nested(MAX_DEPTH + 1)),
            "TooDeep",
        ),
    ];
    for (entries, expected) in cases {
        let err = index(&toc(&entries)).unwrap_err();
        assert!(format!("{err:?}").starts_with(expected), "{err:?}");
        assert!(err.to_string().len() < 400, "{err}");
    }
}

/// A 128 GiB file in 64 MiB chunks, chunk `i` at blob offset `offset(i)` and inner offset
/// `inner(i)`.
fn huge_file(offset: impl Fn(u64) -> u64, inner: impl Fn(u64) -> u64) -> String {
    let chunk = MAX_CHUNK_SIZE;
    let count = (128u64 << 30) / chunk;
    let mut entries = vec![format!(
        r#"{{"name":"huge","type":"reg","size":{},"offset":{},"innerOffset":{},"chunkSize":{chunk},"chunkDigest":"{DIGEST}"}}"#,
        count * chunk,
        offset(0),
        inner(0)
    )];
    for i in 1..count {
        entries.push(format!(
            r#"{{"name":"huge","type":"chunk","offset":{},"innerOffset":{},"chunkOffset":{},"chunkSize":{chunk},"chunkDigest":"{DIGEST}"}}"#,
            offset(i),
            inner(i),
            i * chunk
        ));
    }
    toc(&entries.join(","))
}

#[test]
fn chunks_the_blob_cannot_hold_are_refused_at_open() {
    // Every chunk of a 128 GiB file decoding the same 100-byte member.
    // (The TOC sits a GiB further on, so that each member could hold one chunk.)
    let err = index_at(&huge_file(|_| 100, |_| 0), 1 << 30).unwrap_err();
    assert!(matches!(err, IndexError::ChunksOverlap { .. }), "{err:?}");
    assert!(err.to_string().contains("huge"), "{err}");
    // One chunk per member, each member a few bytes: more than deflate can expand.
    let err = index_at(&huge_file(|i| 100 + i, |_| 0), 1 << 30).unwrap_err();
    assert!(
        matches!(err, IndexError::ChunkBeyondData { compressed: 1, .. }),
        "{err:?}"
    );
    // Consecutive ranges of one small member.
    let err = index(&huge_file(|_| 100, |i| i * MAX_CHUNK_SIZE)).unwrap_err();
    assert!(matches!(err, IndexError::ChunkTooLarge { .. }), "{err:?}");

    let cases = [
        // Two files decoding the same bytes.
        (
            format!(
                r#"{{"name":"a","type":"reg","size":10,"offset":100,"chunkDigest":"{DIGEST}"}},
                   {{"name":"b","type":"reg","size":10,"offset":100,"innerOffset":5,"chunkDigest":"{DIGEST}"}}"#
            ),
            "ChunksOverlap",
        ),
        // A gap between chunks.
        (
            format!(
                r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"{DIGEST}"}},
                   {{"name":"f","type":"chunk","offset":200,"chunkOffset":6,"chunkDigest":"{DIGEST}"}}"#
            ),
            "ChunkLayout",
        ),
        // Overlapping chunks of one file.
        (
            format!(
                r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"{DIGEST}"}},
                   {{"name":"f","type":"chunk","offset":200,"chunkOffset":2,"chunkDigest":"{DIGEST}"}}"#
            ),
            "ChunkLayout",
        ),
        // A chunk past the data (at or beyond the TOC).
        (
            format!(
                r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":4,"chunkDigest":"{DIGEST}"}},
                   {{"name":"f","type":"chunk","offset":{},"chunkOffset":4,"chunkDigest":"{DIGEST}"}}"#,
                TOC_OFFSET + 1
            ),
            "DataOffsetOutOfRange",
        ),
    ];
    for (entries, expected) in cases {
        let err = index(&toc(&entries)).unwrap_err();
        assert!(
            format!("{err:?}").starts_with(expected),
            "{entries}: {err:?}"
        );
    }
}

#[test]
fn hardlinks_to_themselves_say_so() {
    let err = index(&toc(
        r#"{"name":"self","type":"hardlink","linkName":"./self"}"#,
    ))
    .unwrap_err();
    assert_eq!(
        err,
        IndexError::HardlinkToItself {
            path: "self".into()
        }
    );
    assert_eq!(err.to_string(), "hardlink self points at itself");
    let err = index(&toc(r#"{"name":"h","type":"hardlink","linkName":"a"},
           {"name":"a","type":"hardlink","linkName":"b"},
           {"name":"b","type":"hardlink","linkName":"a"}"#))
    .unwrap_err();
    assert!(
        matches!(&err, IndexError::HardlinkCycle { path, target } if path == "h" && target == "a"),
        "{err:?}"
    );
    let chain: Vec<String> = (0..=MAX_HARDLINK_CHAIN)
        .map(|i| {
            format!(
                r#"{{"name":"l{i}","type":"hardlink","linkName":"l{}"}}"#,
                i + 1
            )
        })
        .chain([r#"{"name":"l65","type":"fifo"}"#.to_owned()])
        .collect();
    let err = index(&toc(&chain.join(","))).unwrap_err();
    assert!(
        matches!(err, IndexError::HardlinkChainTooLong { .. }),
        "{err:?}"
    );
}

#[test]
fn chunks_without_a_digest_are_refused() {
    let unverifiable = [
        r#"{"name":"f","type":"reg","size":3,"offset":100}"#.to_owned(),
        // A whole-file digest does not verify one chunk of several.
        format!(
            r#"{{"name":"f","type":"reg","size":10,"offset":100,"chunkSize":4,"digest":"{DIGEST}","chunkDigest":"{DIGEST}"}},
               {{"name":"f","type":"chunk","offset":200,"chunkOffset":4}}"#
        ),
    ];
    for entries in unverifiable {
        let err = index(&toc(&entries)).unwrap_err();
        assert!(
            matches!(&err, IndexError::ChunkWithoutDigest { path, .. } if path == "f"),
            "{entries}: {err:?}"
        );
        assert!(err.to_string().contains("no chunkDigest"), "{err}");
    }
    // Empty files have nothing to verify; a one-chunk file may carry the file digest.
    index(&toc(&format!(
        r#"{{"name":"empty","type":"reg"}},
           {{"name":"legacy","type":"reg","size":3,"offset":100,"digest":"{DIGEST}"}}"#
    )))
    .unwrap();
}

/// Every inode as `ino path mode nlink`, then every directory's entries in readdir order, as
/// `ino: name=ino ...`.
fn layout(index: &Index) -> String {
    let mut out = String::new();
    for node in index.nodes() {
        let ino = node.attr.ino;
        out.push_str(&format!(
            "{} {:?} {:o} {}\n",
            ino.get(),
            index.path(ino).unwrap(),
            node.attr.mode,
            node.attr.nlink
        ));
    }
    for node in index.nodes() {
        let Some(children) = index.children(node.attr.ino) else {
            continue;
        };
        out.push_str(&format!("{}:", node.attr.ino.get()));
        for entry in children.iter() {
            out.push_str(&format!(" {}={}", entry.name, entry.ino.get()));
        }
        out.push('\n');
    }
    out
}

/// A restarted daemon rebuilds the index from the persisted TOC and must hand the kernel the
/// same inode numbers as before: numbers, their order and readdir order are pinned here for a
/// TOC with implicit directories, hardlinks, whiteouts, an opaque directory, a later
/// duplicate and an explicit directory after its children.
#[test]
fn inode_numbers_and_readdir_order_are_stable() {
    let index = index(&toc(&format!(
        r#"{{"name":"usr/bin/tool","type":"reg","size":3,"offset":100,"chunkDigest":"{DIGEST}"}},
           {{"name":"etc/","type":"dir","mode":448}},
           {{"name":"usr/bin/link","type":"hardlink","linkName":"usr/bin/tool"}},
           {{"name":"var/lib/.wh.gone","type":"reg"}},
           {{"name":"opt/.wh..wh..opq","type":"reg"}},
           {{"name":"etc/zeta","type":"symlink","linkName":"../usr"}},
           {{"name":"etc/alpha","type":"fifo","mode":384}},
           {{"name":"usr/","type":"dir","mode":493,"uid":1}},
           {{"name":"deep/a/b/l2","type":"hardlink","linkName":"etc/alpha"}},
           {{"name":"etc/zeta","type":"reg","size":1,"offset":200,"chunkDigest":"{DIGEST}"}},
           {{"name":"b","type":"char","devMajor":1,"devMinor":3}},
           {{"name":"a","type":"dir"}},
           {{"name":"opt/keep","type":"reg"}}"#
    )))
    .unwrap();
    let expected = "\
1 \"\" 40755 8
2 \"etc\" 40700 2
3 \"usr\" 40755 3
4 \"a\" 40000 2
5 \"usr/bin\" 40755 2
6 \"usr/bin/link\" 100000 2
7 \"var\" 40755 3
8 \"var/lib\" 40755 2
9 \"var/lib/gone\" 20000 1
10 \"etc/alpha\" 10600 2
11 \"etc/zeta\" 100000 1
12 \"b\" 20000 1
13 \"opt\" 40755 2
14 \"opt/keep\" 100000 1
15 \"deep\" 40755 3
16 \"deep/a\" 40755 3
17 \"deep/a/b\" 40755 2
1: a=4 b=12 deep=15 etc=2 opt=13 usr=3 var=7
2: alpha=10 zeta=11
3: bin=5
4:
5: link=6 tool=6
7: lib=8
8: gone=9
13: keep=14
15: a=16
16: b=17
17: l2=10
";
    assert_eq!(layout(&index), expected);
}
