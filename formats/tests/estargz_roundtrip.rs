//! Round trip: tar -> eStargz builder -> footer -> TOC -> index -> chunk decompression, and
//! the built blob read back as a plain tar.gz.

use std::collections::BTreeMap;
use std::io::Read;

use flate2::read::MultiGzDecoder;
use shoal_formats::estargz::footer::{Footer, FOOTER_SIZE, LEGACY_FOOTER_SIZE};
use shoal_formats::estargz::index::{
    OPAQUE_XATTR, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use shoal_formats::estargz::{
    build, decompress_chunk, parse_footer, parse_toc, verify, BuildOptions, BuildOutput, EntryType,
    Index, Ino, NodeKind, Sha256Digest,
};

const MTIME: u64 = 1_700_000_000;
const CHUNK: u64 = 4096;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_username("alice").unwrap();
    h.set_groupname("staff").unwrap();
    h
}

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn long_name() -> String {
    format!("usr/share/{}/file.txt", "deep".repeat(40))
}

/// A layer tar exercising every entry kind, PAX xattrs, a GNU long name and whiteouts.
fn sample_layer() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut files = BTreeMap::new();
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode| {
        b.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            path,
            &[][..],
        )
        .unwrap();
    };
    dir(&mut b, "./", 0o755);
    dir(&mut b, "./bin/", 0o755);
    dir(&mut b, "./etc/", 0o700);
    dir(&mut b, "./opt/", 0o755);
    let mut file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: Vec<u8>| {
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o644, data.len() as u64),
            path,
            &data[..],
        )
        .unwrap();
        files.insert(path.trim_start_matches("./").to_owned(), data);
    };
    file(
        &mut b,
        "./bin/busybox",
        pseudo_random(3 * CHUNK as usize + 123, 1),
    );
    file(&mut b, "./etc/hosts", b"127.0.0.1 localhost\n".to_vec());
    file(&mut b, "./empty", Vec::new());
    file(&mut b, "./exact", pseudo_random(CHUNK as usize, 2));
    file(&mut b, &long_name(), b"long".to_vec());
    // Missing parents ("var/", "usr/") must appear implicitly.
    file(&mut b, "var/.wh.cache", Vec::new());
    file(&mut b, "opt/.wh..wh..opq", Vec::new());
    file(&mut b, "opt/keep", b"kept".to_vec());
    b.append_pax_extensions([
        ("SCHILY.xattr.user.note", &b"hi\x00there"[..]),
        ("SCHILY.xattr.security.capability", &[1u8, 2, 3][..]),
    ])
    .unwrap();
    file(&mut b, "./bin/ping", b"ping!".to_vec());

    let mut link = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut link, "./bin/sh", "./bin/busybox")
        .unwrap();
    let mut symlink = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut symlink, "./lib", "usr/lib").unwrap();
    for (path, kind, major, minor) in [
        ("./dev/null", tar::EntryType::Char, 1, 3),
        ("./dev/loop0", tar::EntryType::Block, 7, 0),
    ] {
        let mut h = header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        b.append_data(&mut h, path, &[][..]).unwrap();
    }
    b.append_data(
        &mut header(tar::EntryType::Fifo, 0o600, 0),
        "./run.fifo",
        &[][..],
    )
    .unwrap();
    (b.into_inner().unwrap(), files)
}

fn build_blob(options: BuildOptions) -> (Vec<u8>, BuildOutput, BTreeMap<String, Vec<u8>>) {
    let (layer, files) = sample_layer();
    let mut blob = Vec::new();
    let output = build(&layer[..], &mut blob, options).unwrap();
    (blob, output, files)
}

fn open_index(blob: &[u8]) -> (Index, Sha256Digest) {
    let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
    let region = &blob[footer.toc_offset as usize..blob.len() - footer.size];
    let parsed = parse_toc(region).unwrap();
    (
        Index::new(&parsed.toc, footer.toc_offset).unwrap(),
        parsed.digest,
    )
}

