//! Decompressed ZFile blocks of one virtual disk kept in memory, bounded in bytes, least
//! recently used first out. The kernel's page cache keeps what it read of the disk file; this
//! keeps the blocks around recent reads, so a read that starts or ends inside a block the
//! previous read decoded does not fetch, check and decompress it again.

use parking_lot::Mutex;
use std::ops::Range;

use bytes::Bytes;
use lru::LruCache;

/// A block: its layer (0 = top) and its index in that layer's ZFile.
type BlockKey = (usize, u64);

pub(super) struct BlockMemory {
    inner: Mutex<Inner>,
}

struct Inner {
    blocks: LruCache<BlockKey, Bytes>,
    bytes: u64,
    cap: u64,
}

impl BlockMemory {
    /// Keeps at most `cap` bytes of decompressed blocks.
    pub(super) fn new(cap: u64) -> BlockMemory {
        BlockMemory {
            inner: Mutex::new(Inner {
                blocks: LruCache::unbounded(),
                bytes: 0,
                cap,
            }),
        }
    }

    /// Blocks `blocks` of `layer`, if every one of them is held.
    pub(super) fn get(&self, layer: usize, blocks: Range<u64>) -> Option<Vec<Bytes>> {
        let mut inner = self.lock();
        blocks
            .map(|index| inner.blocks.get(&(layer, index)).cloned())
            .collect()
    }

    /// Keeps `blocks`, consecutive blocks of `layer` from block `first`, evicting the least
    /// recently used beyond the cap. A block is its own allocation, so what is counted is
    /// what is held.
    pub(super) fn put(&self, layer: usize, first: u64, blocks: &[Bytes]) {
        let mut inner = self.lock();
        for (index, block) in (first..).zip(blocks) {
            let len = block.len() as u64;
            if len > inner.cap {
                continue;
            }
            if let Some(old) = inner.blocks.put((layer, index), block.clone()) {
                inner.bytes -= old.len() as u64;
            }
            inner.bytes += len;
            while inner.bytes > inner.cap {
                match inner.blocks.pop_lru() {
                    Some((_, evicted)) => inner.bytes -= evicted.len() as u64,
                    None => break,
                }
            }
        }
    }

    /// Forgets every block of `layer`: its blob's cached bytes were dropped as bad.
    pub(super) fn forget(&self, layer: usize) {
        let mut inner = self.lock();
        let held: Vec<BlockKey> = inner
            .blocks
            .iter()
            .map(|(key, _)| *key)
            .filter(|(at, _)| *at == layer)
            .collect();
        for key in held {
            if let Some(block) = inner.blocks.pop(&key) {
                inner.bytes -= block.len() as u64;
            }
        }
    }

    /// Decompressed bytes held.
    pub(super) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        // Every update leaves the state consistent, so a panic elsewhere does not poison it.
        self.inner.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn a_span_is_served_only_when_every_block_is_held() {
        let memory = BlockMemory::new(1 << 20);
        memory.put(0, 10, &[block(1, 4), block(2, 4)]);
        let got = memory.get(0, 10..12).unwrap();
        assert_eq!(got, vec![block(1, 4), block(2, 4)]);
        assert!(memory.get(0, 10..13).is_none(), "block 12 was never kept");
        assert!(memory.get(1, 10..11).is_none(), "another layer's block 10");
        assert!(memory.get(0, 5..5).unwrap().is_empty());
        assert_eq!(memory.bytes(), 8);
    }

    #[test]
    fn the_least_recently_used_blocks_go_first_and_the_cap_holds() {
        let memory = BlockMemory::new(12);
        memory.put(0, 0, &[block(0, 4), block(1, 4), block(2, 4)]);
        // Block 0 is used, so block 1 is now the least recently used.
        assert!(memory.get(0, 0..1).is_some());
        memory.put(0, 3, &[block(3, 4)]);
        assert_eq!(memory.bytes(), 12);
        assert!(memory.get(0, 1..2).is_none(), "block 1 was evicted");
        assert!(memory.get(0, 0..1).is_some());
        assert!(memory.get(0, 2..4).is_some());
        // Replacing a block counts it once.
        memory.put(0, 3, &[block(9, 4)]);
        assert_eq!(memory.bytes(), 12);
        assert_eq!(memory.get(0, 3..4).unwrap(), vec![block(9, 4)]);
    }

    #[test]
    fn a_layer_forgotten_keeps_no_block_and_counts_none() {
        let memory = BlockMemory::new(1 << 20);
        memory.put(0, 0, &[block(1, 100), block(2, 100)]);
        memory.put(1, 0, &[block(3, 100)]);
        memory.forget(0);
        assert!(memory.get(0, 0..1).is_none());
        assert!(memory.get(1, 0..1).is_some());
        assert_eq!(memory.bytes(), 100);
    }

    #[test]
    fn a_block_larger_than_the_cap_is_not_kept() {
        let memory = BlockMemory::new(8);
        memory.put(0, 0, &[block(1, 4)]);
        memory.put(0, 1, &[block(2, 9)]);
        assert!(memory.get(0, 1..2).is_none());
        assert_eq!(memory.get(0, 0..1).unwrap(), vec![block(1, 4)]);
        assert_eq!(memory.bytes(), 4);
    }
}
