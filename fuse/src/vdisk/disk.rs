//! The virtual disk of a layer stack: the merged index, and reads that resolve each virtual
//! byte range to the layer blocks holding it (zeros where no layer maps anything).

use shoal_fetcher::BlobRead;

use super::{DiskLayer, FsType};
use crate::error::FsError;
use shoal_formats::overlaybd::lsmt::LsmtFile;
use shoal_formats::overlaybd::{Piece, Stack};

/// Layers of one image prefix stacked into a disk, top layer first.
#[derive(Debug)]
pub struct VirtualDisk {
    layers: Vec<DiskLayer>,
    stack: Stack,
    fs_type: FsType,
}

impl VirtualDisk {
    /// Stacks `layers`, given top first (at most 255).
    pub fn new(layers: Vec<DiskLayer>, fs_type: FsType) -> Result<VirtualDisk, FsError> {
        let files: Vec<&LsmtFile> = layers.iter().map(DiskLayer::lsmt).collect();
        let stack = Stack::from_files(&files).map_err(|source| FsError::StackLayers { source })?;
        Ok(VirtualDisk {
            layers,
            stack,
            fs_type,
        })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.stack.virtual_size()
    }

    pub fn fs_type(&self) -> FsType {
        self.fs_type
    }

    /// The merged index.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[DiskLayer] {
        &self.layers
    }

    /// Bytes `offset..offset + len`, clipped to the disk, if the cache holds every block they
    /// need; `None` when something must be fetched. Never waits on the network.
    pub fn read_cached(&self, blobs: &dyn BlobRead, offset: u64, len: u64) -> Option<Vec<u8>> {
        let pieces = self.pieces(offset, len).ok()?;
        let mut out = Vec::with_capacity(pieces.iter().map(Piece::len).sum::<u64>() as usize);
        for piece in pieces {
            match piece {
                Piece::Zero { len } => out.resize(out.len() + len as usize, 0),
                Piece::Data {
                    layer,
                    moffset,
                    len,
                } => self.layers[layer].read_cached(blobs, moffset..moffset + len, &mut out)?,
            }
        }
        Some(out)
    }

    /// Bytes `offset..offset + len`, clipped to the disk, fetching what the cache lacks.
    pub async fn read(
        &self,
        blobs: &dyn BlobRead,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        let pieces = self.pieces(offset, len)?;
        let mut out = Vec::with_capacity(pieces.iter().map(Piece::len).sum::<u64>() as usize);
        for piece in pieces {
            match piece {
                Piece::Zero { len } => out.resize(out.len() + len as usize, 0),
                Piece::Data {
                    layer,
                    moffset,
                    len,
                } => {
                    self.layers[layer]
                        .read(blobs, moffset..moffset + len, &mut out)
                        .await?
                }
            }
        }
        Ok(out)
    }

    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>, FsError> {
        let size = self.size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stack
            .resolve(offset, len)
            .map_err(|source| FsError::StackLayers { source })
    }
}