fn read_file(index: &Index, blob: &[u8], ino: Ino) -> Vec<u8> {
    let path = index.path(ino).unwrap();
    let mut out = Vec::new();
    for chunk in index.chunks_for(ino, 0, u64::MAX).unwrap() {
        let compressed = &blob[chunk.blob_offset as usize..chunk.blob_end as usize];
        let data = decompress_chunk(compressed, chunk).unwrap();
        verify(&data, &chunk.digest, &path, chunk.file_offset).unwrap();
        assert_eq!(chunk.file_offset, out.len() as u64);
        out.extend(data);
    }
    out
}

#[test]
fn every_file_reads_back_through_the_index() {
    let options = BuildOptions {
        chunk_size: CHUNK,
        prioritized: vec!["/bin/sh".into(), "etc/hosts".into(), "not/here".into()],
        ..BuildOptions::default()
    };
    let (blob, output, files) = build_blob(options);
    assert_eq!(output.compressed_size, blob.len() as u64);
    assert_eq!(output.blob_digest, Sha256Digest::of(&blob));
    assert_eq!(output.missed_prioritized, ["not/here"]);
    let (index, toc_digest) = open_index(&blob);
    assert_eq!(toc_digest, output.toc_digest);
    let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
    let toc = parse_toc(&blob[footer.toc_offset as usize..blob.len() - footer.size])
        .unwrap()
        .toc;

    for (path, content) in &files {
        if path.contains(".wh.") {
            continue;
        }
        let ino = index
            .lookup_path(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        assert_eq!(&read_file(&index, &blob, ino), content, "{path}");
        let node = index.node(ino).unwrap();
        assert_eq!(node.attr.size, content.len() as u64);
        let name = path.trim_start_matches('/');
        let entry = toc
            .entries
            .iter()
            .find(|e| e.name == name && e.kind == EntryType::Reg);
        assert_eq!(
            entry.unwrap().digest,
            Some(Sha256Digest::of(content)),
            "{path}"
        );
    }

    let busybox = index.lookup_path("bin/busybox").unwrap();
    assert_eq!(index.chunks_for(busybox, 0, u64::MAX).unwrap().len(), 4);
    let middle = index.chunks_for(busybox, CHUNK + 10, CHUNK).unwrap();
    assert_eq!(
        middle.iter().map(|c| c.file_offset).collect::<Vec<_>>(),
        [CHUNK, 2 * CHUNK]
    );
    assert!(index.chunks_for(busybox, 10 * CHUNK, 1).unwrap().is_empty());
    assert_eq!(
        index
            .chunks_for(index.lookup_path("exact").unwrap(), 0, 1)
            .unwrap()
            .len(),
        1
    );

    let prefetch_end = index.prefetch_end().expect("prefetch landmark");
    for (path, prioritized) in [
        ("bin/busybox", true),
        ("etc/hosts", true),
        ("opt/keep", false),
    ] {
        let ino = index.lookup_path(path).unwrap();
        let chunks = index.chunks_for(ino, 0, u64::MAX).unwrap();
        assert_eq!(
            chunks.iter().all(|c| c.blob_end <= prefetch_end),
            prioritized,
            "{path}"
        );
    }
    assert!(index.lookup_path(".prefetch.landmark").is_none());
}

#[test]
fn metadata_and_special_entries_are_presented() {
    let (blob, _, _) = build_blob(BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::default()
    });
    let (index, _) = open_index(&blob);
    assert_eq!(index.prefetch_end(), None);
    assert!(index.lookup_path(".no.prefetch.landmark").is_none());

    let root = index.root();
    assert_eq!(root.attr.ino, Ino::ROOT);
    assert_eq!(root.attr.mode, S_IFDIR | 0o755);
    let names: Vec<_> = index
        .children(Ino::ROOT)
        .unwrap()
        .iter()
        .map(|e| e.name)
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(
        names,
        ["bin", "dev", "empty", "etc", "exact", "lib", "opt", "run.fifo", "usr", "var"]
    );

    let hosts = index.node(index.lookup_path("etc/hosts").unwrap()).unwrap();
    assert_eq!(hosts.attr.mode, S_IFREG | 0o644);
    assert_eq!((hosts.attr.uid, hosts.attr.gid), (1000, 100));
    assert_eq!(hosts.attr.mtime, MTIME as i64);
    let etc = index.node(index.lookup_path("etc").unwrap()).unwrap();
    assert_eq!(etc.attr.mode, S_IFDIR | 0o700);

    let sh = index.lookup_path("bin/sh").unwrap();
    assert_eq!(Some(sh), index.lookup_path("bin/busybox"));
    assert_eq!(index.node(sh).unwrap().attr.nlink, 2);
    let bin = index.node(index.lookup_path("bin").unwrap()).unwrap();
    assert_eq!(bin.attr.nlink, 2);
    assert_eq!(root.attr.nlink, 2 + 6); // bin dev etc opt usr var

    let lib = index.node(index.lookup_path("lib").unwrap()).unwrap();
    assert_eq!(lib.attr.mode & 0o170000, S_IFLNK);
    assert_eq!(lib.kind, NodeKind::Symlink { target: "usr/lib" });
    assert_eq!(lib.attr.size, 7);

    let null = index.node(index.lookup_path("dev/null").unwrap()).unwrap();
    assert_eq!(null.attr.file_type(), S_IFCHR);
    assert_eq!(
        (null.attr.dev_major, null.attr.dev_minor, null.attr.rdev()),
        (1, 3, 0x103)
    );
    let dev = index.node(index.lookup_path("dev").unwrap()).unwrap();
    assert_eq!(dev.attr.mode, S_IFDIR | 0o755, "implicit parent");
    let loop0 = index.node(index.lookup_path("dev/loop0").unwrap()).unwrap();
    assert_eq!(loop0.attr.file_type(), S_IFBLK);
    let fifo = index.node(index.lookup_path("run.fifo").unwrap()).unwrap();
    assert_eq!(fifo.attr.mode, S_IFIFO | 0o600);

    let whiteout = index.node(index.lookup_path("var/cache").unwrap()).unwrap();
    assert_eq!(whiteout.attr.mode, S_IFCHR);
    assert_eq!(whiteout.attr.rdev(), 0);
    assert!(index.lookup_path("var/.wh.cache").is_none());
    let opt = index.node(index.lookup_path("opt").unwrap()).unwrap();
    assert_eq!(
        opt.xattrs.get(OPAQUE_XATTR).map(Vec::as_slice),
        Some(&b"y"[..])
    );
    let opt_names: Vec<_> = index
        .children(opt.attr.ino)
        .unwrap()
        .iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(opt_names, ["keep"]);

    let ping = index.node(index.lookup_path("bin/ping").unwrap()).unwrap();
    assert_eq!(ping.xattrs["user.note"], b"hi\x00there");
    assert_eq!(ping.xattrs["security.capability"], [1, 2, 3]);
    assert!(index.lookup_path(&long_name()).is_some());
}

