//! The table of lazily mounted layers, for status: which blobs are mounted and how often, for
//! every format.

use parking_lot::Mutex;
use std::collections::BTreeMap;

use shoal_fetcher::{BlobRef, Digest, Verification};

/// A blob served by at least one mounted layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedBlob {
    pub digest: Digest,
    /// Compressed size of the blob.
    pub size: u64,
    /// The registry repository it was first mounted from (`host/name`).
    pub repository: String,
    /// Mounts serving it (one per snapshot that stacks it).
    pub mounts: u32,
    /// Served over a FUSE connection an earlier daemon left, taken over at this one's start.
    pub carried_over: bool,
    /// How its reads are verified, where the format lets that vary (overlaybd).
    pub verification: Option<Verification>,
}

#[derive(Debug, Default)]
pub(crate) struct MountTable {
    blobs: Mutex<BTreeMap<Digest, MountedBlob>>,
}

impl MountTable {
    /// One more mount serves `blob`, its reads verified as `verification` says (the latest
    /// mount's word: a changed `cache.block_size` can change it across restarts).
    pub fn add(&self, blob: &BlobRef, verification: Option<Verification>) {
        let mut blobs = self.blobs.lock();
        let entry = blobs
            .entry(blob.digest.clone())
            .or_insert_with(|| MountedBlob {
                digest: blob.digest.clone(),
                size: blob.size,
                repository: format!("{}/{}", blob.image.host(), blob.image.repository_name()),
                mounts: 0,
                carried_over: false,
                verification: None,
            });
        entry.mounts += 1;
        if verification.is_some() {
            entry.verification = verification;
        }
    }

    pub fn remove(&self, digest: &Digest) {
        let mut blobs = self.blobs.lock();
        if let Some(entry) = blobs.get_mut(digest) {
            entry.mounts = entry.mounts.saturating_sub(1);
            if entry.mounts == 0 {
                blobs.remove(digest);
            }
        }
    }

    pub fn list(&self) -> Vec<MountedBlob> {
        let blobs = self.blobs.lock();
        blobs.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_mounts_per_blob_and_forgets_unmounted_ones() {
        let table = MountTable::default();
        let digest = Digest::of(b"layer");
        let image = shoal_fetcher::ImageRef::repository("reg.example:5000", "team/app").unwrap();
        let blob = BlobRef::new(image, digest.clone(), 10);
        table.add(&blob, None);
        table.add(&blob, Some(Verification::PerBlock));
        assert_eq!(table.list()[0].mounts, 2);
        assert_eq!(table.list()[0].verification, Some(Verification::PerBlock));
        assert_eq!(table.list()[0].repository, "reg.example:5000/team/app");
        table.remove(&digest);
        assert_eq!(table.list()[0].mounts, 1);
        table.remove(&digest);
        assert!(table.list().is_empty());
        // Removing what is not there is a no-op, not an underflow.
        table.remove(&digest);
        assert!(table.list().is_empty());
    }
}
