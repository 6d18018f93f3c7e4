//! [`Shareable`]: the blocks this node may serve to its peers, and the blocks it got from
//! them that have yet to earn that.
//!
//! A block is shareable when this node fetched it from the registry, or got it from a peer
//! and every one of its bytes has since passed a check against hashes from a verified index
//! (an eStargz chunk digest, the TOC digest, an overlaybd block digest table, the blob's own
//! digest). Until then it serves this node's containers
//! once its chunks verify, but is never passed on, so bad bytes cannot spread; and its sender
//! is remembered, to be blamed if a check fails.
//!
//! A blob whose registry wanted a credential from this node is marked private, with that
//! registry's host: its blocks go only to peers that prove they may pull it
//! ([`gate`](super::gate)). Once private, a blob stays so while any of it is shared.
//!
//! The shareable set survives restarts in one small file beside the cache: a node that
//! restarts with a warm cache goes on sharing it, to whom it did before.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use lru::LruCache;
use tracing::warn;

use super::blockset::BlockSet;
use super::error::PeerError;
use super::held::HeldBlocks;
use super::member::PeerAddr;
use crate::cache::BlockKey;
use crate::digest::Digest;

/// Peer-sourced blocks remembered until verified (or blamed); the oldest are forgotten first
/// and then simply never shared.
const SOURCED_CAP: usize = 1 << 18;

pub struct Shareable {
    sets: Mutex<HashMap<Digest, SharedBlob>>,
    sourced: Mutex<LruCache<BlockKey, Sourced>>,
    /// Where the sets are kept across restarts; `None` keeps them in memory only.
    file: Option<PathBuf>,
    /// Whether the sets changed since they were last saved.
    dirty: AtomicBool,
    /// A save is writing the sets now.
    saving: AtomicBool,
}

/// Who may have a blob's shared blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Any peer: the registry served them to this node without a credential.
    Anyone,
    /// Peers that prove they may pull the blob from this registry (a host as references
    /// name it).
    PullersFrom(String),
}

/// The shared blocks of one blob, and the registry whose credentials they need, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SharedBlob {
    blocks: BlockSet,
    private: Option<String>,
}

/// A block that came from a peer: who sent it, which of its bytes (sorted, disjoint ranges
/// within the blob) checked out so far, and to whom it may go once they all have (decided
/// when it arrived, for this node's registry client may be replaced meanwhile).
struct Sourced {
    from: PeerAddr,
    verified: Vec<Range<u64>>,
    audience: Audience,
}

