//! A raw, record-level tar reader: each logical entry comes back with the exact bytes of its
//! extension records and header, so the builder can copy them through unchanged (lossless)
//! while knowing the metadata the TOC needs.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::BuildError;
use crate::estargz::toc::header_checksum;

const BLOCK: usize = 512;
/// Largest PAX or GNU long-name record accepted.
const MAX_EXTENSION_SIZE: u64 = 1 << 20;
const XATTR_PREFIX: &str = "SCHILY.xattr.";

/// What a logical tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A PAX global header: copied through, not a file.
    GlobalHeader,
}

/// Metadata of a logical entry, after applying PAX and GNU long-name records.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub name: String,
    pub kind: Kind,
    pub link_name: String,
    pub size: u64,
    pub mode: u64,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    /// Unix seconds, rounded to the nearest second.
    pub mtime: i64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A logical entry: raw record bytes up to and including its header, plus metadata. Its
/// `meta.size` data bytes follow in the stream.
#[derive(Debug, Clone)]
pub(super) struct RawEntry {
    pub prefix: Vec<u8>,
    pub meta: Meta,
}

/// Extension values collected from PAX ('x') and GNU ('L', 'K') records.
#[derive(Default)]
struct Extensions {
    path: Option<Vec<u8>>,
    link_path: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    user_name: Option<Vec<u8>>,
    group_name: Option<Vec<u8>>,
    mtime: Option<i64>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

pub(super) struct TarStream<R> {
    inner: R,
    /// Stream position, for error messages.
    offset: u64,
    /// Unread data bytes of the current entry.
    data_left: u64,
    /// Padding after the current entry's data.
    padding_left: u64,
}

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            data_left: 0,
            padding_left: 0,
        }
    }

    /// Reads the next logical entry; `None` at the end-of-archive marker or a clean EOF.
    /// Unread data of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<RawEntry>, BuildError> {
        self.skip(self.data_left + self.padding_left)?;
        self.data_left = 0;
        self.padding_left = 0;
        let mut prefix = Vec::new();
        let mut ext = Extensions::default();
        loop {
            let header_offset = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let header = tar::Header::from_byte_slice(&block);
            if header.cksum().ok() != Some(header_checksum(&block)) {
                return Err(BuildError::TarHeaderChecksum {
                    offset: header_offset,
                });
            }
            let field = |field| BuildError::TarField {
                offset: header_offset,
                field,
            };
            // Some writers leave numeric fields empty; readers take that as zero.
            let number = |range: std::ops::Range<usize>, parsed: io::Result<u64>, name| {
                if block[range].iter().all(|&b| b == 0 || b == b' ') {
                    Ok(0)
                } else {
                    parsed.map_err(|_| field(name))
                }
            };
            let size = number(124..136, header.entry_size(), "size")?;
            prefix.extend_from_slice(&block);
            let type_flag = header.entry_type().as_byte();
            match type_flag {
                b'x' | b'L' | b'K' => {
                    let data = self.read_extension(header_offset, size)?;
                    prefix.extend_from_slice(&data);
                    prefix.resize(prefix.len() + padding(size) as usize, 0);
                    match type_flag {
                        b'x' => parse_pax(&data, &mut ext, header_offset)?,
                        b'L' => ext.path = Some(until_nul(&data).to_vec()),
                        _ => ext.link_path = Some(until_nul(&data).to_vec()),
                    }
                    continue;
                }
                _ => {}
            }
            let path = ext
                .path
                .take()
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let kind = match type_flag {
                b'0' | b'7' => Kind::Reg,
                // Pre-POSIX archives mark directories only by a trailing slash.
                b'\0' if path.ends_with(b"/") => Kind::Dir,
                b'\0' => Kind::Reg,
                b'1' => Kind::Hardlink,
                b'2' => Kind::Symlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                b'g' => Kind::GlobalHeader,
                other => {
                    return Err(BuildError::UnsupportedEntryType {
                        offset: header_offset,
                        type_flag: other,
                    })
                }
            };
            let size = ext.size.unwrap_or(size);
            let link = ext
                .link_path
                .take()
                .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
                .unwrap_or_default();
            let uid = match ext.uid {
                Some(uid) => uid,
                None => number(108..116, header.uid(), "uid")?,
            };
            let gid = match ext.gid {
                Some(gid) => gid,
                None => number(116..124, header.gid(), "gid")?,
            };
            let mtime = match ext.mtime {
                Some(mtime) => mtime,
                None => number(136..148, header.mtime(), "mtime")? as i64,
            };
            let (dev_major, dev_minor) = match kind {
                Kind::Char | Kind::Block => (
                    header
                        .device_major()
                        .map_err(|_| field("devmajor"))?
                        .unwrap_or(0),
                    header
                        .device_minor()
                        .map_err(|_| field("devminor"))?
                        .unwrap_or(0),
                ),
                _ => (0, 0),
            };
            let text = |bytes: Vec<u8>, name| {
                String::from_utf8(bytes).map_err(|_| BuildError::NonUtf8 {
                    offset: header_offset,
                    field: name,
                })
            };
            let meta = Meta {
                name: text(path, "name")?,
                kind,
                link_name: text(link, "linkname")?,
                size,
                mode: number(100..108, header.mode().map(u64::from), "mode")?,
                uid: u32::try_from(uid).map_err(|_| field("uid"))?,
                gid: u32::try_from(gid).map_err(|_| field("gid"))?,
                user_name: text(
                    ext.user_name
                        .take()
                        .or_else(|| header.username_bytes().map(<[u8]>::to_vec))
                        .unwrap_or_default(),
                    "uname",
                )?,
                group_name: text(
                    ext.group_name
                        .take()
                        .or_else(|| header.groupname_bytes().map(<[u8]>::to_vec))
                        .unwrap_or_default(),
                    "gname",
                )?,
                mtime,
                dev_major,
                dev_minor,
                xattrs: std::mem::take(&mut ext.xattrs),
            };
            self.data_left = size;
            self.padding_left = padding(size);
            return Ok(Some(RawEntry { prefix, meta }));
        }
    }

    /// Reads data of the current entry; 0 once it is exhausted.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, BuildError> {
        let want = buf
            .len()
            .min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.read_some(&mut buf[..want])?;
        if n == 0 {
            return Err(BuildError::TruncatedTar {
                offset: self.offset,
            });
        }
        self.data_left -= n as u64;
        Ok(n)
    }

    /// Reads the rest of the input so that a producer piping into us sees it consumed.
    pub fn drain(&mut self) -> Result<(), BuildError> {
        let offset = self.offset;
        io::copy(&mut self.inner, &mut io::sink())
            .map(drop)
            .map_err(|source| BuildError::ReadTar { offset, source })
    }

    fn read_extension(&mut self, offset: u64, size: u64) -> Result<Vec<u8>, BuildError> {
        if size > MAX_EXTENSION_SIZE {
            return Err(BuildError::ExtensionTooLarge { offset, size });
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact(&mut data)?;
        self.skip(padding(size))?;
        Ok(data)
    }

    /// Reads one block; `false` on EOF before its first byte (a missing end marker).
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, BuildError> {
        let first = self.read_some(block)?;
        if first == 0 {
            return Ok(false);
        }
        self.read_exact(&mut block[first..])?;
        Ok(true)
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), BuildError> {
        while !buf.is_empty() {
            let n = self.read_some(buf)?;
            if n == 0 {
                return Err(BuildError::TruncatedTar {
                    offset: self.offset,
                });
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, BuildError> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(BuildError::ReadTar {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }

    fn skip(&mut self, len: u64) -> Result<(), BuildError> {
        let offset = self.offset;
        let skipped = io::copy(&mut (&mut self.inner).take(len), &mut io::sink())
            .map_err(|source| BuildError::ReadTar { offset, source })?;
        self.offset += skipped;
        if skipped != len {
            return Err(BuildError::TruncatedTar {
                offset: self.offset,
            });
        }
        Ok(())
    }
}

/// Zero bytes that pad `size` bytes of data to a whole block.
pub(super) fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn until_nul(data: &[u8]) -> &[u8] {
    data.split(|&b| b == 0).next().unwrap_or_default()
}

/// Parses PAX records (`"<len> <key>=<value>\n"`) into `ext`.
fn parse_pax(mut data: &[u8], ext: &mut Extensions, offset: u64) -> Result<(), BuildError> {
    let bad = || BuildError::TarField {
        offset,
        field: "pax record",
    };
    while !data.is_empty() {
        // Some writers pad the record block with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &data[space + 1..len - 1];
        data = &data[len..];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let key = std::str::from_utf8(&record[..eq]).map_err(|_| bad())?;
        let value = &record[eq + 1..];
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        };
        match key {
            "path" => ext.path = Some(value.to_vec()),
            "linkpath" => ext.link_path = Some(value.to_vec()),
            "size" => ext.size = Some(number().ok_or_else(bad)?),
            "uid" => ext.uid = Some(number().ok_or_else(bad)?),
            "gid" => ext.gid = Some(number().ok_or_else(bad)?),
            "uname" => ext.user_name = Some(value.to_vec()),
            "gname" => ext.group_name = Some(value.to_vec()),
            "mtime" => ext.mtime = Some(parse_pax_time(value).ok_or_else(bad)?),
            _ => {
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    ext.xattrs.insert(name.to_owned(), value.to_vec());
                }
            }
        }
    }
    Ok(())
}

/// Parses a PAX time (`[-]secs[.frac]`) rounded to the nearest second, half away from zero.
fn parse_pax_time(value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut secs: i64 = secs.parse().ok()?;
    if frac.as_bytes().first().is_some_and(|&d| d >= b'5') {
        secs = secs.checked_add(1)?;
    }
    Some(if negative { -secs } else { secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pax_records() {
        let mut ext = Extensions::default();
        let records = b"30 mtime=1700000000.700000000\n21 SCHILY.xattr.a=\x01\x02\n12 uid=1000\n";
        parse_pax(records, &mut ext, 0).unwrap();
        assert_eq!(ext.mtime, Some(1_700_000_001));
        assert_eq!(ext.xattrs["a"], b"\x01\x02");
        assert_eq!(ext.uid, Some(1000));
    }

    #[test]
    fn rejects_malformed_pax_records() {
        for bad in [
            &b"99 path=x\n"[..],
            b"5 path=x\n",
            b"x path\n",
            b"11 size=x\n",
        ] {
            assert!(
                parse_pax(bad, &mut Extensions::default(), 0).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rounds_pax_times() {
        assert_eq!(parse_pax_time(b"10.49"), Some(10));
        assert_eq!(parse_pax_time(b"10.5"), Some(11));
        assert_eq!(parse_pax_time(b"-3.9"), Some(-4));
        assert_eq!(parse_pax_time(b"1e3"), None);
    }
}
