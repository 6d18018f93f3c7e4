//! The eStargz footer: an empty gzip member at the end of the blob whose gzip "extra" field
//! carries the TOC offset as `%016x` followed by `STARGZ`.
//!
//! Two layouts exist. The current one (51 bytes) wraps the payload in an RFC 1952 extra
//! subfield with id `SG`; the legacy stargz one (47 bytes) puts the 22 payload bytes directly in
//! the extra field.

/// Size of the current eStargz footer.
pub const FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: usize = 47;

const MAGIC: &[u8; 6] = b"STARGZ";
/// 16 hex digits of TOC offset followed by the magic.
const PAYLOAD_LEN: usize = 16 + MAGIC.len();
const GZIP_HEADER_LEN: usize = 10;
const FLAG_EXTRA: u8 = 0x04;
/// A stored (BFINAL=1, BTYPE=00) empty deflate block: header byte, LEN=0, NLEN=0xffff.
const EMPTY_STORED_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

/// Where the TOC starts and how many bytes at the end of the blob the footer occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the gzip member holding the TOC tar entry.
    pub toc_offset: u64,
    /// [`FOOTER_SIZE`] or [`LEGACY_FOOTER_SIZE`].
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FooterError {
    #[error("blob of {blob_size} bytes is too small for an estargz footer")]
    BlobTooSmall { blob_size: u64 },
    #[error("need the last {needed} bytes of the blob to read the footer, got {got}")]
    ShortTail { needed: usize, got: usize },
    #[error("no estargz footer at the end of the blob: {current}; legacy layout: {legacy}")]
    NotEstargz {
        current: FooterFormatError,
        legacy: FooterFormatError,
    },
    #[error("toc offset {toc_offset} is not before the {footer_size}-byte footer of a {blob_size}-byte blob")]
    TocOffsetOutOfRange {
        toc_offset: u64,
        footer_size: usize,
        blob_size: u64,
    },
}

/// Why one footer layout did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FooterFormatError {
    #[error("not a gzip header")]
    NotGzip,
    #[error("gzip header has no extra field")]
    NoExtraField,
    #[error("extra field is {len} bytes, expected {expected}")]
    ExtraLength { len: usize, expected: usize },
    #[error("extra subfield id is not SG")]
    SubfieldId,
    #[error("STARGZ magic missing")]
    Magic,
    #[error("toc offset is not 16 hex digits")]
    TocOffsetDigits,
    #[error("gzip header carries fields other than the extra field")]
    HeaderFlags,
}

impl Footer {
    /// Encodes the current 51-byte footer pointing at `toc_offset`.
    pub fn encode(toc_offset: u64) -> [u8; FOOTER_SIZE] {
        let mut out = [0u8; FOOTER_SIZE];
        write_gzip_header(&mut out);
        let extra_len = 4 + PAYLOAD_LEN;
        out[10..12].copy_from_slice(&(extra_len as u16).to_le_bytes());
        out[12..14].copy_from_slice(b"SG");
        out[14..16].copy_from_slice(&(PAYLOAD_LEN as u16).to_le_bytes());
        write_payload(&mut out[16..16 + PAYLOAD_LEN], toc_offset);
        out[38..43].copy_from_slice(&EMPTY_STORED_BLOCK);
        // CRC32 and ISIZE of the empty stream are both zero.
        out
    }

    /// Encodes the legacy 47-byte stargz footer pointing at `toc_offset`.
    pub fn encode_legacy(toc_offset: u64) -> [u8; LEGACY_FOOTER_SIZE] {
        let mut out = [0u8; LEGACY_FOOTER_SIZE];
        write_gzip_header(&mut out);
        out[10..12].copy_from_slice(&(PAYLOAD_LEN as u16).to_le_bytes());
        write_payload(&mut out[12..12 + PAYLOAD_LEN], toc_offset);
        out[34..39].copy_from_slice(&EMPTY_STORED_BLOCK);
        out
    }
}

