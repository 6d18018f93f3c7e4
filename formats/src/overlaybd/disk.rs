//! The merged virtual disk of a layer stack, readable at any byte range.

use super::lsmt::{LsmtError, LsmtFile};
use super::source::{BlockSource, SourceError};
use super::stack::{Piece, Stack, StackError};

/// Failure to assemble or read a virtual disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("failed to open layer {layer} (0 = top) as an lsmt file")]
    OpenLayer {
        layer: usize,
        #[source]
        source: LsmtError,
    },
    #[error("failed to stack the layers")]
    Stack(#[source] StackError),
    #[error("stack has {stack} layers but {readers} layer readers were given")]
    LayerCount { stack: usize, readers: usize },
    #[error("failed to read {len} bytes at {moffset} of layer {layer}")]
    ReadLayer {
        layer: usize,
        moffset: u64,
        len: u64,
        #[source]
        source: SourceError,
    },
}

/// A virtual disk over per-layer readers of (decompressed) LSMT files, top layer first.
#[derive(Debug)]
pub struct Disk<S> {
    stack: Stack,
    layers: Vec<S>,
}

impl<S: BlockSource> Disk<S> {
    /// Parses each layer's LSMT file and stacks them, top first.
    pub fn open(layers: Vec<S>) -> Result<Self, DiskError> {
        let files = layers
            .iter()
            .enumerate()
            .map(|(layer, source)| {
                LsmtFile::open(source).map_err(|source| DiskError::OpenLayer { layer, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&LsmtFile> = files.iter().collect();
        let stack = Stack::from_files(&refs).map_err(DiskError::Stack)?;
        Self::new(stack, layers)
    }

    /// Pairs a merged index with the layer readers it refers to.
    pub fn new(stack: Stack, layers: Vec<S>) -> Result<Self, DiskError> {
        if stack.layer_count() != layers.len() {
            return Err(DiskError::LayerCount {
                stack: stack.layer_count(),
                readers: layers.len(),
            });
        }
        Ok(Self { stack, layers })
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// Fills `buf` from virtual byte `offset`, reading each piece from its layer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let pieces = self
            .stack
            .resolve(offset, buf.len() as u64)
            .map_err(DiskError::Stack)?;
        let mut rest = buf;
        for piece in pieces {
            // Pieces sum to buf.len(), so each fits in what is left.
            let (head, tail) = rest.split_at_mut(piece.len() as usize);
            match piece {
                Piece::Zero { .. } => head.fill(0),
                Piece::Data {
                    layer,
                    moffset,
                    len,
                } => self.layers[layer]
                    .read_exact_at(moffset, head)
                    .map_err(|source| DiskError::ReadLayer {
                        layer,
                        moffset,
                        len,
                        source,
                    })?,
            }
            rest = tail;
        }
        Ok(())
    }
}

impl<S: BlockSource> BlockSource for Disk<S> {
    fn size(&self) -> u64 {
        self.stack.virtual_size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        self.read(offset, buf).map_err(|e| match e {
            DiskError::Stack(StackError::PastEnd {
                offset,
                len,
                virtual_size,
            }) => SourceError::OutOfRange {
                offset,
                len,
                size: virtual_size,
            },
            other => SourceError::Backend {
                offset,
                len,
                source: Box::new(other),
            },
        })
    }
}
