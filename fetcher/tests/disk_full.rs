//! A cache on a full disk: reads are served from the registry without caching, and the
//! condition is logged once when it starts and once when it ends, not once per block. Its own
//! test binary, for it installs the process's one global log subscriber.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use support::{config, content, Reply, TestServer};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;

/// Log lines, as the daemon would print them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_with(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|line| line.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs of `size` on `dir`; `None` without the privilege to mount one.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "shoal-test"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then(|| Tmpfs(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "remount {} with size={size}",
            self.0.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_cache_disk_is_logged_once_and_reads_still_succeed() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .init();

    let data = Arc::new(content((BLOCKS * BLOCK) as usize));
    let served = data.clone();
    let server = TestServer::start(move |request| Reply::blob(request, &served)).await;
    let root = tempfile::tempdir().unwrap();
    // 64 KiB of disk under a cache allowed 1 MiB: it runs out of disk, not of capacity.
    let Some(disk) = Tmpfs::mount(&root.path().join("cache"), "64k") else {
        eprintln!("skipped: cannot mount a tmpfs");
        return;
    };
    let fetcher = Fetcher::new(&config(root.path(), 0, &[(&server.host(), "")])).unwrap();
    let blob = BlobRef::new(
        ImageRef::repository(&server.host(), "team/layer").unwrap(),
        Digest::of(&data),
        data.len() as u64,
    );

    for index in 0..BLOCKS {
        let range = index * BLOCK..(index + 1) * BLOCK;
        let bytes = fetcher.read(&blob, range.clone()).await.unwrap();
        assert_eq!(&bytes[..], &data[range.start as usize..range.end as usize]);
    }
    fetcher.settled().await;
    let usage = fetcher.cache().usage();
    assert!(usage.blocks > 0 && usage.blocks < BLOCKS, "{usage:?}");
    assert_eq!(
        usage.no_space_failures,
        BLOCKS - usage.blocks,
        "every block not stored is counted: {usage:?}"
    );
    let full = captured.lines_with("cache disk is full");
    assert_eq!(full.len(), 1, "one warning for the whole spell: {full:#?}");
    assert!(full[0].contains("WARN"), "{}", full[0]);
    for field in [
        "wanted_bytes=4096",
        "free_bytes=",
        "cache_bytes=",
        "cache_capacity=1048576",
    ] {
        assert!(full[0].contains(field), "{field} missing: {}", full[0]);
    }
    assert!(captured
        .lines_with("block fetched but not cached")
        .is_empty());

    // Room again: the next block is cached, and that is said once too.
    disk.resize("1m");
    let last = (BLOCKS - 1) * BLOCK..BLOCKS * BLOCK;
    fetcher.read(&blob, last.clone()).await.unwrap();
    fetcher.settled().await;
    assert!(fetcher.read_cached(&blob, last).is_some(), "cached again");
    let recovered = captured.lines_with("has space again");
    assert_eq!(recovered.len(), 1, "{recovered:#?}");
    assert_eq!(captured.lines_with("cache disk is full").len(), 1);
}
