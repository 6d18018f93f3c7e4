//! The table of contents, `stargz.index.json`: its serde model and how it is read out of the
//! gzip member between the TOC offset and the footer.

use std::collections::BTreeMap;
use std::io::Read;

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use super::digest::{Sha256Digest, TocDigest};

/// Name of the TOC's tar entry.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Largest TOC JSON accepted; bounds the allocation a hostile blob can cause. The reference
/// writer spends about 350 bytes per file, so this admits layers of some 180,000 files.
pub const MAX_TOC_JSON_SIZE: u64 = 64 << 20;
/// Largest compressed TOC (the blob bytes from the TOC offset to the footer) fetched; JSON
/// compresses well, so no TOC within [`MAX_TOC_JSON_SIZE`] comes near it.
pub const MAX_TOC_COMPRESSED_SIZE: u64 = 64 << 20;
/// Largest number of TOC entries (files, directories, links and chunks) accepted.
pub const MAX_TOC_ENTRIES: usize = 1_000_000;

const BLOCK: usize = 512;

/// The decoded `stargz.index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

/// The kind of a TOC entry. `Chunk` entries continue the data of the preceding `Reg` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    Chunk,
}

/// One TOC entry; field names and omission rules follow the reference JSON exactly, so that a
/// TOC this crate writes hashes to what stargz-snapshotter expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// RFC 3339 text; see [`super::modtime`].
    #[serde(default, rename = "modtime", skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(default, rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Permission bits as found in the tar header (file type bits usually absent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
    #[serde(default, rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        default,
        rename = "groupName",
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    /// Blob offset of the gzip member holding this entry's data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Offset of the data inside the decompressed member (several small files may share one).
    #[serde(default, rename = "innerOffset", skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    #[serde(default, rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: u32,
    #[serde(default, rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: u32,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "xattr_values"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Digest of the whole regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Sha256Digest>,
    #[serde(default, rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// Uncompressed chunk length; zero means "to the end of the file".
    #[serde(default, rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(
        default,
        rename = "chunkDigest",
        skip_serializing_if = "Option::is_none"
    )]
    pub chunk_digest: Option<Sha256Digest>,
}

impl TocEntry {
    /// An entry of `kind` named `name` with every other field empty.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        Self {
            name: name.into(),
            kind,
            size: 0,
            mod_time: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            offset: 0,
            inner_offset: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: None,
        }
    }
}

fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Xattr values are arbitrary bytes, carried as standard padded base64 (Go's `[]byte` JSON).
mod xattr_values {
    use std::collections::BTreeMap;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let encoded = Option::<BTreeMap<String, String>>::deserialize(deserializer)?;
        encoded
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let value = STANDARD
                    .decode(v.as_bytes())
                    .map_err(|e| serde::de::Error::custom(format!("xattr {k:?}: {e}")))?;
                Ok((k, value))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("decompress toc member: {source}")]
    Decompress { source: std::io::Error },
    #[error("read toc tar header: truncated after {got} bytes")]
    TarHeaderTruncated { got: usize },
    #[error("toc tar header checksum mismatch")]
    TarHeaderChecksum,
    #[error("toc tar entry is named {name:?}, expected {TOC_TAR_NAME}")]
    UnexpectedEntry { name: String },
    #[error("toc tar entry has an unreadable size field")]
    TarSize,
    #[error("toc json is {size} bytes, more than the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("compressed toc is {size} bytes, more than the {max}-byte limit")]
    CompressedTooLarge { size: u64, max: u64 },
    #[error("read toc json: {source}")]
    ReadJson { source: std::io::Error },
    #[error("decode toc json: {source}")]
    DecodeJson { source: serde_json::Error },
    #[error("toc has more than the {max}-entry limit")]
    TooManyEntries { max: usize },
    #[error("encode toc json: {source}")]
    EncodeJson { source: serde_json::Error },
}

/// A decoded TOC and the digest of its JSON bytes (the `toc.digest` annotation value).
#[derive(Debug, Clone)]
pub struct ParsedToc {
    pub toc: Toc,
    pub digest: TocDigest,
}

/// Reads the TOC from `region`, the blob bytes from the TOC offset up to the footer: a gzip
/// member holding a tar whose first entry is `stargz.index.json`.
pub fn parse_toc(region: &[u8]) -> Result<ParsedToc, TocError> {
    let json = read_toc_json(region)?;
    decode_toc_json(&json)
}

