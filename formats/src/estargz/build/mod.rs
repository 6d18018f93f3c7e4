//! Converting a layer tar into an eStargz blob (the core of `shoal convert`).
//!
//! The layout matches the reference builder: each tar entry's records are copied through
//! unchanged, every chunk of regular file data starts a new gzip member, prioritized files
//! come first followed by `.prefetch.landmark` (or `.no.prefetch.landmark` leads when nothing
//! is prioritized), then the TOC member and the footer. The blob decompresses to a plain tar,
//! so `tar xzf` reads it too.

mod order;
mod tar_stream;
mod writer;

use std::io::{self, BufRead, BufReader, Cursor, Read, Seek, SeekFrom, Write};

use flate2::read::MultiGzDecoder;
use flate2::Compression;

use self::order::{order, Named};
use self::tar_stream::{Kind, Meta, RawEntry, TarStream};
use self::writer::BlobWriter;
use super::digest::{Sha256Digest, TocDigest};
use super::entry_name::clean_entry_name;
use super::index::{MAX_CHUNK_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use super::toc::{TocError, TOC_TAR_NAME};

/// The reference builder's default chunk size.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Content of the landmark files.
const LANDMARK_CONTENT: u8 = 0xf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Largest uncompressed chunk of a regular file; each chunk is its own gzip member.
    pub chunk_size: u64,
    /// Paths (absolute or root-relative) to place first, in this order, followed by
    /// `.prefetch.landmark`. Empty means no prefetch: `.no.prefetch.landmark` is written.
    pub prioritized: Vec<String>,
    /// gzip level 0..=9; the reference builder uses 9.
    pub compression_level: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            prioritized: Vec::new(),
            compression_level: 9,
        }
    }
}

/// Digests and sizes of a built blob: what a manifest and its config need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// For the `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: TocDigest,
    /// SHA-256 of the uncompressed tar stream the blob decompresses to (the image config's
    /// diff ID).
    pub diff_id: Sha256Digest,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    /// SHA-256 of the blob itself (the layer descriptor digest).
    pub blob_digest: Sha256Digest,
    pub toc_offset: u64,
    /// Prioritized paths that are not in this layer (they may live in another layer).
    pub missed_prioritized: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("chunk size {chunk_size} is outside 1..={max}")]
    ChunkSize { chunk_size: u64, max: u64 },
    #[error("compression level {level} is outside 0..=9")]
    CompressionLevel { level: u32 },
    #[error("read layer tar at byte {offset}: {source}")]
    ReadTar { offset: u64, source: io::Error },
    #[error("layer tar ends inside a record at byte {offset}")]
    TruncatedTar { offset: u64 },
    #[error("tar header at byte {offset} has a bad checksum")]
    TarHeaderChecksum { offset: u64 },
    #[error("tar header at byte {offset} has an unreadable {field} field")]
    TarField { offset: u64, field: &'static str },
    #[error("tar header at byte {offset} has a non-UTF-8 {field}")]
    NonUtf8 { offset: u64, field: &'static str },
    #[error("tar extension record at byte {offset} is {size} bytes, too large")]
    ExtensionTooLarge { offset: u64, size: u64 },
    #[error("tar entry at byte {offset} has unsupported type {:?}", char::from(*type_flag))]
    UnsupportedEntryType { offset: u64, type_flag: u8 },
    #[error("{name}: entry data ended early")]
    EntryDataShort { name: String },
    #[error("spill buffer for reordering: {source}")]
    Spill { source: io::Error },
    #[error("encode toc: {source}")]
    EncodeToc { source: TocError },
    #[error("write estargz blob: {source}")]
    WriteBlob { source: io::Error },
    #[error("blob writer used after a failed write")]
    WriterState,
}

/// Converts `layer_tar` (plain or gzip-compressed) into an eStargz blob written to `out`.
///
/// Without prioritized files this streams in bounded memory. With them, entry data is spilled
/// into memory so it can be reordered; use [`build_with_spill`] to spill elsewhere.
pub fn build<R: Read, W: Write>(
    layer_tar: R,
    out: W,
    options: BuildOptions,
) -> Result<BuildOutput, BuildError> {
    build_with_spill(layer_tar, out, Cursor::new(Vec::new()), options)
}

/// Like [`build`], spilling entry data to `spill` (e.g. a temporary file) when prioritized
/// files require reordering; `spill` is untouched otherwise.
pub fn build_with_spill<R: Read, W: Write, S: Read + Write + Seek>(
    layer_tar: R,
    out: W,
    mut spill: S,
    options: BuildOptions,
) -> Result<BuildOutput, BuildError> {
    if options.chunk_size == 0 || options.chunk_size > MAX_CHUNK_SIZE {
        return Err(BuildError::ChunkSize {
            chunk_size: options.chunk_size,
            max: MAX_CHUNK_SIZE,
        });
    }
    if options.compression_level > 9 {
        return Err(BuildError::CompressionLevel {
            level: options.compression_level,
        });
    }
    let mut input = BufReader::new(layer_tar);
    let head = input
        .fill_buf()
        .map_err(|source| BuildError::ReadTar { offset: 0, source })?;
    let input: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Box::new(MultiGzDecoder::new(input))
    } else {
        Box::new(input)
    };
    let mut tar = TarStream::new(input);
    let level = Compression::new(options.compression_level);
    let mut writer = BlobWriter::new(out, level, options.chunk_size);
    let mut missed_prioritized = Vec::new();

    if options.prioritized.is_empty() {
        append_landmark(&mut writer, NO_PREFETCH_LANDMARK)?;
        while let Some(entry) = tar.next_entry()? {
            if !is_reserved(&entry.meta.name) {
                writer.append(&entry.prefix, &entry.meta, |buf| tar.read_data(buf))?;
            }
        }
    } else {
        let spilled = spill_entries(&mut tar, &mut spill)?;
        let named: Vec<Named> = spilled
            .iter()
            .map(|(entry, _)| Named {
                name: &entry.meta.name,
                kind: entry.meta.kind,
                link_name: &entry.meta.link_name,
            })
            .collect();
        let order = order(&named, &options.prioritized);
        for &i in &order.prioritized {
            append_spilled(&mut writer, &mut spill, &spilled[i])?;
        }
        append_landmark(&mut writer, PREFETCH_LANDMARK)?;
        for &i in &order.rest {
            append_spilled(&mut writer, &mut spill, &spilled[i])?;
        }
        missed_prioritized = order.missed;
    }
    tar.drain()?;
    let finished = writer.finish()?;
    Ok(BuildOutput {
        toc_digest: finished.toc_digest,
        diff_id: finished.diff_id,
        uncompressed_size: finished.uncompressed_size,
        compressed_size: finished.compressed_size,
        blob_digest: finished.blob_digest,
        toc_offset: finished.toc_offset,
        missed_prioritized,
    })
}

