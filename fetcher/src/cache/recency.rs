//! Eviction order of cached blocks: least recently used first, pinned blobs' blocks last.

use lru::LruCache;

use super::BlockKey;

/// Present blocks with their lengths, in two LRU tiers.
pub struct Recency {
    unpinned: LruCache<BlockKey, u64>,
    pinned: LruCache<BlockKey, u64>,
}

impl Default for Recency {
    fn default() -> Recency {
        Recency::new()
    }
}

impl Recency {
    pub fn new() -> Recency {
        Recency {
            unpinned: LruCache::unbounded(),
            pinned: LruCache::unbounded(),
        }
    }

    pub fn insert(&mut self, key: BlockKey, len: u64, pinned: bool) {
        if pinned {
            self.pinned.put(key, len);
        } else {
            self.unpinned.put(key, len);
        }
    }

    /// Marks `key` as just used.
    pub fn touch(&mut self, key: &BlockKey) {
        if self.unpinned.get(key).is_none() {
            self.pinned.get(key);
        }
    }

    pub fn remove(&mut self, key: &BlockKey) -> Option<u64> {
        self.unpinned.pop(key).or_else(|| self.pinned.pop(key))
    }

    /// The block to evict next, without removing it.
    pub fn victim(&self) -> Option<(BlockKey, u64)> {
        self.unpinned
            .peek_lru()
            .or_else(|| self.pinned.peek_lru())
            .map(|(key, len)| (*key, *len))
    }

    /// Moves `keys` between the tiers, keeping their relative order.
    pub fn set_pinned(&mut self, keys: impl Iterator<Item = BlockKey>, pinned: bool) {
        let (from, to) = if pinned {
            (&mut self.unpinned, &mut self.pinned)
        } else {
            (&mut self.pinned, &mut self.unpinned)
        };
        for key in keys {
            if let Some(len) = from.pop(&key) {
                to.put(key, len);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.unpinned.len() + self.pinned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn key(blob: &Digest, index: u64) -> BlockKey {
        BlockKey::new(blob, index)
    }

    #[test]
    fn pinned_blocks_go_last() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut recency = Recency::new();
        recency.insert(key(&a, 0), 1, false);
        recency.insert(key(&b, 0), 1, false);
        recency.insert(key(&a, 1), 1, false);
        recency.touch(&key(&a, 0));
        assert_eq!(recency.victim().unwrap().0, key(&b, 0));
        recency.set_pinned([key(&b, 0)].into_iter(), true);
        assert_eq!(recency.victim().unwrap().0, key(&a, 1));
        recency.remove(&key(&a, 1));
        recency.remove(&key(&a, 0));
        assert_eq!(recency.victim().unwrap().0, key(&b, 0));
        assert_eq!(recency.len(), 1);
    }
}