/// Parses the footer of a `blob_size`-byte blob from `tail`, the blob's last
/// `min(FOOTER_SIZE, blob_size)` bytes (a longer slice is fine: only its end is read).
///
/// The current layout is tried first, then the legacy one, like stargz-snapshotter does.
pub fn parse_footer(blob_size: u64, tail: &[u8]) -> Result<Footer, FooterError> {
    if blob_size < LEGACY_FOOTER_SIZE as u64 {
        return Err(FooterError::BlobTooSmall { blob_size });
    }
    let needed = FOOTER_SIZE.min(usize::try_from(blob_size).unwrap_or(FOOTER_SIZE));
    if tail.len() < needed {
        return Err(FooterError::ShortTail {
            needed,
            got: tail.len(),
        });
    }
    let current = if tail.len() >= FOOTER_SIZE {
        parse_current(&tail[tail.len() - FOOTER_SIZE..])
    } else {
        Err(FooterFormatError::NotGzip)
    };
    let (toc_offset, size) = match current {
        Ok(offset) => (offset, FOOTER_SIZE),
        Err(current) => match parse_legacy(&tail[tail.len() - LEGACY_FOOTER_SIZE..]) {
            Ok(offset) => (offset, LEGACY_FOOTER_SIZE),
            Err(legacy) => return Err(FooterError::NotEstargz { current, legacy }),
        },
    };
    // The TOC member must lie wholly before the footer and cannot be empty.
    if toc_offset >= blob_size - size as u64 {
        return Err(FooterError::TocOffsetOutOfRange {
            toc_offset,
            footer_size: size,
            blob_size,
        });
    }
    Ok(Footer { toc_offset, size })
}

fn parse_current(footer: &[u8]) -> Result<u64, FooterFormatError> {
    let extra = gzip_extra(footer)?;
    if extra.len() != 4 + PAYLOAD_LEN {
        return Err(FooterFormatError::ExtraLength {
            len: extra.len(),
            expected: 4 + PAYLOAD_LEN,
        });
    }
    if &extra[..2] != b"SG" {
        return Err(FooterFormatError::SubfieldId);
    }
    if usize::from(u16::from_le_bytes([extra[2], extra[3]])) != PAYLOAD_LEN {
        return Err(FooterFormatError::ExtraLength {
            len: usize::from(u16::from_le_bytes([extra[2], extra[3]])),
            expected: PAYLOAD_LEN,
        });
    }
    let offset = parse_payload(&extra[4..])?;
    check_trailer(footer, GZIP_HEADER_LEN + 2 + extra.len())?;
    Ok(offset)
}

fn parse_legacy(footer: &[u8]) -> Result<u64, FooterFormatError> {
    let extra = gzip_extra(footer)?;
    if extra.len() != PAYLOAD_LEN {
        return Err(FooterFormatError::ExtraLength {
            len: extra.len(),
            expected: PAYLOAD_LEN,
        });
    }
    let offset = parse_payload(extra)?;
    check_trailer(footer, GZIP_HEADER_LEN + 2 + extra.len())?;
    Ok(offset)
}

/// Returns the extra field of the gzip header at the start of `footer`.
fn gzip_extra(footer: &[u8]) -> Result<&[u8], FooterFormatError> {
    if footer.len() < GZIP_HEADER_LEN + 2 || footer[..3] != [0x1f, 0x8b, 0x08] {
        return Err(FooterFormatError::NotGzip);
    }
    if footer[3] & FLAG_EXTRA == 0 {
        return Err(FooterFormatError::NoExtraField);
    }
    let len = usize::from(u16::from_le_bytes([footer[10], footer[11]]));
    footer
        .get(GZIP_HEADER_LEN + 2..GZIP_HEADER_LEN + 2 + len)
        .ok_or(FooterFormatError::ExtraLength {
            len,
            expected: footer.len() - GZIP_HEADER_LEN - 2,
        })
}

