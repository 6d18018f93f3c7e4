//! The tar wrapper overlaybd puts around a layer blob so registries accept it as a tar layer.
//!
//! A wrapped blob is a one-entry ustar archive named `overlaybd.commit`. The reference writer
//! emits a PAX header (`overlaybd.pax`, one data block with a `size=` record) in front of the
//! entry, so the payload starts at byte 1536; without the PAX header it starts at byte 512 and
//! the entry header carries the size. Blobs that are not ustar archives pass through whole.

/// Size of a tar block.
pub const BLOCK: usize = 512;
/// Bytes from the start of a blob that [`locate`] needs to see (shorter blobs: all of them).
pub const PROBE_LEN: usize = 3 * BLOCK;
/// Name of the single entry in a wrapped blob.
pub const ENTRY_NAME: &str = "overlaybd.commit";
const PAX_NAME: &str = "overlaybd.pax";

const NAME: std::ops::Range<usize> = 0..100;
const MODE: std::ops::Range<usize> = 100..108;
const UID: std::ops::Range<usize> = 108..116;
const GID: std::ops::Range<usize> = 116..124;
const SIZE: std::ops::Range<usize> = 124..136;
const MTIME: std::ops::Range<usize> = 136..148;
const CHKSUM: std::ops::Range<usize> = 148..156;
const TYPEFLAG: usize = 156;
const MAGIC: std::ops::Range<usize> = 257..263;
const VERSION: std::ops::Range<usize> = 263..265;
const USTAR_MAGIC: &[u8] = b"ustar\0";
const USTAR_VERSION: &[u8] = b"00";
const TYPE_PAX: u8 = b'x';
const TYPE_REGULAR: u8 = b'0';

/// Failure to make sense of a blob that starts like a tar archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarWrapperError {
    #[error("tar header at byte {at} has checksum {stored}, computed {computed}")]
    HeaderChecksum {
        at: usize,
        stored: u64,
        computed: u64,
    },
    #[error("tar header at byte {at} has an unreadable {field} field")]
    HeaderField { at: usize, field: &'static str },
    #[error("blob head of {len} bytes ends before the tar header at byte {at}")]
    ShortHead { len: usize, at: usize },
    #[error("pax header data of {size} bytes does not fit the single block overlaybd writes")]
    PaxTooLarge { size: u64 },
    #[error("pax header has a malformed size record")]
    PaxSize,
    #[error("tar entry is {name:?}, not {ENTRY_NAME}")]
    UnexpectedEntry { name: String },
    #[error("payload of {len} bytes at byte {offset} overruns the {blob_size}-byte blob")]
    Truncated {
        offset: u64,
        len: u64,
        blob_size: u64,
    },
}

/// Where the overlaybd file (ZFile or LSMT) sits inside a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Byte offset of the payload in the blob.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// Whether the blob carried the tar wrapper.
    pub wrapped: bool,
}

/// Locates the payload of a layer blob from its first [`PROBE_LEN`] bytes (`head`) and size.
pub fn locate(head: &[u8], blob_size: u64) -> Result<Payload, TarWrapperError> {
    let Some(first) = head.get(..BLOCK) else {
        return Ok(unwrapped(blob_size));
    };
    if &first[MAGIC] != USTAR_MAGIC || &first[VERSION] != USTAR_VERSION {
        return Ok(unwrapped(blob_size));
    }
    verify_checksum(first, 0)?;
    let (entry_at, pax_size) = if first[TYPEFLAG] == TYPE_PAX {
        let size = octal(&first[SIZE]).ok_or(TarWrapperError::HeaderField {
            at: 0,
            field: "size",
        })?;
        if size > BLOCK as u64 {
            return Err(TarWrapperError::PaxTooLarge { size });
        }
        let records = block_at(head, BLOCK)?;
        (2 * BLOCK, pax_size_record(&records[..size as usize])?)
    } else {
        (0, None)
    };
    let entry = block_at(head, entry_at)?;
    if entry_at != 0 {
        verify_checksum(entry, entry_at)?;
    }
    let name = field_str(&entry[NAME]);
    if name != ENTRY_NAME {
        return Err(TarWrapperError::UnexpectedEntry { name: name.into() });
    }
    let len = match pax_size {
        Some(size) => size,
        None => octal(&entry[SIZE]).ok_or(TarWrapperError::HeaderField {
            at: entry_at,
            field: "size",
        })?,
    };
    let offset = (entry_at + BLOCK) as u64;
    match offset.checked_add(len) {
        Some(end) if end <= blob_size => Ok(Payload {
            offset,
            len,
            wrapped: true,
        }),
        _ => Err(TarWrapperError::Truncated {
            offset,
            len,
            blob_size,
        }),
    }
}