/// Entries the builder writes itself; copies in the input (a blob converted twice) are dropped.
fn is_reserved(name: &str) -> bool {
    let name = clean_entry_name(name);
    [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&name.as_str())
}

/// Copies every entry's data into `spill`, returning entries with their data offsets.
fn spill_entries<R: Read, S: Write + Seek>(
    tar: &mut TarStream<R>,
    spill: &mut S,
) -> Result<Vec<(RawEntry, u64)>, BuildError> {
    let spill_error = |source| BuildError::Spill { source };
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while let Some(entry) = tar.next_entry()? {
        if is_reserved(&entry.meta.name) {
            continue;
        }
        let offset = spill.stream_position().map_err(spill_error)?;
        loop {
            let n = tar.read_data(&mut buf)?;
            if n == 0 {
                break;
            }
            spill.write_all(&buf[..n]).map_err(spill_error)?;
        }
        entries.push((entry, offset));
    }
    Ok(entries)
}

fn append_spilled<W: Write, S: Read + Seek>(
    writer: &mut BlobWriter<W>,
    spill: &mut S,
    (entry, offset): &(RawEntry, u64),
) -> Result<(), BuildError> {
    let spill_error = |source| BuildError::Spill { source };
    spill.seek(SeekFrom::Start(*offset)).map_err(spill_error)?;
    let mut data = spill.take(entry.meta.size);
    writer.append(&entry.prefix, &entry.meta, |buf| {
        data.read(buf).map_err(spill_error)
    })
}

fn append_landmark<W: Write>(writer: &mut BlobWriter<W>, name: &str) -> Result<(), BuildError> {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(name)
        .map_err(|source| BuildError::WriteBlob { source })?;
    header.set_mode(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(1);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let meta = Meta {
        name: name.to_owned(),
        kind: Kind::Reg,
        link_name: String::new(),
        size: 1,
        mode: 0,
        uid: 0,
        gid: 0,
        user_name: String::new(),
        group_name: String::new(),
        mtime: 0,
        dev_major: 0,
        dev_minor: 0,
        xattrs: Default::default(),
    };
    let mut content: &[u8] = &[LANDMARK_CONTENT];
    writer.append(header.as_bytes(), &meta, |buf| {
        content
            .read(buf)
            .map_err(|source| BuildError::WriteBlob { source })
    })
}
