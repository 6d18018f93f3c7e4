//! The virtual disk of a layer stack: the [`BlockMap`] plans each read (zeros where no layer
//! maps anything, spans of ZFile blocks elsewhere), and this file executes the plan, from the
//! disk's memory of decoded blocks or through [`BlobRead`].

use bytes::Bytes;
use shoal_fetcher::BlobRead;
use shoal_formats::overlaybd::{BlockMap, BlockSpan, Stack, Step};

use super::memory::BlockMemory;
use super::{DiskLayer, FsType};
use crate::error::FsError;

/// Decompressed blocks a disk keeps in memory: the blocks around a few recent reads (the
/// kernel's page cache keeps the rest of what was read).
const MEMORY_BYTES: u64 = 4 << 20;

/// Layers of one image prefix stacked into a disk, top layer first.
pub struct VirtualDisk {
    layers: Vec<DiskLayer>,
    map: BlockMap,
    fs_type: FsType,
    memory: BlockMemory,
}

impl std::fmt::Debug for VirtualDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualDisk")
            .field("layers", &self.layers)
            .field("fs_type", &self.fs_type)
            .field("memory_bytes", &self.memory.bytes())
            .finish_non_exhaustive()
    }
}

impl VirtualDisk {
    /// Stacks `layers`, given top first (at most 255).
    pub fn new(layers: Vec<DiskLayer>, fs_type: FsType) -> Result<VirtualDisk, FsError> {
        let parsed: Vec<_> = layers.iter().map(DiskLayer::layer).collect();
        let map = BlockMap::new(&parsed).map_err(FsError::StackLayers)?;
        Ok(VirtualDisk {
            layers,
            map,
            fs_type,
            memory: BlockMemory::new(MEMORY_BYTES),
        })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.map.size()
    }

    pub fn fs_type(&self) -> FsType {
        self.fs_type
    }

    /// The merged index.
    pub fn stack(&self) -> &Stack {
        self.map.stack()
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[DiskLayer] {
        &self.layers
    }

    /// Forgets the decoded blocks of layer `at` (its blob failed its digest, and the blocks
    /// peers sent of it were dropped): later reads decode what the cache holds now.
    pub fn forget_decoded(&self, at: usize) {
        self.memory.forget(at);
    }

    /// Decompressed block bytes held in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.bytes()
    }

    /// Bytes `offset..offset + len`, clipped to the disk, if memory or the cache holds every
    /// block they need; `None` when something must be fetched. Never waits on the network.
    pub fn read_cached(&self, blobs: &dyn BlobRead, offset: u64, len: u64) -> Option<Vec<u8>> {
        self.begin_read(blobs, offset, len).ok()
    }

    /// Bytes `offset..offset + len`, clipped to the disk, fetching what the cache lacks.
    pub async fn read(
        &self,
        blobs: &dyn BlobRead,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        match self.begin_read(blobs, offset, len) {
            Ok(bytes) => Ok(bytes),
            Err(pending) => self.finish_read(blobs, pending).await,
        }
    }

    /// Plans the read and serves it from memory and the cache as far as they go; never waits
    /// on the network. What is left travels as a [`PendingRead`] to
    /// [`finish_read`](Self::finish_read), so a miss is planned once and what was found is not
    /// looked for again.
    pub fn begin_read(
        &self,
        blobs: &dyn BlobRead,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, PendingRead> {
        self.begin_read_noting(blobs, offset, len, |_| {})
    }

    /// [`VirtualDisk::begin_read`], showing `planned` the read's plan first, so a caller that
    /// needs it (learned prefetch's recording) does not plan the read a second time.
    pub fn begin_read_noting(
        &self,
        blobs: &dyn BlobRead,
        offset: u64,
        len: u64,
        planned: impl FnOnce(&[Step]),
    ) -> Result<Vec<u8>, PendingRead> {
        let steps = self.plan(offset, len).map_err(|e| PendingRead(Err(e)))?;
        planned(&steps);
        let mut out = Vec::with_capacity(steps.iter().map(Step::len).sum::<u64>() as usize);
        for (at, step) in steps.iter().enumerate() {
            match step {
                Step::Zero { len } => out.resize(out.len() + *len as usize, 0),
                Step::Blocks { layer, span } => {
                    let found = self.memory.get(*layer, span.blocks.clone()).or_else(|| {
                        let whole = self.layers[*layer].cached_blocks(blobs, span)?;
                        Some(self.remember(*layer, span, &whole))
                    });
                    let Some(blocks) = found else {
                        return Err(PendingRead(Ok(Progress {
                            steps,
                            next: at,
                            out,
                        })));
                    };
                    keep(&blocks, span, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// Finishes a read [`begin_read`](Self::begin_read) left, fetching what the cache lacks.
    pub async fn finish_read(
        &self,
        blobs: &dyn BlobRead,
        pending: PendingRead,
    ) -> Result<Vec<u8>, FsError> {
        let Progress {
            steps,
            next,
            mut out,
        } = pending.0?;
        for step in &steps[next..] {
            match step {
                Step::Zero { len } => out.resize(out.len() + *len as usize, 0),
                Step::Blocks { layer, span } => {
                    let blocks = match self.memory.get(*layer, span.blocks.clone()) {
                        Some(blocks) => blocks,
                        None => {
                            let whole = self.layers[*layer].read_blocks(blobs, span).await?;
                            self.remember(*layer, span, &whole)
                        }
                    };
                    keep(&blocks, span, &mut out);
                }
            }
        }
        Ok(out)
    }

    pub(super) fn plan(&self, offset: u64, len: u64) -> Result<Vec<Step>, FsError> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        self.map.plan(offset, len).map_err(FsError::PlanRead)
    }

    /// Splits the decoded blocks of `span` (whole, concatenated) into blocks, and keeps them.
    fn remember(&self, layer: usize, span: &BlockSpan, whole: &Bytes) -> Vec<Bytes> {
        let size = self.map.block_size(layer).map_or(1, |size| size.max(1)) as usize;
        // Copies, so that a block kept in memory does not pin the rest of its span.
        let blocks: Vec<Bytes> = whole.chunks(size).map(Bytes::copy_from_slice).collect();
        self.memory.put(layer, span.blocks.start, &blocks);
        blocks
    }
}

/// A read [`VirtualDisk::begin_read`] could not finish from memory and the cache: the rest
/// of its plan with what it assembled so far, or why it could not be planned.
#[derive(Debug)]
pub struct PendingRead(Result<Progress, FsError>);

#[derive(Debug)]
struct Progress {
    steps: Vec<Step>,
    /// The first step not served yet.
    next: usize,
    out: Vec<u8>,
}

/// Appends the part of `blocks` (the span's blocks, in order) that `span.keep` asks for.
fn keep(blocks: &[Bytes], span: &BlockSpan, out: &mut Vec<u8>) {
    let mut at = 0;
    for block in blocks {
        let end = at + block.len();
        let (from, to) = (span.keep.start.max(at), span.keep.end.min(end));
        if from < to {
            out.extend_from_slice(&block[from - at..to - at]);
        }
        at = end;
    }
}