/// The bytes that precede a payload of `payload_len` bytes in a wrapped blob (PAX form).
pub fn header(payload_len: u64) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    let record = pax_record("size", &payload_len.to_string());
    let (pax, rest) = out.split_at_mut(BLOCK);
    fill_header(pax, PAX_NAME, TYPE_PAX, record.len() as u64);
    rest[..record.len()].copy_from_slice(record.as_bytes());
    // Like the reference writer, the entry's own size is 0: the PAX record is authoritative.
    fill_header(&mut rest[BLOCK..], ENTRY_NAME, TYPE_REGULAR, 0);
    out
}

/// The bytes that follow a payload of `payload_len` bytes: padding to a block plus the
/// two zero blocks that end an archive.
pub fn trailer(payload_len: u64) -> Vec<u8> {
    let padding = (BLOCK - (payload_len % BLOCK as u64) as usize) % BLOCK;
    vec![0; padding + 2 * BLOCK]
}

/// Wraps a whole payload into a tar-wrapped layer blob.
pub fn wrap(payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u64;
    let mut out = Vec::with_capacity(PROBE_LEN + payload.len() + 3 * BLOCK);
    out.extend_from_slice(&header(len));
    out.extend_from_slice(payload);
    out.extend_from_slice(&trailer(len));
    out
}

fn unwrapped(blob_size: u64) -> Payload {
    Payload {
        offset: 0,
        len: blob_size,
        wrapped: false,
    }
}

fn block_at(head: &[u8], at: usize) -> Result<&[u8], TarWrapperError> {
    head.get(at..at + BLOCK).ok_or(TarWrapperError::ShortHead {
        len: head.len(),
        at,
    })
}

fn checksum(block: &[u8]) -> u64 {
    let spaces = CHKSUM.len() as u64 * u64::from(b' ');
    let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
    let stored: u64 = block[CHKSUM].iter().map(|&b| u64::from(b)).sum();
    sum - stored + spaces
}

fn verify_checksum(block: &[u8], at: usize) -> Result<(), TarWrapperError> {
    let stored = octal(&block[CHKSUM]).ok_or(TarWrapperError::HeaderField {
        at,
        field: "checksum",
    })?;
    let computed = checksum(block);
    if stored == computed {
        Ok(())
    } else {
        Err(TarWrapperError::HeaderChecksum {
            at,
            stored,
            computed,
        })
    }
}

/// Parses a NUL/space padded octal field; `None` for anything else.
fn octal(field: &[u8]) -> Option<u64> {
    let text = field_str(field).trim_matches(' ');
    if text.is_empty() {
        return None;
    }
    u64::from_str_radix(text, 8).ok()
}

fn field_str(field: &[u8]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).unwrap_or("")
}

/// Finds the `size` record in PAX data made of `"<len> <key>=<value>\n"` records.
fn pax_size_record(mut data: &[u8]) -> Result<Option<u64>, TarWrapperError> {
    let mut size = None;
    while let Some(space) = data.iter().position(|&b| b == b' ') {
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&len| len > space && len <= data.len())
            .ok_or(TarWrapperError::PaxSize)?;
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").ok_or(TarWrapperError::PaxSize)?;
        if let Some(value) = record.strip_prefix(b"size=") {
            let value = std::str::from_utf8(value).map_err(|_| TarWrapperError::PaxSize)?;
            size = Some(value.parse().map_err(|_| TarWrapperError::PaxSize)?);
        }
        data = &data[len..];
    }
    // Only NUL padding may follow the last record.
    if data.iter().any(|&b| b != 0) {
        return Err(TarWrapperError::PaxSize);
    }
    Ok(size)
}