/// Decodes TOC JSON bytes and digests them. A TOC of more than [`MAX_TOC_ENTRIES`] entries is
/// refused as soon as the entry past the limit is read, before the rest is held in memory.
pub fn decode_toc_json(json: &[u8]) -> Result<ParsedToc, TocError> {
    decode_within(json, MAX_TOC_ENTRIES)
}

fn decode_within(json: &[u8], max: usize) -> Result<ParsedToc, TocError> {
    let mut entries = Vec::new();
    let version = decode_toc_entries(json, max, &mut |entry| {
        entries.push(entry);
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|stop| match stop {
        Stopped::Decode(error) => error,
        Stopped::Visit(never) => match never {},
    })?;
    Ok(ParsedToc {
        toc: Toc { version, entries },
        digest: Sha256Digest::of(json),
    })
}

/// Why [`decode_toc_entries`] stopped: the JSON, or the visitor's own error.
#[derive(Debug)]
pub(crate) enum Stopped<E> {
    Decode(TocError),
    Visit(E),
}

/// Decodes TOC JSON, handing each entry to `visit` in order as soon as it is read, so that
/// only one entry is held at a time; returns the TOC's version. More than `max` entries are
/// refused at the first one past the limit, and the first error of `visit` ends the decoding.
pub(crate) fn decode_toc_entries<E>(
    json: &[u8],
    max: usize,
    visit: &mut dyn FnMut(TocEntry) -> Result<(), E>,
) -> Result<u32, Stopped<E>> {
    let stop = bounded::Stop {
        over: std::cell::Cell::new(false),
        visit_error: std::cell::Cell::new(None),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let version = serde::de::DeserializeSeed::deserialize(
        bounded::TocSeed {
            max,
            stop: &stop,
            visit,
        },
        &mut deserializer,
    )
    .and_then(|version| deserializer.end().map(|()| version));
    match version {
        Ok(version) => Ok(version),
        Err(source) => Err(match stop.visit_error.take() {
            Some(error) => Stopped::Visit(error),
            None if stop.over.get() => Stopped::Decode(TocError::TooManyEntries { max }),
            None => Stopped::Decode(TocError::DecodeJson { source }),
        }),
    }
}

/// Deserializing a TOC's entries one by one into a visitor, at most `max` of them: the first
/// one past the limit, or the first the visitor refuses, ends the decoding (with `stop` saying
/// why).
mod bounded {
    use std::cell::Cell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::TocEntry;

    pub(super) struct Stop<E> {
        pub over: Cell<bool>,
        pub visit_error: Cell<Option<E>>,
    }

    pub(super) struct TocSeed<'a, E> {
        pub max: usize,
        pub stop: &'a Stop<E>,
        pub visit: &'a mut dyn FnMut(TocEntry) -> Result<(), E>,
    }

    impl<'de, E> DeserializeSeed<'de> for TocSeed<'_, E> {
        type Value = u32;

        fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<u32, D::Error> {
            deserializer.deserialize_map(self)
        }
    }

    impl<'de, E> Visitor<'de> for TocSeed<'_, E> {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a toc object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u32, A::Error> {
            let mut version = None;
            let mut entries = false;
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "version" if version.is_none() => version = Some(map.next_value()?),
                    "entries" if !entries => {
                        map.next_value_seed(EntriesSeed {
                            max: self.max,
                            stop: self.stop,
                            visit: &mut *self.visit,
                        })?;
                        entries = true;
                    }
                    "version" => return Err(de::Error::duplicate_field("version")),
                    "entries" => return Err(de::Error::duplicate_field("entries")),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            let version = version.ok_or_else(|| de::Error::missing_field("version"))?;
            if !entries {
                return Err(de::Error::missing_field("entries"));
            }
            Ok(version)
        }
    }

    struct EntriesSeed<'a, E> {
        max: usize,
        stop: &'a Stop<E>,
        visit: &'a mut dyn FnMut(TocEntry) -> Result<(), E>,
    }

    impl<'de, E> DeserializeSeed<'de> for EntriesSeed<'_, E> {
        type Value = ();

        fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_seq(self)
        }
    }

    impl<'de, E> Visitor<'de> for EntriesSeed<'_, E> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of toc entries")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut count = 0;
            while let Some(entry) = seq.next_element::<TocEntry>()? {
                if count == self.max {
                    self.stop.over.set(true);
                    return Err(de::Error::custom(format!("more than {} entries", self.max)));
                }
                count += 1;
                if let Err(error) = (self.visit)(entry) {
                    self.stop.visit_error.set(Some(error));
                    return Err(de::Error::custom("entry refused"));
                }
            }
            Ok(())
        }
    }
}

