//! The eStargz blob writer: tar bytes go into gzip members, a new member starts at every
//! chunk of regular file data, and the TOC member and footer close the blob.

use std::collections::HashMap;
use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest as _, Sha256};

use super::tar_stream::{padding, Kind, Meta};
use super::BuildError;
use crate::estargz::digest::Sha256Digest;
use crate::estargz::footer::Footer;
use crate::estargz::modtime::format_modtime;
use crate::estargz::toc::{encode_toc_json, EntryType, Toc, TocEntry, TOC_TAR_NAME};

const COPY_BUFFER: usize = 64 << 10;

/// Counts and hashes the compressed bytes that reach the output.
struct Sink<W> {
    inner: W,
    written: u64,
    hash: Sha256,
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Either no member is open (bytes go nowhere yet) or one is being compressed.
enum State<W: Write> {
    Idle(Sink<W>),
    Member(GzEncoder<Sink<W>>),
    /// Only while switching between the two.
    Poisoned,
}

/// Digests and sizes of a finished blob.
pub(super) struct Finished {
    pub toc_digest: Sha256Digest,
    pub toc_offset: u64,
    pub diff_id: Sha256Digest,
    pub uncompressed_size: u64,
    pub compressed_size: u64,
    pub blob_digest: Sha256Digest,
}

pub(super) struct BlobWriter<W: Write> {
    state: State<W>,
    level: Compression,
    chunk_size: u64,
    diff: Sha256,
    uncompressed: u64,
    entries: Vec<TocEntry>,
    // User and group names are written only when they change for an id, as the reference
    // writer does; readers fill the gaps.
    last_user: HashMap<u32, String>,
    last_group: HashMap<u32, String>,
}

impl<W: Write> BlobWriter<W> {
    pub fn new(out: W, level: Compression, chunk_size: u64) -> Self {
        Self {
            state: State::Idle(Sink {
                inner: out,
                written: 0,
                hash: Sha256::new(),
            }),
            level,
            chunk_size,
            diff: Sha256::new(),
            uncompressed: 0,
            entries: Vec::new(),
            last_user: HashMap::new(),
            last_group: HashMap::new(),
        }
    }

    /// Appends one tar entry: `prefix` (its raw extension records and header) and `meta.size`
    /// bytes of data pulled from `read_data`.
    pub fn append(
        &mut self,
        prefix: &[u8],
        meta: &Meta,
        mut read_data: impl FnMut(&mut [u8]) -> Result<usize, BuildError>,
    ) -> Result<(), BuildError> {
        let kind = match meta.kind {
            Kind::Dir => Some(EntryType::Dir),
            Kind::Reg => Some(EntryType::Reg),
            Kind::Symlink => Some(EntryType::Symlink),
            Kind::Hardlink => Some(EntryType::Hardlink),
            Kind::Char => Some(EntryType::Char),
            Kind::Block => Some(EntryType::Block),
            Kind::Fifo => Some(EntryType::Fifo),
            Kind::GlobalHeader => None,
        };
        // The header goes into the member that is open, ahead of the file's own members.
        self.write(prefix)?;
        let Some(kind) = kind else {
            self.copy_data(meta, meta.size, &mut read_data, &mut [])?;
            return self.write(&zeros(padding(meta.size)));
        };
        let mut entry = self.toc_entry(meta, kind);
        if kind != EntryType::Reg {
            // Non-file payloads (rare, e.g. sized hardlink headers) stay in the open member.
            self.copy_data(meta, meta.size, &mut read_data, &mut [])?;
            self.entries.push(entry);
            return self.write(&zeros(padding(meta.size)));
        }
        let first = self.entries.len();
        let mut file_hash = Sha256::new();
        let mut written = 0u64;
        while written < meta.size {
            let remain = meta.size - written;
            let size = remain.min(self.chunk_size);
            if remain >= self.chunk_size {
                entry.chunk_size = size;
            }
            entry.offset = self.start_member()?;
            entry.chunk_offset = written;
            let mut chunk_hash = Sha256::new();
            self.copy_data(
                meta,
                size,
                &mut read_data,
                &mut [&mut file_hash, &mut chunk_hash],
            )?;
            entry.chunk_digest = Some(Sha256Digest::from_hasher(chunk_hash));
            written += size;
            let next = TocEntry::new(meta.name.clone(), EntryType::Chunk);
            self.entries.push(std::mem::replace(&mut entry, next));
        }
        let digest = Some(Sha256Digest::from_hasher(file_hash));
        match self.entries.get_mut(first) {
            Some(reg) if meta.size > 0 => reg.digest = digest,
            _ => {
                entry.digest = digest;
                self.entries.push(entry);
            }
        }
        self.write(&zeros(padding(meta.size)))
    }

