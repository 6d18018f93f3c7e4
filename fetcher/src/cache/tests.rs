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

#[test]
fn a_partial_block_serves_only_its_written_bytes_and_a_restart_forgets_it() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 3 * MIB;
    let cache = ChunkCache::open(dir.path(), MIB, 8 * MIB).unwrap();
    let middle = MIB + MIB / 2..MIB + MIB / 2 + 4096;
    cache
        .insert_extent(&blob, size, middle.clone(), &[5u8; 4096])
        .unwrap();
    assert_eq!(cache.read(&blob, middle.clone()).unwrap(), vec![5u8; 4096]);
    assert_eq!(
        cache
            .read(&blob, middle.start + 100..middle.end - 100)
            .unwrap(),
        vec![5u8; 3896]
    );
    // Nothing outside what was written: not a byte before or after, not the block.
    assert!(cache.read(&blob, middle.start - 1..middle.end).is_none());
    assert!(cache.read(&blob, middle.start..middle.end + 1).is_none());
    assert!(cache.read(&blob, MIB..2 * MIB).is_none());
    assert!(!cache.contains(&BlockKey::new(&blob, 1)));
    assert_eq!(cache.usage().blocks, 0);
    assert_eq!(
        cache.gaps(&blob, size, 1),
        vec![MIB..middle.start, middle.end..2 * MIB]
    );

    // An extent whose write fails is not readable.
    *cache.fault.lock() = Some(Step::WriteData);
    let other = 100..200;
    assert!(cache
        .insert_extent(&blob, size, other.clone(), &[6u8; 100])
        .is_err());
    *cache.fault.lock() = None;
    assert!(cache.read(&blob, other).is_none());
    drop(cache);

    // As after a crash: the bytes are in the data file, but nothing says they are valid.
    let cache = ChunkCache::open(dir.path(), MIB, 8 * MIB).unwrap();
    assert!(cache.read(&blob, middle.clone()).is_none());
    assert!(cache.read(&blob, MIB..2 * MIB).is_none());
    assert_eq!(cache.gaps(&blob, size, 1), vec![MIB..2 * MIB]);
    assert_eq!(cache.usage().blocks, 0);

    // A partial block becomes whole, and then present, by a store of all its bytes.
    cache
        .insert_extent(&blob, size, middle.clone(), &[5u8; 4096])
        .unwrap();
    cache
        .insert(&blob, size, 1, &vec![9u8; MIB as usize])
        .unwrap();
    assert!(cache.gaps(&blob, size, 1).is_empty());
    assert_eq!(cache.partial_bytes(&blob), 0);
    assert_eq!(cache.read(&blob, middle).unwrap(), vec![9u8; 4096]);
    assert_eq!(cache.usage().blocks, 1);
}

#[test]
fn invalidating_drops_partial_blocks_too() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 4 * BLOCK;
    let cache = open(dir.path());
    cache
        .insert_extent(&blob, size, 100..BLOCK + 100, &vec![3u8; BLOCK as usize])
        .unwrap();
    assert!(cache.read(&blob, 100..BLOCK + 100).is_some());
    cache.invalidate(&blob, 0..200).unwrap();
    assert!(cache.read(&blob, 100..200).is_none());
    // The partial block 1 was outside the range and stays.
    assert_eq!(cache.partial_bytes(&blob), 100);
    assert!(cache.read(&blob, BLOCK..BLOCK + 100).is_some());
}

#[test]
fn extents_of_one_block_written_side_by_side_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    let size = 4 * BLOCK;
    let cache = open(dir.path());
    let key = BlockKey::new(&blob, 0);
    // As while another read's extent of block 0 is being written: this one lands too (it
    // used to be skipped, and the fill then fetched its bytes a second time).
    *cache.state.lock().writing.entry(key).or_default() += 1;
    cache
        .insert_extent(&blob, size, 100..200, &[4u8; 100])
        .unwrap();
    assert_eq!(cache.read(&blob, 100..200).unwrap(), vec![4u8; 100]);
    assert_eq!(cache.state.lock().writing.get(&key), Some(&1));
    cache.state.lock().writing.remove(&key);

    // Many writers at once, each its own part: the block has no gap left but theirs.
    let parts: Vec<std::ops::Range<u64>> = (0..8).map(|i| i * 512..i * 512 + 256).collect();
    std::thread::scope(|scope| {
        for part in &parts {
            let (cache, blob) = (&cache, &blob);
            scope.spawn(move || {
                let len = (part.end - part.start) as usize;
                cache
                    .insert_extent(blob, size, part.clone(), &vec![7u8; len])
                    .unwrap();
            });
        }
    });
    let gaps = cache.gaps(&blob, size, 0);
    let expected: Vec<std::ops::Range<u64>> =
        (0..8).map(|i| i * 512 + 256..(i + 1) * 512).collect();
    assert_eq!(gaps, expected);
    assert!(cache.state.lock().writing.is_empty());

    // A store of the whole block after them makes it present, with its own bytes.
    cache.insert(&blob, size, 0, &block(9)).unwrap();
    assert_eq!(cache.read(&blob, 0..BLOCK).unwrap(), block(9));
    assert_eq!(cache.partial_bytes(&blob), 0);
}
