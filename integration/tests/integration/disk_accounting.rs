//! The disk a lazily pulled image costs, as kubelet sees it: a lazy layer's snapshot usage is
//! the bytes its blob holds in Shoal's chunk cache (`ctr snapshots usage`, and containerd's
//! CRI `ImageFsInfo` at its first look), and removing the image as kubelet's image GC does
//! (CRI `RemoveImage` by id) frees those bytes on disk.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::Snapshots;
use crate::cri::{Stack, BIG_FILE, BIG_FILE_BYTES, CRI_NAMESPACE};
use crate::fixture::{privileged, wait_until, Fixture};

/// containerd's CRI plugin measures snapshots every 10 s (`stats_collect_period`).
const CRI_SYNC: Duration = Duration::from_secs(40);

/// The daemon's usage of snapshot `name`, in bytes.
fn usage(stack: &Stack, name: &str) -> Result<u64> {
    let (size, _inodes) = Snapshots::connect(stack.daemon.socket())?
        .usage(name)
        .map_err(|status| anyhow::anyhow!("usage of {name}: {status}"))?;
    u64::try_from(size).context("negative usage")
}

/// The image filesystem CRI reports to kubelet: used bytes and mountpoint.
fn image_fs(stack: &Stack) -> Result<(u64, String)> {
    let filesystems = stack.cri.image_fs_info()?;
    let fs = filesystems
        .first()
        .context("ImageFsInfo lists no filesystem")?;
    let used = fs.used_bytes.as_ref().map_or(0, |used| used.value);
    let mountpoint = fs
        .fs_id
        .as_ref()
        .map(|id| id.mountpoint.clone())
        .unwrap_or_default();
    Ok((used, mountpoint))
}

/// Bytes the cache's data file of blob `digest` takes on disk (allocated, not its length:
/// the file is sparse).
fn cache_file_bytes(stack: &Stack, digest: &str) -> Result<u64> {
    let hex = digest
        .strip_prefix("sha256:")
        .context("not a sha256 digest")?;
    let path: PathBuf = stack.daemon.root().join(format!("cache/{hex}.data"));
    let meta = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
    Ok(meta.blocks() * 512)
}

#[test]
fn a_lazy_images_cached_bytes_are_its_usage_and_are_freed_with_the_image() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let reference = stack.push_estargz()?;
        let id = stack.pull_and_find(&reference)?;
        let image = stack.layers_of(&reference, &id)?;
        let (position, big) = image
            .layers
            .iter()
            .enumerate()
            .max_by_key(|(_, layer)| layer.size)
            .context("no layers")?;
        let chain = &image.chains[position];
        let pulled = usage(&stack, chain)?;
        anyhow::ensure!(
            pulled < big.size / 4,
            "the big layer's usage is {pulled} of {} bytes before anything read it",
            big.size
        );

        stack.ctd.ctr_in(
            CRI_NAMESPACE,
            &[
                "run",
                "--rm",
                "--snapshotter",
                "shoal",
                &reference,
                "read-big",
                "sh",
                "-c",
                &format!("cat {BIG_FILE} > /dev/null"),
            ],
        )?;
        // Whole blocks of the compressed layer: at least the file's incompressible bytes.
        let read = usage(&stack, chain)?;
        anyhow::ensure!(
            read >= BIG_FILE_BYTES as u64 && read <= big.size,
            "the big layer's usage is {read} bytes after reading its {BIG_FILE_BYTES}-byte file \
             (layer {} bytes)",
            big.size
        );
        let listed = stack.ctd.ctr_in(
            CRI_NAMESPACE,
            &["snapshots", "--snapshotter", "shoal", "usage", chain],
        )?;
        anyhow::ensure!(listed.contains("8.0 MiB"), "ctr snapshots usage: {listed}");
        anyhow::ensure!(
            cache_file_bytes(&stack, &big.digest)? >= read,
            "the cache file holds less than the usage says"
        );

        // CRI adds the snapshots' usage up for kubelet.
        let mut seen = (0, String::new());
        wait_until("ImageFsInfo to count the snapshots", CRI_SYNC, || {
            seen = image_fs(&stack)?;
            Ok(seen.0 > 0)
        })?;
        anyhow::ensure!(
            seen.1.ends_with("/io.containerd.snapshotter.v1.shoal"),
            "ImageFsInfo's mountpoint: {}",
            seen.1
        );

        // kubelet's image GC removes by id; the bytes go with the image.
        stack.cri.remove(&id)?;
        wait_until(
            "containerd to remove the big layer's snapshot",
            Duration::from_secs(60),
            || {
                let names = Snapshots::connect(stack.daemon.socket())?.list_names(&[])?;
                Ok(!names.contains(chain))
            },
        )?;
        let left = cache_file_bytes(&stack, &big.digest)?;
        anyhow::ensure!(
            left < 64 << 10,
            "{left} bytes of the removed layer are still cached"
        );
        wait_until("ImageFsInfo to drop the image", CRI_SYNC, || {
            Ok(image_fs(&stack)?.0 < seen.0)
        })?;
        Ok(())
    });
}