    /// Closes the last member, writes the TOC member and the footer, and flushes.
    pub fn finish(mut self) -> Result<Finished, BuildError> {
        let toc_offset = self.start_member()?;
        let toc = Toc {
            version: 1,
            entries: std::mem::take(&mut self.entries),
        };
        let json = encode_toc_json(&toc).map_err(|source| BuildError::EncodeToc { source })?;
        let mut header = tar::Header::new_ustar();
        header
            .set_path(TOC_TAR_NAME)
            .map_err(|source| BuildError::WriteBlob { source })?;
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(json.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.write(header.as_bytes())?;
        self.write(&json)?;
        self.write(&zeros(padding(json.len() as u64)))?;
        // End-of-archive marker: two zero blocks.
        self.write(&[0u8; 1024])?;
        self.close_member()?;
        let mut sink = match std::mem::replace(&mut self.state, State::Poisoned) {
            State::Idle(sink) => sink,
            State::Member(_) | State::Poisoned => return Err(BuildError::WriterState),
        };
        sink.write_all(&Footer::encode(toc_offset))
            .and_then(|()| sink.flush())
            .map_err(|source| BuildError::WriteBlob { source })?;
        Ok(Finished {
            toc_digest: Sha256Digest::of(&json),
            toc_offset,
            diff_id: Sha256Digest::from_hasher(self.diff),
            uncompressed_size: self.uncompressed,
            compressed_size: sink.written,
            blob_digest: Sha256Digest::from_hasher(sink.hash),
        })
    }

    fn toc_entry(&mut self, meta: &Meta, kind: EntryType) -> TocEntry {
        let mut entry = TocEntry::new(meta.name.clone(), kind);
        entry.mode = meta.mode;
        entry.uid = meta.uid;
        entry.gid = meta.gid;
        entry.user_name = name_if_changed(&mut self.last_user, meta.uid, &meta.user_name);
        entry.group_name = name_if_changed(&mut self.last_group, meta.gid, &meta.group_name);
        entry.mod_time = format_modtime(meta.mtime);
        entry.xattrs = meta.xattrs.clone();
        match kind {
            EntryType::Reg => entry.size = meta.size,
            EntryType::Symlink | EntryType::Hardlink => entry.link_name = meta.link_name.clone(),
            EntryType::Char | EntryType::Block => {
                entry.dev_major = meta.dev_major;
                entry.dev_minor = meta.dev_minor;
            }
            EntryType::Dir | EntryType::Fifo | EntryType::Chunk => {}
        }
        entry
    }

    /// Copies exactly `len` data bytes into the open member, feeding `hashes` on the way.
    fn copy_data(
        &mut self,
        meta: &Meta,
        mut len: u64,
        read_data: &mut impl FnMut(&mut [u8]) -> Result<usize, BuildError>,
        hashes: &mut [&mut Sha256],
    ) -> Result<(), BuildError> {
        let mut buf = vec![0u8; COPY_BUFFER.min(len as usize)];
        while len > 0 {
            let want = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            let n = read_data(&mut buf[..want])?;
            if n == 0 {
                return Err(BuildError::EntryDataShort {
                    name: meta.name.clone(),
                });
            }
            for hash in hashes.iter_mut() {
                hash.update(&buf[..n]);
            }
            self.write(&buf[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Closes the open member (if any) and returns where the next one will start.
    fn start_member(&mut self) -> Result<u64, BuildError> {
        self.close_member()?;
        match &self.state {
            State::Idle(sink) => Ok(sink.written),
            State::Member(_) | State::Poisoned => Err(BuildError::WriterState),
        }
    }

    fn close_member(&mut self) -> Result<(), BuildError> {
        self.state = match std::mem::replace(&mut self.state, State::Poisoned) {
            State::Member(gz) => State::Idle(
                gz.finish()
                    .map_err(|source| BuildError::WriteBlob { source })?,
            ),
            other => other,
        };
        Ok(())
    }

    /// Writes uncompressed tar bytes, opening a member if none is open.
    fn write(&mut self, bytes: &[u8]) -> Result<(), BuildError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let State::Idle(_) = self.state {
            self.state = match std::mem::replace(&mut self.state, State::Poisoned) {
                State::Idle(sink) => State::Member(GzEncoder::new(sink, self.level)),
                other => other,
            };
        }
        let State::Member(gz) = &mut self.state else {
            return Err(BuildError::WriterState);
        };
        gz.write_all(bytes)
            .map_err(|source| BuildError::WriteBlob { source })?;
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        Ok(())
    }
}

fn name_if_changed(last: &mut HashMap<u32, String>, id: u32, name: &str) -> String {
    if name.is_empty() || last.get(&id).is_some_and(|n| n == name) {
        return String::new();
    }
    last.insert(id, name.to_owned());
    name.to_owned()
}

fn zeros(len: u64) -> Vec<u8> {
    vec![0; len as usize]
}
