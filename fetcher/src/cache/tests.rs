//! Durability of the store path, through failures injected between its steps: whatever step
//! fails (as a crash there would stop it), the block is absent now and after reopening.

use super::*;

const BLOCK: u64 = 4096;

fn open(dir: &Path) -> ChunkCache {
    ChunkCache::open(dir, BLOCK, 64 * BLOCK).unwrap()
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; BLOCK as usize]
}

#[test]
fn a_block_is_never_present_before_its_bytes_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 4 * BLOCK;
    let cache = open(dir.path());
    for (index, step) in [(0, Step::WriteData), (1, Step::PersistPresence)] {
        *cache.fault.lock() = Some(step);
        assert!(
            cache.insert(&blob, size, index, &block(7)).is_err(),
            "{step:?}"
        );
        assert!(!cache.contains(&BlockKey::new(&blob, index)), "{step:?}");
        assert_eq!(cache.read(&blob, cache.geometry(size).span(index)), None);
    }
    *cache.fault.lock() = None;
    cache.insert(&blob, size, 2, &block(9)).unwrap();
    assert_eq!(cache.usage().blocks, 1);
    drop(cache);

    // As after a crash at each step: only the block whose every step ran is present.
    let cache = open(dir.path());
    let present: Vec<u64> = (0..4)
        .filter(|&index| cache.contains(&BlockKey::new(&blob, index)))
        .collect();
    assert_eq!(present, vec![2]);
    assert_eq!(
        cache.read(&blob, 2 * BLOCK..3 * BLOCK).as_deref(),
        Some(&block(9)[..])
    );
    // The failed blocks can be stored again.
    cache.insert(&blob, size, 1, &block(5)).unwrap();
    assert_eq!(
        cache.read(&blob, BLOCK..2 * BLOCK).as_deref(),
        Some(&block(5)[..])
    );
}

#[test]
fn hits_count_as_recent_use_when_a_victim_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 8 * BLOCK;
    let cache = ChunkCache::open(dir.path(), BLOCK, 3 * BLOCK).unwrap();
    for index in 0..3 {
        cache
            .insert(&blob, size, index, &block(index as u8))
            .unwrap();
    }
    // Block 0 is the oldest, but it is read; block 1 is then the least recently used.
    assert!(cache.read(&blob, 0..BLOCK).is_some());
    cache.insert(&blob, size, 3, &block(3)).unwrap();
    let present: Vec<u64> = (0..4)
        .filter(|&index| cache.contains(&BlockKey::new(&blob, index)))
        .collect();
    assert_eq!(present, vec![0, 2, 3]);
    assert_eq!(cache.usage().evictions, 1);
    drop(cache);
    let cache = ChunkCache::open(dir.path(), BLOCK, 3 * BLOCK).unwrap();
    assert!(
        !cache.contains(&BlockKey::new(&blob, 1)),
        "eviction is durable"
    );
    assert_eq!(cache.usage().blocks, 3);
}

#[test]
fn a_working_set_larger_than_the_cache_counts_its_refetches() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 8 * BLOCK;
    let cache = ChunkCache::open(dir.path(), BLOCK, 4 * BLOCK).unwrap();
    // Eight blocks read round and round through a cache of four: each one is evicted before
    // it comes back.
    for _ in 0..20 {
        for index in 0..8 {
            cache
                .insert(&blob, size, index, &block(index as u8))
                .unwrap();
        }
    }
    let usage = cache.usage();
    assert_eq!(usage.refetched_after_eviction, 20 * 8 - 8);
    assert_eq!(usage.evictions, 20 * 8 - 4);

    // A working set that fits is stored once and never counted.
    let fits = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(fits.path(), BLOCK, 8 * BLOCK).unwrap();
    for _ in 0..20 {
        for index in 0..8 {
            cache
                .insert(&blob, size, index, &block(index as u8))
                .unwrap();
        }
    }
    assert_eq!(cache.usage().refetched_after_eviction, 0);
}
