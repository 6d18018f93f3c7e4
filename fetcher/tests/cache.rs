//! The chunk cache on its own: eviction, pinning, durability rules, restarts.

use std::path::Path;

use shoal_fetcher::{BlockKey, CacheError, ChunkCache, Digest};

const BLOCK: u64 = 4096;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; BLOCK as usize]
}

fn open(dir: &Path, capacity_blocks: u64) -> ChunkCache {
    ChunkCache::open(dir, BLOCK, capacity_blocks * BLOCK).unwrap()
}

#[test]
fn evicts_least_recently_used_blocks_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 3);
    let blob = Digest::of(b"blob");
    let size = 10 * BLOCK;
    for index in 0..3 {
        cache
            .insert(&blob, size, index, &block(index as u8))
            .unwrap();
    }
    // Block 0 was used last, so block 1 is the least recent.
    assert!(cache.read(&blob, 0..BLOCK).is_some());
    cache.insert(&blob, size, 3, &block(3)).unwrap();

    let present = |index| cache.contains(&BlockKey::new(blob.clone(), index));
    assert_eq!(
        (0..4).map(present).collect::<Vec<_>>(),
        vec![true, false, true, true]
    );
    assert!(cache.read(&blob, BLOCK..2 * BLOCK).is_none());
    let usage = cache.usage();
    assert_eq!(
        (usage.bytes, usage.blocks, usage.capacity, usage.evictions),
        (3 * BLOCK, 3, 3 * BLOCK, 1)
    );

    // The evicted block's space is given back to the file system.
    let data = std::fs::metadata(dir.path().join(format!("{}.data", blob.hex()))).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert!(
        data.blocks() * 512 <= 3 * BLOCK + 4096,
        "{} sectors",
        data.blocks()
    );
}

#[test]
fn pinned_blobs_are_evicted_last() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 3);
    let (running, other) = (Digest::of(b"running"), Digest::of(b"other"));
    cache.pin(&running);
    cache.insert(&running, 4 * BLOCK, 0, &block(1)).unwrap();
    cache.insert(&running, 4 * BLOCK, 1, &block(2)).unwrap();
    cache.insert(&other, 4 * BLOCK, 0, &block(3)).unwrap();
    cache.insert(&other, 4 * BLOCK, 1, &block(4)).unwrap();
    cache.insert(&other, 4 * BLOCK, 2, &block(5)).unwrap();

    let present = |blob: &Digest, index| cache.contains(&BlockKey::new(blob.clone(), index));
    assert!(present(&running, 0) && present(&running, 1));
    assert!(!present(&other, 0) && !present(&other, 1) && present(&other, 2));

    // Unpinned blocks go first, even newer ones.
    cache.insert(&other, 4 * BLOCK, 3, &block(6)).unwrap();
    assert!(present(&running, 0) && present(&running, 1));
    assert!(!present(&other, 2) && present(&other, 3));

    // Unpinned blocks rejoin the ordinary order, as the most recently used.
    cache.unpin(&running);
    cache.insert(&other, 4 * BLOCK, 0, &block(7)).unwrap();
    assert!(!present(&other, 3));
    cache.insert(&other, 4 * BLOCK, 1, &block(8)).unwrap();
    assert!(!present(&running, 0) && present(&running, 1));
    assert_eq!(cache.usage().blocks, 3);
}

#[test]
fn pinned_blocks_go_when_nothing_else_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 2);
    let (pinned, other) = (Digest::of(b"pinned"), Digest::of(b"other"));
    cache.pin(&pinned);
    cache.pin(&pinned);
    cache.insert(&pinned, 2 * BLOCK, 0, &block(1)).unwrap();
    cache.insert(&pinned, 2 * BLOCK, 1, &block(2)).unwrap();
    cache.unpin(&pinned);
    // Still pinned once; a full cache of pinned blocks still accepts new ones.
    cache.insert(&other, BLOCK, 0, &block(3)).unwrap();
    assert!(!cache.contains(&BlockKey::new(pinned.clone(), 0)));
    assert!(cache.contains(&BlockKey::new(pinned.clone(), 1)));
    assert!(cache.contains(&BlockKey::new(other.clone(), 0)));
}

