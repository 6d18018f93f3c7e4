//! The cache's disk running full: reads go on (blocks are served without being cached), so
//! the condition is logged once when it starts, with the numbers, and once when it ends, and
//! counted in between, instead of one warning per block.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::error::CacheError;
use super::Written;

#[derive(Default)]
pub struct SpaceAlarm {
    /// The last store failed for lack of space, and none has succeeded since.
    full: AtomicBool,
    /// Blocks not stored for lack of space since start.
    failures: AtomicU64,
    /// Of those, the ones since the disk last ran full.
    current: AtomicU64,
}

impl SpaceAlarm {
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Notes how storing `wanted` bytes in `dir` went; `used` and `capacity` are the cache's
    /// own bytes and cap, for the log line.
    pub fn observe(
        &self,
        outcome: &Result<Written, CacheError>,
        dir: &Path,
        wanted: u64,
        used: u64,
        capacity: u64,
    ) {
        match outcome {
            Err(error) if error.is_no_space() => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.current.fetch_add(1, Ordering::Relaxed);
                if !self.full.swap(true, Ordering::Relaxed) {
                    let free = free_bytes(dir)
                        .map(|free| free.to_string())
                        .unwrap_or_else(|e| format!("unknown ({e})"));
                    tracing::warn!(
                        dir = %dir.display(),
                        wanted_bytes = wanted,
                        free_bytes = %free,
                        cache_bytes = used,
                        cache_capacity = capacity,
                        "cache disk is full: blocks are served without being cached until \
                         space frees up (logged once; counted in shoal_cache_no_space_total)"
                    );
                } else {
                    tracing::debug!(%error, "block not cached: no space");
                }
            }
            Ok(Written::Now) if self.full.swap(false, Ordering::Relaxed) => {
                let skipped = self.current.swap(0, Ordering::Relaxed);
                tracing::info!(
                    dir = %dir.display(),
                    skipped_blocks = skipped,
                    "cache disk has space again: blocks are cached again"
                );
            }
            _ => {}
        }
    }
}

/// Bytes an unprivileged writer could still put on the file system holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    #[allow(clippy::useless_conversion)] // The field types differ between targets.
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}
