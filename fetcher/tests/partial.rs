//! Partial blocks through the `Fetcher`: a read moves the bytes it needs, not whole cache
//! blocks, and the background fill completes the blocks it touched.

mod support;

use std::path::Path;
use std::sync::Arc;

use shoal_config::Config;
use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use support::{content, Reply, TestServer};

const MIB: u64 = 1 << 20;

struct Setup {
    server: TestServer,
    dir: tempfile::TempDir,
    data: Arc<Vec<u8>>,
    blob: BlobRef,
}

impl Setup {
    async fn new(len: u64) -> Setup {
        let data = Arc::new(content(len as usize));
        let served = data.clone();
        let server = TestServer::start(move |request| Reply::blob(request, &served)).await;
        let blob = BlobRef::new(
            ImageRef::repository(&server.host(), "team/layer").unwrap(),
            Digest::of(&data),
            len,
        );
        Setup {
            server,
            dir: tempfile::tempdir().unwrap(),
            data,
            blob,
        }
    }

    fn fetcher(&self) -> Fetcher {
        Fetcher::new(&config(self.dir.path(), &self.server.host())).unwrap()
    }

    fn ranges(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .filter_map(|r| r.header("range").map(str::to_owned))
            .collect()
    }
}

/// The default 1 MiB cache blocks.
fn config(root: &Path, host: &str) -> Config {
    Config::parse(&format!(
        "root = \"{}\"\n[cache]\nblock_size = \"1MiB\"\ncapacity = \"64MiB\"\n[registry]\n\
         timeout_secs = 5\nretries = 0\ndocker_config = \"{}\"\n\
         [registry.hosts.\"{host}\"]\nplain_http = true\n",
        root.display(),
        root.join("docker-config.json").display()
    ))
    .unwrap()
}

#[tokio::test]
async fn a_small_read_in_an_uncached_block_moves_its_bytes_and_the_fill_the_rest() {
    let setup = Setup::new(3 * MIB).await;
    let fetcher = setup.fetcher();
    fetcher.cache().pin(&setup.blob.digest);
    let read = MIB + MIB / 2..MIB + MIB / 2 + 4096;
    let bytes = fetcher.read(&setup.blob, read.clone()).await.unwrap();
    assert_eq!(
        &bytes[..],
        &setup.data[read.start as usize..read.end as usize]
    );
    // The read waited for its 4 KiB widened to 64 KiB, not for the 1 MiB block around it.
    assert_eq!(
        setup.ranges(),
        vec![format!(
            "bytes={}-{}",
            read.start,
            read.start + (64 << 10) - 1
        )]
    );
    assert_eq!(fetcher.stats().bytes_from_registry, 64 << 10);

    // The rest of the block arrives in the background, each byte once: a request for
    // each side of what was read.
    fetcher.filled().await;
    assert_eq!(setup.server.count(), 3);
    let stats = fetcher.stats();
    assert_eq!(stats.bytes_filled, MIB - (64 << 10));
    assert_eq!(stats.bytes_from_registry, MIB);
    assert_eq!(fetcher.cache().usage().blocks, 1);

    // A second read elsewhere in the block is answered from the cache, no request made.
    let elsewhere = MIB + 10..MIB + 5_000;
    let cached = fetcher.read_cached(&setup.blob, elsewhere.clone()).unwrap();
    assert_eq!(
        &cached[..],
        &setup.data[elsewhere.start as usize..elsewhere.end as usize]
    );
    let again = fetcher.read(&setup.blob, MIB..2 * MIB).await.unwrap();
    assert_eq!(&again[..], &setup.data[MIB as usize..2 * MIB as usize]);
    assert_eq!(setup.server.count(), 3);
}

#[tokio::test]
async fn a_fill_fetches_only_the_gaps_of_a_block_read_in_large_parts() {
    let setup = Setup::new(2 * MIB).await;
    let fetcher = setup.fetcher();
    fetcher.cache().pin(&setup.blob.digest);
    let (first, second) = (100_000..300_000, 500_000..700_000);
    let (a, b) = tokio::join!(
        fetcher.read(&setup.blob, first.clone()),
        fetcher.read(&setup.blob, second.clone())
    );
    assert_eq!(&a.unwrap()[..], &setup.data[100_000..300_000]);
    assert_eq!(&b.unwrap()[..], &setup.data[500_000..700_000]);
    fetcher.filled().await;
    let mut fills = setup.ranges()[2..].to_vec();
    fills.sort();
    assert_eq!(
        fills,
        vec![
            "bytes=0-65535".to_owned(),
            "bytes=327680-458751".to_owned(),
            format!("bytes=720896-{}", MIB - 1)
        ]
    );
    assert_eq!(fetcher.stats().bytes_from_registry, MIB);
    let whole = fetcher.read_cached(&setup.blob, 0..MIB).unwrap();
    assert_eq!(&whole[..], &setup.data[..MIB as usize]);
    assert_eq!(fetcher.cache().usage().blocks, 1);
}

#[tokio::test]
async fn the_partial_blocks_of_a_blob_nobody_pins_are_dropped_not_filled() {
    let setup = Setup::new(2 * MIB).await;
    let fetcher = setup.fetcher();
    let read = 1_000..9_000;
    fetcher.read(&setup.blob, read.clone()).await.unwrap();
    fetcher.settled().await;
    assert!(fetcher.read_cached(&setup.blob, read.clone()).is_some());
    fetcher.filled().await;
    assert_eq!(setup.server.count(), 1, "no fill for an unmounted layer");
    assert!(fetcher.read_cached(&setup.blob, read).is_none());
    assert_eq!(fetcher.cache().partial_bytes(&setup.blob.digest), 0);
}