#[test]
fn blob_is_a_plain_tar_gz_with_the_original_entries() {
    let (layer, _) = sample_layer();
    let (blob, output, _) = build_blob(BuildOptions {
        chunk_size: CHUNK,
        prioritized: vec!["etc/hosts".into()],
        ..BuildOptions::default()
    });
    let mut stream = Vec::new();
    MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut stream)
        .unwrap();
    assert_eq!(output.diff_id, Sha256Digest::of(&stream));
    assert_eq!(output.uncompressed_size, stream.len() as u64);

    let summarize = |bytes: &[u8]| {
        let mut archive = tar::Archive::new(bytes);
        let mut out = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            if path == "stargz.index.json" || path.ends_with("prefetch.landmark") {
                continue;
            }
            let h = entry.header().clone();
            let xattrs: Vec<_> = entry
                .pax_extensions()
                .unwrap()
                .map(|exts| exts.map(|e| e.unwrap().key().unwrap().to_owned()).collect())
                .unwrap_or_default();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let key = (
                h.entry_type().as_byte(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.mtime().unwrap(),
            );
            out.insert(path, (key, link, xattrs, data));
        }
        out
    };
    let original = summarize(&layer);
    let converted = summarize(&stream);
    assert_eq!(original.len(), 18);
    assert_eq!(original, converted);
}

