//! One overlaybd layer blob's metadata: where the ZFile lies inside the tar wrapper, its
//! header, trailer and jump table, and the LSMT index inside the ZFile. Parsed and checked
//! here from the bytes alone, so a layer reopens from kept bytes without its blob.

use std::ops::Range;

use super::lsmt::{LsmtError, LsmtFile};
use super::tar_wrapper::TarWrapperError;
use super::zfile::{BlockSpan, ZFile, ZFileError, ZFileInfo};

/// Failure to make sense of a layer's metadata. Transparent: each format's error already says
/// which part of the layer it is about.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Wrapper(#[from] TarWrapperError),
    #[error(transparent)]
    ZFile(#[from] ZFileError),
    #[error(transparent)]
    Lsmt(#[from] LsmtError),
}

/// The metadata bytes of a layer blob, as read from it: enough to reopen it without the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMeta {
    /// Where the ZFile starts within the blob (after the tar wrapper's headers).
    pub payload_offset: u64,
    pub payload_len: u64,
    pub zfile_header: Vec<u8>,
    pub zfile_trailer: Vec<u8>,
    pub jump_table: Vec<u8>,
    pub lsmt_header: Vec<u8>,
    pub lsmt_trailer: Vec<u8>,
    pub lsmt_index: Vec<u8>,
}

/// A parsed layer: its ZFile's block map, placed in the blob, and its LSMT index.
#[derive(Debug, Clone)]
pub struct Layer {
    payload_offset: u64,
    zfile: ZFile,
    lsmt: LsmtFile,
}

impl Layer {
    /// Checks `meta` of a blob of `blob_size` bytes: the payload lies in the blob, the ZFile
    /// header, trailer and jump table agree and pass their CRCs, and the LSMT index fits the
    /// ZFile's decompressed size.
    pub fn parse(meta: &LayerMeta, blob_size: u64) -> Result<Layer, LayerError> {
        let in_blob = meta
            .payload_offset
            .checked_add(meta.payload_len)
            .is_some_and(|end| end <= blob_size);
        if !in_blob {
            return Err(TarWrapperError::Truncated {
                offset: meta.payload_offset,
                len: meta.payload_len,
                blob_size,
            }
            .into());
        }
        let info = ZFileInfo::parse(&meta.zfile_header, &meta.zfile_trailer)?;
        info.jump_table_range(meta.payload_len)?;
        let zfile = ZFile::from_info(info, &meta.jump_table)?;
        let lsmt = LsmtFile::parse(
            &meta.lsmt_header,
            &meta.lsmt_trailer,
            &meta.lsmt_index,
            zfile.uncompressed_size(),
        )?;
        Ok(Layer {
            payload_offset: meta.payload_offset,
            zfile,
            lsmt,
        })
    }

    /// Where the ZFile starts within the blob.
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    pub fn zfile(&self) -> &ZFile {
        &self.zfile
    }

    pub fn lsmt(&self) -> &LsmtFile {
        &self.lsmt
    }

    /// The blocks holding the LSMT file's bytes `range`, placed in the blob.
    pub fn span(&self, range: Range<u64>) -> Result<BlockSpan, ZFileError> {
        Ok(self.zfile.span(range)?.shifted(self.payload_offset))
    }
}
