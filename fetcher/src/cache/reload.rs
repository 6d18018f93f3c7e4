//! What an earlier run left in the cache directory: the blobs whose files add up, in the order
//! they were last written; everything torn, stale or of another block size is removed.

use std::io;
use std::path::Path;
use std::time::SystemTime;

use tracing::info;

use super::blob_file::BlobFile;
use super::error::CacheError;
use super::MAX_CACHED_BLOB_BYTES;
use crate::digest::Digest;

/// The blobs under `dir` with at least one present block, least recently written first.
pub fn load(dir: &Path, block_size: u64) -> Result<Vec<BlobFile>, CacheError> {
    let open_error = |source| CacheError::OpenCache {
        path: dir.to_owned(),
        source,
    };
    if let Some(had) = crate::private::dir(dir).map_err(open_error)? {
        info!(dir = %dir.display(), was = format!("{had:o}"), "cache directory narrowed to 0700");
    }
    let mut loaded = Vec::new();
    let mut data_files = Vec::new();
    let mut narrowed = 0u64;
    for dirent in std::fs::read_dir(dir).map_err(open_error)? {
        let dirent = dirent.map_err(open_error)?;
        let path = dirent.path();
        // Files an earlier version left readable by everyone (or already removed below,
        // with the torn blob they belonged to).
        if dirent.file_type().is_ok_and(|kind| kind.is_file()) {
            match crate::private::narrow(&path, crate::private::FILE_MODE) {
                Ok(Some(_)) => narrowed += 1,
                Ok(None) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(open_error(error)),
            }
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            remove_stale(&path);
        } else if let Some(digest) = digest_of(name, ".bitmap") {
            match BlobFile::open(dir, &digest, block_size, MAX_CACHED_BLOB_BYTES) {
                Ok(Some(blob)) if !blob.present().is_empty() => loaded.push(blob),
                Ok(_) => BlobFile::remove_files(dir, &digest),
                Err(source) => return Err(open_error(source)),
            }
        } else if let Some(digest) = digest_of(name, ".data") {
            data_files.push((digest, path));
        }
    }
    for (digest, path) in data_files {
        if !loaded.iter().any(|blob| blob.digest == digest) {
            remove_stale(&path);
        }
    }
    if narrowed > 0 {
        info!(dir = %dir.display(), files = narrowed, "cache files narrowed to 0600");
    }
    // Recency is not persisted; the data files' modification times approximate it.
    loaded.sort_by_key(|blob| {
        std::fs::metadata(blob.path())
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    });
    Ok(loaded)
}

/// `<64 hex>.<suffix>` names a blob's file.
fn digest_of(name: &str, suffix: &str) -> Option<Digest> {
    let hex = name.strip_suffix(suffix)?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

fn remove_stale(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        // Gone already (removed with its torn blob, or by an operator): nothing to do.
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot remove stale cache file")
        }
    }
}
