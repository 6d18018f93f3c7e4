//! [`BlockSet`]: which blocks of one blob a node holds, as a bitmap that travels in
//! announcements (hex, trailing zero bytes trimmed).

/// Blobs with more blocks than this are not shared (4 Ki words, a 128 KiB hex bitmap at most).
pub const MAX_SHARED_BLOCKS: u64 = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
}

impl BlockSet {
    pub fn new() -> BlockSet {
        BlockSet::default()
    }

    /// Adds block `index`; false (and nothing added) past [`MAX_SHARED_BLOCKS`].
    pub fn insert(&mut self, index: u64) -> bool {
        if index >= MAX_SHARED_BLOCKS {
            return false;
        }
        let word = (index / 64) as usize;
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (index % 64);
        true
    }

    pub fn remove(&mut self, index: u64) {
        if let Some(word) = self.words.get_mut((index / 64) as usize) {
            *word &= !(1 << (index % 64));
        }
    }

    pub fn contains(&self, index: u64) -> bool {
        self.words
            .get((index / 64) as usize)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Keeps only the blocks `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        for (at, word) in self.words.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                if !keep(at as u64 * 64 + bit) {
                    *word &= !(1 << bit);
                }
            }
        }
    }

    /// Bytes the set keeps on the heap, as the owner index counts them against its cap.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|word| *word == 0)
    }

    /// Adds every block of `other`.
    pub fn merge(&mut self, other: &BlockSet) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
    }

    /// Little-endian bytes as hex, without trailing zero bytes.
    pub fn to_hex(&self) -> String {
        let mut bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        hex::encode(bytes)
    }

    /// Parses [`to_hex`](Self::to_hex) output; `None` for bad hex or more than
    /// [`MAX_SHARED_BLOCKS`] blocks.
    pub fn from_hex(text: &str) -> Option<BlockSet> {
        if text.len() as u64 > MAX_SHARED_BLOCKS / 4 {
            return None;
        }
        let bytes = hex::decode(text).ok()?;
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect();
        Some(BlockSet { words })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(indices: &[u64]) -> BlockSet {
        let mut set = BlockSet::new();
        for &i in indices {
            assert!(set.insert(i));
        }
        set
    }

    #[test]
    fn merge_is_a_union() {
        let mut a = set(&[0, 3, 70]);
        a.merge(&set(&[3, 4, 200]));
        for i in [0, 3, 4, 70, 200] {
            assert!(a.contains(i), "{i}");
        }
        assert!(!a.contains(1) && !a.contains(199) && !a.contains(100_000));
        let mut empty = BlockSet::new();
        empty.merge(&a);
        assert_eq!(empty, a);
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_input() {
        let a = set(&[1, 63, 64, 129]);
        let text = a.to_hex();
        let back = BlockSet::from_hex(&text).unwrap();
        for i in 0..200 {
            assert_eq!(a.contains(i), back.contains(i), "{i}");
        }
        assert_eq!(BlockSet::new().to_hex(), "");
        assert!(BlockSet::from_hex("zz").is_none());
        assert!(BlockSet::from_hex(&"f".repeat(1 << 20)).is_none());
        assert!(!BlockSet::new().insert(MAX_SHARED_BLOCKS));
    }

    #[test]
    fn removal_clears_one_block() {
        let mut a = set(&[5, 6]);
        a.remove(5);
        a.remove(1000);
        assert!(!a.contains(5) && a.contains(6));
        a.remove(6);
        assert!(a.is_empty());
    }

    #[test]
    fn retain_keeps_only_the_chosen_blocks() {
        let mut a = set(&[1, 2, 64, 130]);
        a.retain(|i| i % 2 == 0);
        assert!(!a.contains(1) && a.contains(2) && a.contains(64) && a.contains(130));
        a.retain(|_| false);
        assert!(a.is_empty());
    }
}