#[test]
fn system_tar_extracts_the_blob() {
    if std::process::Command::new("tar")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: no tar binary");
        return;
    }
    let (blob, _, files) = build_blob(BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("layer.tar.gz");
    std::fs::write(&archive, &blob).unwrap();
    let out = dir.path().join("root");
    std::fs::create_dir(&out).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&out)
        .args(["--no-same-owner", "--exclude=./dev", "--exclude=run.fifo"])
        .status()
        .unwrap();
    assert!(status.success());
    for (path, content) in &files {
        assert_eq!(&std::fs::read(out.join(path)).unwrap(), content, "{path}");
    }
}

#[test]
fn legacy_footer_blob_opens() {
    let (mut blob, output, files) = build_blob(BuildOptions::default());
    blob.truncate(blob.len() - FOOTER_SIZE);
    blob.extend_from_slice(&Footer::encode_legacy(output.toc_offset));
    let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
    assert_eq!(footer.size, LEGACY_FOOTER_SIZE);
    assert_eq!(footer.toc_offset, output.toc_offset);
    let (index, digest) = open_index(&blob);
    assert_eq!(digest, output.toc_digest);
    let hosts = index.lookup_path("etc/hosts").unwrap();
    assert_eq!(read_file(&index, &blob, hosts), files["etc/hosts"]);
}

#[test]
fn corrupt_chunk_fails_verification() {
    let (mut blob, _, _) = build_blob(BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::default()
    });
    let (index, _) = open_index(&blob);
    let ino = index.lookup_path("bin/busybox").unwrap();
    let chunk = index.chunks_for(ino, CHUNK, 1).unwrap()[0].clone();
    // Swap in another chunk's member: valid gzip, wrong content.
    let other = index.chunks_for(ino, 0, 1).unwrap()[0].clone();
    let foreign = blob[other.blob_offset as usize..other.blob_end as usize].to_vec();
    let data = decompress_chunk(&foreign, &chunk).unwrap();
    let err = verify(&data, &chunk.digest, "bin/busybox", chunk.file_offset).unwrap_err();
    assert!(err.to_string().contains("bin/busybox"), "{err}");
    // Flipping compressed bytes is caught by gzip's CRC or by the digest.
    let mid = (chunk.blob_offset + chunk.blob_end) as usize / 2;
    blob[mid] ^= 0xff;
    let compressed = &blob[chunk.blob_offset as usize..chunk.blob_end as usize];
    let caught = match decompress_chunk(compressed, &chunk) {
        Err(_) => true,
        Ok(data) => verify(&data, &chunk.digest, "bin/busybox", 0).is_err(),
    };
    assert!(caught);
}

#[test]
fn converting_twice_keeps_one_toc_and_landmark() {
    let (blob, _, files) = build_blob(BuildOptions::default());
    let mut again = Vec::new();
    let output = build(&blob[..], &mut again, BuildOptions::default()).unwrap();
    let (index, digest) = open_index(&again);
    assert_eq!(digest, output.toc_digest);
    assert!(index.lookup_path("stargz.index.json").is_none());
    let hosts = index.lookup_path("etc/hosts").unwrap();
    assert_eq!(read_file(&index, &again, hosts), files["etc/hosts"]);
}

#[test]
fn bad_layer_tars_are_errors() {
    use shoal_formats::estargz::BuildError;
    let (layer, _) = sample_layer();
    let convert = |bytes: &[u8]| build(bytes, &mut Vec::new(), BuildOptions::default());
    // Cut inside the multi-chunk file's data.
    let err = convert(&layer[..4096]).unwrap_err();
    assert!(matches!(err, BuildError::TruncatedTar { .. }), "{err}");
    let mut corrupt = layer.clone();
    corrupt[0] ^= 0x01;
    let err = convert(&corrupt).unwrap_err();
    assert!(
        matches!(err, BuildError::TarHeaderChecksum { offset: 0 }),
        "{err}"
    );
    let err = build(
        &layer[..],
        &mut Vec::new(),
        BuildOptions {
            chunk_size: 0,
            ..BuildOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, BuildError::ChunkSize { .. }), "{err}");
    // An empty input is an empty layer, not an error.
    let mut blob = Vec::new();
    build(&[][..], &mut blob, BuildOptions::default()).unwrap();
    let (index, _) = open_index(&blob);
    assert_eq!(index.len(), 1);
}