/// Formats a PAX record; its length prefix counts its own digits.
fn pax_record(key: &str, value: &str) -> String {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n")
}

fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

fn fill_header(block: &mut [u8], name: &str, typeflag: u8, size: u64) {
    block[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut block[MODE], 0o100644);
    put_octal(&mut block[UID], 0);
    put_octal(&mut block[GID], 0);
    put_octal(&mut block[SIZE], size);
    put_octal(&mut block[MTIME], 0);
    block[TYPEFLAG] = typeflag;
    block[MAGIC].copy_from_slice(USTAR_MAGIC);
    block[VERSION].copy_from_slice(USTAR_VERSION);
    let sum = checksum(block);
    // Conventional checksum layout: six octal digits, NUL, space.
    put_octal(&mut block[CHKSUM.start..CHKSUM.start + 7], sum);
    block[CHKSUM.end - 1] = b' ';
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwrapped_blobs_pass_through() {
        let blob = b"ZFile\0\x01\0 not a tar".repeat(100);
        let payload = locate(&blob, blob.len() as u64).unwrap();
        assert_eq!(
            payload,
            Payload {
                offset: 0,
                len: blob.len() as u64,
                wrapped: false
            }
        );
        assert_eq!(locate(b"tiny", 4).unwrap().len, 4);
    }

    #[test]
    fn wrap_then_locate_round_trips() {
        for len in [0usize, 1, 511, 512, 513, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let blob = wrap(&payload);
            assert_eq!(blob.len() % BLOCK, 0);
            let found = locate(&blob[..PROBE_LEN], blob.len() as u64).unwrap();
            assert_eq!(
                found,
                Payload {
                    offset: 1536,
                    len: len as u64,
                    wrapped: true
                }
            );
            let start = found.offset as usize;
            assert_eq!(&blob[start..start + len], &payload[..]);
        }
    }

    #[test]
    fn plain_entry_without_pax_uses_its_own_size() {
        let mut blob = vec![0u8; BLOCK];
        fill_header(&mut blob, ENTRY_NAME, TYPE_REGULAR, 700);
        blob.resize(BLOCK + 1024 + 2 * BLOCK, 0);
        let found = locate(&blob, blob.len() as u64).unwrap();
        assert_eq!(
            found,
            Payload {
                offset: 512,
                len: 700,
                wrapped: true
            }
        );
    }

    #[test]
    fn corrupt_or_foreign_tars_are_errors() {
        let blob = wrap(&[7u8; 2000]);
        let size = blob.len() as u64;

        let mut bad_sum = blob.clone();
        bad_sum[10] ^= 1;
        assert!(matches!(
            locate(&bad_sum, size),
            Err(TarWrapperError::HeaderChecksum { at: 0, .. })
        ));

        assert_eq!(
            locate(&blob, 1000),
            Err(TarWrapperError::Truncated {
                offset: 1536,
                len: 2000,
                blob_size: 1000
            })
        );
        assert!(matches!(
            locate(&blob[..1000], size),
            Err(TarWrapperError::ShortHead { at: 512, .. })
        ));

        let mut foreign = vec![0u8; BLOCK];
        fill_header(&mut foreign, "etc/passwd", TYPE_REGULAR, 10);
        foreign.resize(4 * BLOCK, 0);
        assert_eq!(
            locate(&foreign, 4 * BLOCK as u64),
            Err(TarWrapperError::UnexpectedEntry {
                name: "etc/passwd".into()
            })
        );
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record("size", "639491"), "15 size=639491\n");
        assert_eq!(pax_record("size", "0"), "9 size=0\n");
        let long = "1".repeat(92);
        let record = pax_record("size", &long);
        assert_eq!(record.len().to_string(), record.split(' ').next().unwrap());
        assert_eq!(
            pax_size_record(b"15 size=639491\n\0\0").unwrap(),
            Some(639491)
        );
        assert!(pax_size_record(b"99 size=1\n").is_err());
        assert!(pax_size_record(b"junk").is_err());
    }
}