#[test]
fn reopening_reloads_blocks_and_drops_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    {
        let cache = open(dir.path(), 8);
        cache.insert(&blob, 2 * BLOCK + 10, 1, &block(9)).unwrap();
        cache.insert(&blob, 2 * BLOCK + 10, 2, &[7u8; 10]).unwrap();
    }
    // A torn bitmap (a crash while creating it) and a stray temporary file.
    let torn = Digest::of(b"torn");
    std::fs::write(
        dir.path().join(format!("{}.bitmap", torn.hex())),
        b"SHOALBM\0",
    )
    .unwrap();
    std::fs::write(dir.path().join(format!("{}.data", torn.hex())), b"junk").unwrap();
    std::fs::write(dir.path().join("x.bitmap.tmp"), b"partial").unwrap();

    let cache = open(dir.path(), 8);
    assert_eq!(cache.usage().blocks, 2);
    assert_eq!(cache.usage().bytes, BLOCK + 10);
    assert_eq!(cache.cached_bytes(&blob), BLOCK + 10);
    assert_eq!(cache.cached_bytes(&torn), 0);
    assert_eq!(cache.read(&blob, BLOCK..2 * BLOCK).unwrap(), block(9));
    assert_eq!(
        &cache.read(&blob, 2 * BLOCK..2 * BLOCK + 10).unwrap()[..],
        &[7u8; 10]
    );
    assert!(cache.read(&blob, 0..BLOCK).is_none());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("{}.bitmap", blob.hex()),
            format!("{}.data", blob.hex())
        ]
    );

    // A different block size makes the old blocks meaningless.
    let resized = ChunkCache::open(dir.path(), 2 * BLOCK, 8 * BLOCK).unwrap();
    assert_eq!(resized.usage().blocks, 0);
}

#[test]
fn reopening_with_a_smaller_capacity_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"blob");
    {
        let cache = open(dir.path(), 8);
        for index in 0..6 {
            cache.insert(&blob, 8 * BLOCK, index, &block(1)).unwrap();
        }
    }
    let cache = open(dir.path(), 2);
    assert_eq!((cache.usage().blocks, cache.usage().evictions), (2, 4));
}

#[test]
fn bad_inserts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 4);
    let blob = Digest::of(b"blob");
    assert!(matches!(
        cache.insert(&blob, 2 * BLOCK, 0, &[1u8; 100]),
        Err(CacheError::CacheBlockLength { .. })
    ));
    assert!(matches!(
        cache.insert(&blob, 2 * BLOCK, 5, &block(1)),
        Err(CacheError::CacheBlockLength { .. })
    ));
    assert!(matches!(
        cache.insert(&blob, 3 * BLOCK, 0, &block(1)),
        Err(CacheError::CacheBlobSize { .. })
    ));
    assert!(matches!(
        cache.insert(&Digest::of(b"huge"), u64::MAX, 0, &block(1)),
        Err(CacheError::BlobTooLarge { .. })
    ));
    assert_eq!(cache.usage().blocks, 0);
}

#[test]
fn invalidated_blocks_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 4);
    let blob = Digest::of(b"blob");
    for index in 0..3 {
        cache
            .insert(&blob, 3 * BLOCK, index, &block(index as u8))
            .unwrap();
    }
    cache.invalidate(&blob, BLOCK + 1..BLOCK + 2).unwrap();
    assert!(cache.read(&blob, 0..BLOCK).is_some());
    assert!(cache.read(&blob, BLOCK..2 * BLOCK).is_none());
    assert_eq!(cache.usage().blocks, 2);
    drop(cache);
    let cache = open(dir.path(), 4);
    assert!(
        cache.read(&blob, BLOCK..2 * BLOCK).is_none(),
        "the drop was durable"
    );
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_the_cache_consistent() {
    let dir = tempfile::tempdir().unwrap();
    // A 64 KiB file system; needs root, so the test is skipped without it.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "shoal-test"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs");
        return;
    }
    let _unmount = Tmpfs(dir.path().to_owned());
    let cache = open(dir.path(), 1024);
    let blob = Digest::of(b"blob");
    let size = 64 * BLOCK;
    let mut stored = 0;
    let error = loop {
        match cache.insert(&blob, size, stored, &block(stored as u8)) {
            Ok(()) => stored += 1,
            Err(error) => break error,
        }
        assert!(stored < 64, "a 64 KiB file system cannot hold 256 KiB");
    };
    assert!(matches!(error, CacheError::CacheNoSpace { .. }), "{error}");
    assert!(error.to_string().contains("no space left"), "{error}");
    assert!(stored > 0);
    assert_eq!(cache.usage().blocks, stored);
    assert!(!cache.contains(&BlockKey::new(blob.clone(), stored)));
    assert_eq!(cache.read(&blob, 0..BLOCK).unwrap(), block(0));
    drop(cache);
    let cache = open(dir.path(), 1024);
    assert_eq!(cache.usage().blocks, stored);
    assert!(cache
        .read(&blob, stored * BLOCK..(stored + 1) * BLOCK)
        .is_none());
}
