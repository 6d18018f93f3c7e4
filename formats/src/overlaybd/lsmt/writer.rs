//! LSMT writer: turns one layer's changed extents into a sealed LSMT data file.

use super::header::{HeaderTrailer, Record, HEADER_SIZE, SUB_VERSION, TAG_LEN, UUID_LEN, VERSION};
use super::index::{Mapping, MAX_LENGTH, RECORD_SIZE, SECTOR};
use super::LsmtError;

/// Bytes written by a layer at a virtual-disk byte offset; both sector aligned.
#[derive(Debug, Clone, Copy)]
pub struct Extent<'a> {
    pub offset: u64,
    pub data: &'a [u8],
}

/// Builds a sealed LSMT file for one layer.
///
/// All-zero sectors become zeroed mappings rather than data, so they still shadow lower
/// layers without taking space.
#[derive(Debug, Clone)]
pub struct Writer {
    virtual_size: u64,
    uuid: String,
    parent_uuid: String,
    user_tag: String,
}

impl Writer {
    /// A writer for a virtual disk of `virtual_size` bytes.
    pub fn new(virtual_size: u64) -> Self {
        Self {
            virtual_size,
            uuid: String::new(),
            parent_uuid: String::new(),
            user_tag: String::new(),
        }
    }

    /// Sets this layer's UUID (36-character text form).
    pub fn uuid(mut self, uuid: &str) -> Result<Self, LsmtError> {
        self.uuid = fit("uuid", uuid, UUID_LEN)?;
        Ok(self)
    }

    /// Sets the UUID of the layer below.
    pub fn parent_uuid(mut self, uuid: &str) -> Result<Self, LsmtError> {
        self.parent_uuid = fit("parent uuid", uuid, UUID_LEN)?;
        Ok(self)
    }

    /// Sets the commit message.
    pub fn user_tag(mut self, tag: &str) -> Result<Self, LsmtError> {
        self.user_tag = fit("user tag", tag, TAG_LEN)?;
        Ok(self)
    }

    /// Writes the file: header, data, index (padded to 4 KiB), trailer.
    pub fn write(&self, extents: &[Extent<'_>]) -> Result<Vec<u8>, LsmtError> {
        let mut sorted: Vec<&Extent<'_>> = extents.iter().filter(|e| !e.data.is_empty()).collect();
        sorted.sort_by_key(|e| e.offset);
        let mut out = vec![0u8; HEADER_SIZE];
        let mut mappings: Vec<Mapping> = Vec::new();
        let mut prev_end = 0u64;
        for extent in sorted {
            let len = extent.data.len();
            if !extent.offset.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR) {
                return Err(LsmtError::ExtentAlignment {
                    offset: extent.offset,
                    len,
                });
            }
            if extent.offset < prev_end {
                return Err(LsmtError::ExtentOverlap {
                    offset: extent.offset,
                    prev_end,
                });
            }
            let end = extent.offset.saturating_add(len as u64);
            if end > self.virtual_size {
                return Err(LsmtError::ExtentPastEnd {
                    end,
                    virtual_size: self.virtual_size,
                });
            }
            prev_end = end;
            let first_sector = extent.offset / SECTOR;
            for (i, sector) in extent.data.chunks_exact(SECTOR as usize).enumerate() {
                let zeroed = sector.iter().all(|&b| b == 0);
                let moffset = out.len() as u64 / SECTOR;
                if !zeroed {
                    out.extend_from_slice(sector);
                }
                push(
                    &mut mappings,
                    Mapping {
                        offset: first_sector + i as u64,
                        len: 1,
                        moffset,
                        zeroed,
                    },
                );
            }
        }
        let index_offset = out.len() as u64;
        let per_page = HEADER_SIZE / RECORD_SIZE;
        let padded = mappings.len().div_ceil(per_page) * per_page;
        mappings.resize(padded, Mapping::padding());
        for m in &mappings {
            out.extend_from_slice(&m.encode());
        }
        let mut info = HeaderTrailer {
            flags: 0,
            index_offset: 0,
            index_size: 0,
            virtual_size: self.virtual_size,
            uuid: self.uuid.clone(),
            parent_uuid: self.parent_uuid.clone(),
            version: VERSION,
            sub_version: SUB_VERSION,
            user_tag: self.user_tag.clone(),
        };
        out[..HEADER_SIZE].copy_from_slice(&info.encode(Record::Header));
        info.index_offset = index_offset;
        info.index_size = padded as u64;
        out.extend_from_slice(&info.encode(Record::Trailer));
        Ok(out)
    }
}

/// Appends a one-sector mapping, extending the previous one when it continues it.
fn push(mappings: &mut Vec<Mapping>, m: Mapping) {
    if let Some(prev) = mappings.last_mut() {
        let contiguous = prev.end() == m.offset
            && prev.zeroed == m.zeroed
            && (m.zeroed || prev.moffset + u64::from(prev.len) == m.moffset);
        if contiguous && prev.len < MAX_LENGTH {
            prev.len += 1;
            return;
        }
    }
    mappings.push(m);
}

fn fit(field: &'static str, text: &str, field_len: usize) -> Result<String, LsmtError> {
    // One byte is kept for the terminating NUL.
    let max = field_len - 1;
    if text.len() > max {
        return Err(LsmtError::FieldTooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(text.to_owned())
}