fn parse_payload(payload: &[u8]) -> Result<u64, FooterFormatError> {
    if &payload[16..] != MAGIC {
        return Err(FooterFormatError::Magic);
    }
    // `from_str_radix` accepts a leading '+', so validate digits first.
    let digits = &payload[..16];
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(FooterFormatError::TocOffsetDigits);
    }
    let text = std::str::from_utf8(digits).map_err(|_| FooterFormatError::TocOffsetDigits)?;
    u64::from_str_radix(text, 16).map_err(|_| FooterFormatError::TocOffsetDigits)
}

/// After the extra field only the 5-byte empty block and the 8-byte trailer fit; other header
/// fields (name, comment, header CRC) would shift them. The body bytes themselves are not
/// checked, as the reference reader does not check them either.
fn check_trailer(footer: &[u8], body_start: usize) -> Result<(), FooterFormatError> {
    let rest = &footer[body_start..];
    if rest.len() != EMPTY_STORED_BLOCK.len() + 8 || footer[3] & !FLAG_EXTRA != 0 {
        return Err(FooterFormatError::HeaderFlags);
    }
    Ok(())
}

fn write_gzip_header(out: &mut [u8]) {
    out[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, FLAG_EXTRA]);
    // MTIME and XFL stay zero; OS = 255 ("unknown") as the reference writer does.
    out[9] = 0xff;
}

fn write_payload(out: &mut [u8], toc_offset: u64) {
    out[..16].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    out[16..].copy_from_slice(MAGIC);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn blob_with(footer: &[u8], toc_offset: u64) -> Vec<u8> {
        let mut blob = vec![0u8; toc_offset as usize + 10];
        blob.extend_from_slice(footer);
        blob
    }

    #[test]
    fn parses_current_footer() {
        let blob = blob_with(&Footer::encode(1234), 1234);
        let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
        assert_eq!(
            footer,
            Footer {
                toc_offset: 1234,
                size: FOOTER_SIZE
            }
        );
    }

    #[test]
    fn parses_legacy_footer_from_51_byte_tail() {
        let blob = blob_with(&Footer::encode_legacy(0xabcdef), 0xabcdef);
        let footer = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]).unwrap();
        assert_eq!(footer.toc_offset, 0xabcdef);
        assert_eq!(footer.size, LEGACY_FOOTER_SIZE);
    }

    #[test]
    fn footers_are_valid_empty_gzip_members() {
        for bytes in [&Footer::encode(7)[..], &Footer::encode_legacy(7)[..]] {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap();
            assert!(out.is_empty());
        }
    }

    #[test]
    fn rejects_truncated_and_small_blobs() {
        let footer = Footer::encode(0);
        assert_eq!(
            parse_footer(40, &footer[..40]),
            Err(FooterError::BlobTooSmall { blob_size: 40 })
        );
        assert_eq!(
            parse_footer(100, &footer[..30]),
            Err(FooterError::ShortTail {
                needed: FOOTER_SIZE,
                got: 30
            })
        );
    }

    #[test]
    fn rejects_wrong_magic_and_digits() {
        let mut bad_magic = Footer::encode(5);
        bad_magic[37] = b'X';
        let mut plus_sign = Footer::encode(5);
        plus_sign[16] = b'+';
        for footer in [bad_magic, plus_sign, [0u8; FOOTER_SIZE]] {
            let blob = blob_with(&footer, 5);
            let err = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]);
            assert!(
                matches!(err, Err(FooterError::NotEstargz { .. })),
                "{err:?}"
            );
        }
    }

    #[test]
    fn rejects_toc_offset_past_the_footer() {
        let footer = Footer::encode(1 << 40);
        let err = parse_footer(FOOTER_SIZE as u64 + 3, &footer).unwrap_err();
        assert!(
            matches!(err, FooterError::TocOffsetOutOfRange { .. }),
            "{err}"
        );
        // An offset equal to the footer start would mean an empty TOC member.
        let blob = blob_with(&Footer::encode(10), 0);
        let err = parse_footer(blob.len() as u64, &blob[blob.len() - FOOTER_SIZE..]);
        assert!(matches!(err, Err(FooterError::TocOffsetOutOfRange { .. })));
    }
}