impl Shareable {
    /// The sets saved in `file` (none if it is absent or unreadable, which is logged: a node
    /// that cannot recall what it shared only shares less).
    pub fn open(file: Option<PathBuf>) -> Shareable {
        let sets = match &file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => parse(&text).unwrap_or_else(|| {
                    warn!(path = %path.display(), "ignoring a damaged shareable-blocks file");
                    HashMap::new()
                }),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(error) => {
                    warn!(path = %path.display(), %error, "cannot read the shareable-blocks file");
                    HashMap::new()
                }
            },
            None => HashMap::new(),
        };
        Shareable {
            sets: Mutex::new(sets),
            sourced: Mutex::new(LruCache::new(
                NonZeroUsize::new(SOURCED_CAP).unwrap_or(NonZeroUsize::MIN),
            )),
            file,
            dirty: AtomicBool::new(false),
            saving: AtomicBool::new(false),
        }
    }

    /// Makes `blocks` of `blob` shareable to `audience` (a blob private once stays so).
    pub fn add(&self, blob: &Digest, blocks: &BlockSet, audience: Audience) {
        let mut sets = self.sets.lock();
        let shared = sets.entry(blob.clone()).or_default();
        shared.blocks.merge(blocks);
        if let (None, Audience::PullersFrom(registry)) = (&shared.private, audience) {
            shared.private = Some(registry);
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Whether every block of `blocks` of `blob` is shareable, and to whom.
    pub fn contains_all(&self, blob: &Digest, blocks: Range<u64>) -> Option<Audience> {
        let sets = self.sets.lock();
        let shared = sets.get(blob)?;
        blocks
            .clone()
            .all(|index| shared.blocks.contains(index))
            .then(|| match &shared.private {
                None => Audience::Anyone,
                Some(registry) => Audience::PullersFrom(registry.clone()),
            })
    }

    /// To whom blocks of `blob` go, if this node shares any of it.
    pub fn audience(&self, blob: &Digest) -> Option<Audience> {
        let sets = self.sets.lock();
        let shared = sets.get(blob)?;
        Some(match &shared.private {
            None => Audience::Anyone,
            Some(registry) => Audience::PullersFrom(registry.clone()),
        })
    }

    /// Block `key` came from `from`, unverified; once verified it may go to `audience`.
    pub fn got_from_peer(&self, key: BlockKey, from: PeerAddr, audience: Audience) {
        self.sourced.lock().put(
            key,
            Sourced {
                from,
                verified: Vec::new(),
                audience,
            },
        );
    }

    /// Bytes `checked` of block `key`, which spans `block` of its blob, passed a check.
    /// When that completes the block, it is no longer tracked and the audience it arrived
    /// with is returned: the caller makes it shareable to them.
    pub fn checked(
        &self,
        key: &BlockKey,
        block: Range<u64>,
        checked: Range<u64>,
    ) -> Option<Audience> {
        let mut sourced = self.sourced.lock();
        if sourced.is_empty() {
            return None;
        }
        let entry = sourced.peek_mut(key)?;
        let part = checked.start.max(block.start)..checked.end.min(block.end);
        if part.is_empty() {
            return None;
        }
        cover(&mut entry.verified, part);
        if entry.verified.as_slice() == [block] {
            return sourced.pop(key).map(|entry| entry.audience);
        }
        None
    }

    /// Blocks `blocks` of `blob` failed a check: none of them is shared any longer, and the
    /// peers that sent any of them are returned to be blamed.
    pub fn reject(&self, blob: &Digest, blocks: Range<u64>) -> HashSet<PeerAddr> {
        self.reject_sent(blob, blocks)
            .into_iter()
            .map(|(_, peer)| peer)
            .collect()
    }

    /// As [`reject`](Self::reject), with each block a peer sent and its sender.
    pub fn reject_sent(&self, blob: &Digest, blocks: Range<u64>) -> Vec<(u64, PeerAddr)> {
        if let Some(shared) = self.sets.lock().get_mut(blob) {
            for index in blocks.clone() {
                shared.blocks.remove(index);
            }
            self.dirty.store(true, Ordering::Relaxed);
        }
        let mut sourced = self.sourced.lock();
        if sourced.is_empty() {
            return Vec::new();
        }
        blocks
            .filter_map(|index| {
                let entry = sourced.pop(&BlockKey::new(blob.clone(), index))?;
                Some((index, entry.from))
            })
            .collect()
    }

    /// Every blob's shareable blocks, less those the cache no longer holds (evicted, or
    /// dropped by a refetch), which stop being shareable too.
    pub fn retain_held(&self, held: &dyn HeldBlocks) -> Vec<(Digest, BlockSet)> {
        let mut sets = self.sets.lock();
        let before = sets.len();
        for (blob, shared) in sets.iter_mut() {
            let mut dropped = false;
            shared.blocks.retain(|index| {
                let kept = held.holds(&BlockKey::new(blob.clone(), index));
                dropped |= !kept;
                kept
            });
            if dropped {
                self.dirty.store(true, Ordering::Relaxed);
            }
        }
        sets.retain(|_, shared| !shared.blocks.is_empty());
        if sets.len() != before {
            self.dirty.store(true, Ordering::Relaxed);
        }
        sets.iter()
            .map(|(blob, shared)| (blob.clone(), shared.blocks.clone()))
            .collect()
    }

    /// Whether the sets changed since they were last saved (always false without a file).
    pub fn is_dirty(&self) -> bool {
        self.file.is_some() && self.dirty.load(Ordering::Relaxed)
    }

    /// Whether a restart now would forget some of the sets: they changed since the last save,
    /// or a save is writing them. `saving` is set before `dirty` is cleared and cleared after
    /// the file is in place, so this never reads saved while the write is in between.
    pub fn is_unsaved(&self) -> bool {
        self.file.is_some()
            && (self.dirty.load(Ordering::SeqCst) || self.saving.load(Ordering::SeqCst))
    }

    /// Writes the sets to their file if they changed since the last save (a new file, then
    /// renamed over the old one, so a crash leaves one or the other whole).
    pub fn save(&self) -> Result<(), PeerError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        self.saving.store(true, Ordering::SeqCst);
        let saved = self.write(path);
        self.saving.store(false, Ordering::SeqCst);
        saved
    }

    fn write(&self, path: &Path) -> Result<(), PeerError> {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let text = {
            let sets = self.sets.lock();
            let mut text = String::new();
            for (blob, shared) in sets.iter() {
                let _ = match &shared.private {
                    None => writeln!(text, "{blob} {}", shared.blocks.to_hex()),
                    Some(registry) => {
                        writeln!(text, "{blob} {} {registry}", shared.blocks.to_hex())
                    }
                };
            }
            text
        };
        let fresh = path.with_extension("new");
        let written = crate::private::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&fresh)
            .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
            .and_then(|()| std::fs::rename(&fresh, path));
        written.map_err(|source| {
            self.dirty.store(true, Ordering::SeqCst);
            PeerError::PersistShareable {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

/// Lines of `<digest> <block set hex>[ <registry of a private blob>]`; `None` if any line
/// is malformed.
fn parse(text: &str) -> Option<HashMap<Digest, SharedBlob>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace();
            let blob = Digest::parse(fields.next()?).ok()?;
            let blocks = BlockSet::from_hex(fields.next()?)?;
            let private = fields.next().map(str::to_owned);
            if fields.next().is_some() {
                return None;
            }
            Some((blob, SharedBlob { blocks, private }))
        })
        .collect()
}

/// Adds `part` to the sorted, disjoint `ranges`, merging what touches it.
fn cover(ranges: &mut Vec<Range<u64>>, part: Range<u64>) {
    let mut merged = part;
    ranges.retain(|range| {
        let touches = range.start <= merged.end && merged.start <= range.end;
        if touches {
            merged = merged.start.min(range.start)..merged.end.max(range.end);
        }
        !touches
    });
    let at = ranges.partition_point(|range| range.start < merged.start);
    ranges.insert(at, merged);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8) -> PeerAddr {
        format!("10.0.0.{i}:7420").parse().unwrap()
    }

    fn set(indices: &[u64]) -> BlockSet {
        let mut set = BlockSet::new();
        for &i in indices {
            set.insert(i);
        }
        set
    }

    #[test]
    fn ranges_merge_as_they_are_covered() {
        let mut ranges = Vec::new();
        cover(&mut ranges, 10..20);
        cover(&mut ranges, 30..40);
        assert_eq!(ranges, [10..20, 30..40]);
        cover(&mut ranges, 0..5);
        assert_eq!(ranges, [0..5, 10..20, 30..40]);
        cover(&mut ranges, 20..30);
        assert_eq!(ranges, [0..5, 10..40]);
        cover(&mut ranges, 3..12);
        assert_eq!((ranges.len(), ranges[0].clone()), (1, 0..40));
    }

    #[test]
    fn a_peer_block_is_shareable_only_once_all_its_bytes_checked_out() {
        let shareable = Shareable::open(None);
        let blob = Digest::of(b"blob");
        let key = BlockKey::new(blob.clone(), 1);
        let private = Audience::PullersFrom("reg.example".into());
        shareable.got_from_peer(key, peer(1), private.clone());
        // Block 1 spans 100..200; checks arrive in pieces, some reaching past it.
        assert!(shareable.checked(&key, 100..200, 50..120).is_none());
        assert!(shareable.checked(&key, 100..200, 150..250).is_none());
        let other = BlockKey::new(blob.clone(), 2);
        assert!(shareable.checked(&other, 200..300, 200..300).is_none());
        // Complete: shareable to whom it arrived for.
        assert_eq!(shareable.checked(&key, 100..200, 120..150), Some(private));
        // Done with: a later check changes nothing, and nobody is blamed for it.
        assert!(shareable.checked(&key, 100..200, 100..200).is_none());
        assert!(shareable.reject(&blob, 1..2).is_empty());
    }

    #[test]
    fn a_rejected_block_stops_being_shared_and_names_its_sender() {
        let shareable = Shareable::open(None);
        let blob = Digest::of(b"blob");
        shareable.add(&blob, &set(&[0, 1, 2]), Audience::Anyone);
        shareable.got_from_peer(BlockKey::new(blob.clone(), 3), peer(7), Audience::Anyone);
        assert!(shareable.contains_all(&blob, 0..3).is_some());
        let blamed = shareable.reject(&blob, 1..4);
        assert_eq!(blamed, HashSet::from([peer(7)]));
        assert!(shareable.contains_all(&blob, 0..1).is_some());
        assert!(shareable.contains_all(&blob, 0..2).is_none());
    }

    /// Holds exactly the blocks it is given.
    struct Holding(HashSet<BlockKey>);

    impl HeldBlocks for Holding {
        fn read(&self, _: &Digest, _: Range<u64>) -> Option<bytes::Bytes> {
            None
        }

        fn holds(&self, block: &BlockKey) -> bool {
            self.0.contains(block)
        }
    }

    #[test]
    fn blocks_no_longer_held_stop_being_shared() {
        let dir = tempfile::tempdir().unwrap();
        let shareable = Shareable::open(Some(dir.path().join("shareable")));
        let (kept, gone) = (Digest::of(b"kept"), Digest::of(b"gone"));
        shareable.add(&kept, &set(&[0, 1, 2]), Audience::Anyone);
        shareable.add(&gone, &set(&[4]), Audience::Anyone);
        shareable.save().unwrap();
        assert!(!shareable.is_dirty());
        // Block 1 of one blob was evicted, every block of the other.
        let held = Holding(HashSet::from([
            BlockKey::new(kept.clone(), 0),
            BlockKey::new(kept.clone(), 2),
        ]));
        let sets = shareable.retain_held(&held);
        assert_eq!(sets.len(), 1, "a blob with nothing held is not announced");
        assert_eq!(sets[0].0, kept);
        assert!(shareable.contains_all(&kept, 0..1).is_some());
        assert!(shareable.contains_all(&kept, 2..3).is_some());
        assert!(shareable.contains_all(&kept, 1..2).is_none());
        assert!(shareable.contains_all(&gone, 4..5).is_none());
        assert!(
            shareable.is_dirty(),
            "what is shared changed and must be saved"
        );
    }

    #[test]
    fn the_sets_survive_a_restart_and_a_damaged_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shareable");
        let blob = Digest::of(b"blob");
        let shareable = Shareable::open(Some(path.clone()));
        shareable.add(&blob, &set(&[0, 5, 700]), Audience::Anyone);
        let private = Digest::of(b"private");
        shareable.add(
            &private,
            &set(&[1]),
            Audience::PullersFrom("reg.example:5000".into()),
        );
        // Marked private once, a blob stays so whatever lands later.
        shareable.add(&private, &set(&[2]), Audience::Anyone);
        shareable.save().unwrap();
        let again = Shareable::open(Some(path.clone()));
        assert_eq!(again.contains_all(&blob, 5..6), Some(Audience::Anyone));
        assert!(again.contains_all(&blob, 700..701).is_some());
        assert!(again.contains_all(&blob, 1..2).is_none());
        assert_eq!(
            again.contains_all(&private, 1..3),
            Some(Audience::PullersFrom("reg.example:5000".to_owned()))
        );

        std::fs::write(&path, "sha256:nothex zz\n").unwrap();
        let damaged = Shareable::open(Some(path));
        assert!(damaged.contains_all(&blob, 0..1).is_none());
    }
}