/// Serializes a TOC the way the reference writer does (tab-indented), so digests agree for
/// identical content.
pub fn encode_toc_json(toc: &Toc) -> Result<Vec<u8>, TocError> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    toc.serialize(&mut serializer)
        .map_err(|source| TocError::EncodeJson { source })?;
    Ok(out)
}

/// Extracts the raw `stargz.index.json` bytes from the TOC region.
pub fn read_toc_json(region: &[u8]) -> Result<Vec<u8>, TocError> {
    check_compressed_size(region.len() as u64)?;
    // One member only, as the reference reader does: the footer after it is not TOC data.
    let mut gz = GzDecoder::new(region);
    let mut header = [0u8; BLOCK];
    let got = read_full(&mut gz, &mut header).map_err(|source| TocError::Decompress { source })?;
    if got < BLOCK {
        return Err(TocError::TarHeaderTruncated { got });
    }
    let header = tar::Header::from_byte_slice(&header);
    if header.cksum().ok() != Some(header_checksum(header.as_bytes())) {
        return Err(TocError::TarHeaderChecksum);
    }
    let name = header.path_bytes();
    if name.as_ref() != TOC_TAR_NAME.as_bytes() {
        return Err(TocError::UnexpectedEntry {
            name: String::from_utf8_lossy(&name).chars().take(256).collect(),
        });
    }
    let size = header.entry_size().map_err(|_| TocError::TarSize)?;
    if size > MAX_TOC_JSON_SIZE {
        return Err(TocError::TooLarge {
            size,
            max: MAX_TOC_JSON_SIZE,
        });
    }
    // Grow with the data actually present rather than trusting the declared size up front.
    let mut json = Vec::with_capacity(size.min(1 << 20) as usize);
    gz.take(size)
        .read_to_end(&mut json)
        .map_err(|source| TocError::ReadJson { source })?;
    if json.len() as u64 != size {
        return Err(TocError::ReadJson {
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(json)
}

/// Refuses a compressed TOC of `size` bytes before it is fetched or decompressed.
pub fn check_compressed_size(size: u64) -> Result<(), TocError> {
    if size > MAX_TOC_COMPRESSED_SIZE {
        return Err(TocError::CompressedTooLarge {
            size,
            max: MAX_TOC_COMPRESSED_SIZE,
        });
    }
    Ok(())
}

/// The ustar header checksum: the byte sum with the checksum field read as spaces.
pub(crate) fn header_checksum(block: &[u8; BLOCK]) -> u32 {
    block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum()
}

/// Fills `buf` as far as the reader allows; returns how much was read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn toc_region(name: &str, json: &[u8], declared_size: Option<u64>) -> Vec<u8> {
        let mut header = tar::Header::new_ustar();
        header.set_path(name).unwrap();
        header.set_size(declared_size.unwrap_or(json.len() as u64));
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(header.as_bytes()).unwrap();
        gz.write_all(json).unwrap();
        gz.write_all(&vec![0; (BLOCK - json.len() % BLOCK) % BLOCK + 1024])
            .unwrap();
        gz.finish().unwrap()
    }

    const SAMPLE: &str = r#"{"version":1,"entries":[
        {"name":"bin/","type":"dir","mode":493,"modtime":"2024-01-01T00:00:00Z"},
        {"name":"bin/sh","type":"reg","size":5,"offset":10,"uid":1,"userName":"u",
         "xattrs":{"user.k":"dmFsdWU="},
         "digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    ]}"#;

    #[test]
    fn parses_toc_and_digests_json_bytes() {
        let parsed = parse_toc(&toc_region(TOC_TAR_NAME, SAMPLE.as_bytes(), None)).unwrap();
        assert_eq!(parsed.digest, Sha256Digest::of(SAMPLE.as_bytes()));
        assert_eq!(parsed.toc.entries.len(), 2);
        let sh = &parsed.toc.entries[1];
        assert_eq!(sh.kind, EntryType::Reg);
        assert_eq!((sh.size, sh.offset, sh.uid), (5, 10, 1));
        assert_eq!(sh.xattrs["user.k"], b"value");
        assert_eq!(sh.digest, Some(Sha256Digest::of(b"hello")));
    }

    #[test]
    fn encoding_round_trips_and_omits_empty_fields() {
        let parsed = decode_toc_json(SAMPLE.as_bytes()).unwrap();
        let json = encode_toc_json(&parsed.toc).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\n\t\"entries\""), "{text}");
        assert!(!text.contains("chunkSize"), "{text}");
        assert!(text.contains("\"user.k\": \"dmFsdWU=\""), "{text}");
        assert_eq!(decode_toc_json(&json).unwrap().toc, parsed.toc);
    }

    #[test]
    fn rejects_bad_regions() {
        let not_json = toc_region(TOC_TAR_NAME, b"not json", None);
        assert!(matches!(
            parse_toc(&not_json),
            Err(TocError::DecodeJson { .. })
        ));
        let wrong_name = toc_region("other.json", SAMPLE.as_bytes(), None);
        assert!(matches!(
            parse_toc(&wrong_name),
            Err(TocError::UnexpectedEntry { .. })
        ));
        let oversized = toc_region(TOC_TAR_NAME, b"{}", Some(MAX_TOC_JSON_SIZE + 1));
        assert!(matches!(
            parse_toc(&oversized),
            Err(TocError::TooLarge { .. })
        ));
        let short = toc_region(TOC_TAR_NAME, b"{}", Some(4096));
        assert!(matches!(parse_toc(&short), Err(TocError::ReadJson { .. })));
        let mut corrupt = toc_region(TOC_TAR_NAME, SAMPLE.as_bytes(), None);
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        corrupt.truncate(mid + 8);
        assert!(parse_toc(&corrupt).is_err());
        assert!(matches!(
            parse_toc(b"garbage"),
            Err(TocError::Decompress { .. })
        ));
        let bad_type = r#"{"version":1,"entries":[{"name":"x","type":"socket"}]}"#;
        assert!(matches!(
            parse_toc(&toc_region(TOC_TAR_NAME, bad_type.as_bytes(), None)),
            Err(TocError::DecodeJson { .. })
        ));
    }

    /// `count` tiny entries, then `tail` (which need not be valid JSON).
    fn many_entries(count: usize, tail: &str) -> Vec<u8> {
        let mut json = String::from(r#"{"version":1,"entries":["#);
        for i in 0..count {
            json.push_str(if i == 0 { "" } else { "," });
            json.push_str(r#"{"name":"d","type":"dir"}"#);
        }
        json.push_str(tail);
        json.into_bytes()
    }

    #[test]
    fn entries_past_the_limit_are_refused_as_they_are_read() {
        let at_limit = decode_within(&many_entries(3, "]}"), 3).unwrap();
        assert_eq!(at_limit.toc.entries.len(), 3);
        assert_eq!(at_limit.toc.version, 1);
        // The entry past the limit ends the decoding: what follows it is never read (here,
        // text that is not JSON at all), nor held.
        assert!(matches!(
            decode_within(&many_entries(4, ",!garbage"), 3),
            Err(TocError::TooManyEntries { max: 3 })
        ));
        assert!(matches!(
            decode_within(&many_entries(2, ",!garbage"), 3),
            Err(TocError::DecodeJson { .. })
        ));
        let duplicate = br#"{"version":1,"entries":[],"entries":[]}"#;
        assert!(matches!(
            decode_within(duplicate, 3),
            Err(TocError::DecodeJson { .. })
        ));
        let unknown_key = br#"{"version":1,"x":{"y":[1]},"entries":[]}"#;
        assert!(decode_within(unknown_key, 3).is_ok());
        assert!(decode_within(br#"{"version":1}"#, 3).is_err());
    }

    #[test]
    fn a_toc_of_more_than_a_million_entries_is_refused_before_its_end() {
        // At the real limit: the old decoder read every entry (up to the 64 MiB JSON limit,
        // some 2.5 million of them) before counting, and reached the garbage first.
        let json = many_entries(MAX_TOC_ENTRIES + 1, ",!garbage");
        assert!(matches!(
            decode_toc_json(&json),
            Err(TocError::TooManyEntries {
                max: MAX_TOC_ENTRIES
            })
        ));
    }
}
