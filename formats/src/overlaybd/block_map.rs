//! The one map from virtual-disk bytes to ZFile blocks: virtual offset → LSMT piece (the
//! merged [`Stack`]) → the blocks of that layer's ZFile holding it ([`BlockSpan`]: compressed
//! range in the layer's blob, checked by CRC32C, decompressed, cut). Pure: a read is planned
//! here and executed by whoever holds the blob bytes; [`BlockMap::read_from`] is the reference
//! execution over [`BlockSource`]s, the FUSE virtual disk executes it through the fetcher.

use std::ops::Range;

use super::layer::Layer;
use super::source::{read_vec, BlockSource, SourceError};
use super::stack::{Piece, Stack, StackError};
use super::zfile::{BlockSpan, ZFile, ZFileError};

/// Failure to build a block map, plan a read or decode its blocks.
#[derive(Debug, thiserror::Error)]
pub enum BlockMapError {
    /// Transparent: the stack's error says what is wrong with the layer list.
    #[error(transparent)]
    Stack(StackError),
    #[error("plan a read of {len} bytes at {offset}")]
    Resolve {
        offset: u64,
        len: u64,
        #[source]
        source: StackError,
    },
    #[error("find the blocks of bytes {start}..{end} of layer {layer} (0 = top)")]
    Span {
        layer: usize,
        start: u64,
        end: u64,
        #[source]
        source: ZFileError,
    },
    #[error("decode blocks {first}..{end} of layer {layer} (0 = top)")]
    Decode {
        layer: usize,
        first: u64,
        end: u64,
        #[source]
        source: ZFileError,
    },
    #[error("layer {layer} is not in the stack")]
    NoLayer { layer: usize },
    #[error("{blobs} blobs were given for {layers} layers")]
    BlobCount { blobs: usize, layers: usize },
    #[error("read blocks {first}..{end} of layer {layer} (0 = top)")]
    ReadBlob {
        layer: usize,
        first: u64,
        end: u64,
        #[source]
        source: SourceError,
    },
}

/// One step of a planned read, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `len` bytes of zeros: no layer maps them, or one zeroed them.
    Zero { len: u64 },
    /// Bytes of layer `layer` (0 = top): read `span.compressed` of its blob, check and
    /// decompress the blocks ([`BlockMap::decode`]), keep `span.keep`.
    Blocks { layer: usize, span: BlockSpan },
}

impl Step {
    /// Bytes the step yields.
    pub fn len(&self) -> u64 {
        match self {
            Step::Zero { len } => *len,
            Step::Blocks { span, .. } => span.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A layer's ZFile as the block map needs it: placed in its blob.
#[derive(Debug, Clone)]
struct LayerBlocks {
    payload_offset: u64,
    zfile: ZFile,
}

/// The merged index of a layer stack with every layer's ZFile block map.
#[derive(Debug, Clone)]
pub struct BlockMap {
    stack: Stack,
    layers: Vec<LayerBlocks>,
}

impl BlockMap {
    /// Stacks `layers`, given top first (at most [`super::stack::MAX_LAYERS`]).
    pub fn new(layers: &[&Layer]) -> Result<BlockMap, BlockMapError> {
        let files: Vec<_> = layers.iter().map(|layer| layer.lsmt()).collect();
        let stack = Stack::from_files(&files).map_err(BlockMapError::Stack)?;
        let layers = layers
            .iter()
            .map(|layer| LayerBlocks {
                payload_offset: layer.payload_offset(),
                // Cheap: the jump table is shared, not copied.
                zfile: layer.zfile().clone(),
            })
            .collect();
        Ok(BlockMap { stack, layers })
    }

    /// Size of the virtual disk in bytes.
    pub fn size(&self) -> u64 {
        self.stack.virtual_size()
    }

    /// The merged index.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// How to serve virtual bytes `offset..offset + len`, which must lie on the disk.
    pub fn plan(&self, offset: u64, len: u64) -> Result<Vec<Step>, BlockMapError> {
        let pieces = self
            .stack
            .resolve(offset, len)
            .map_err(|source| BlockMapError::Resolve {
                offset,
                len,
                source,
            })?;
        pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Zero { len } => Ok(Step::Zero { len }),
                Piece::Data {
                    layer,
                    moffset,
                    len,
                } => {
                    let blocks = &self.layers[layer];
                    let range = moffset..moffset + len;
                    let span = blocks
                        .zfile
                        .span(range.clone())
                        .map_err(|source| BlockMapError::Span {
                            layer,
                            start: range.start,
                            end: range.end,
                            source,
                        })?
                        .shifted(blocks.payload_offset);
                    Ok(Step::Blocks { layer, span })
                }
            })
            .collect()
    }

    /// Checks and decompresses the blocks of a [`Step::Blocks`] out of `compressed`, the
    /// blob's bytes `span.compressed`: the blocks whole, concatenated.
    pub fn decode(
        &self,
        layer: usize,
        span: &BlockSpan,
        compressed: &[u8],
    ) -> Result<Vec<u8>, BlockMapError> {
        let blocks = self
            .layers
            .get(layer)
            .ok_or(BlockMapError::NoLayer { layer })?;
        blocks
            .zfile
            .decode_span(span, compressed)
            .map_err(|source| BlockMapError::Decode {
                layer,
                first: span.blocks.start,
                end: span.blocks.end,
                source,
            })
    }

    /// Uncompressed block size of layer `layer`'s ZFile.
    pub fn block_size(&self, layer: usize) -> Option<u32> {
        self.layers
            .get(layer)
            .map(|blocks| blocks.zfile.block_size())
    }

    /// The reference execution of a plan: fills `buf` from virtual byte `offset`, reading
    /// each layer's compressed blocks from `blobs` (the whole layer blobs, top first).
    pub fn read_from<S: BlockSource>(
        &self,
        blobs: &[S],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BlockMapError> {
        if blobs.len() != self.layers.len() {
            return Err(BlockMapError::BlobCount {
                blobs: blobs.len(),
                layers: self.layers.len(),
            });
        }
        let mut rest = buf;
        for step in self.plan(offset, rest.len() as u64)? {
            // Steps sum to the planned length, so each fits in what is left.
            let (head, tail) = rest.split_at_mut(step.len() as usize);
            match step {
                Step::Zero { .. } => head.fill(0),
                Step::Blocks { layer, span } => {
                    let Range { start, end } = span.compressed;
                    let compressed =
                        read_vec(&blobs[layer], start, end - start).map_err(|source| {
                            BlockMapError::ReadBlob {
                                layer,
                                first: span.blocks.start,
                                end: span.blocks.end,
                                source,
                            }
                        })?;
                    let blocks = self.decode(layer, &span, &compressed)?;
                    head.copy_from_slice(&blocks[span.keep]);
                }
            }
            rest = tail;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
