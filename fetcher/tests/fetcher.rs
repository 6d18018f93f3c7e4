//! `Fetcher::read` end to end: cache, coalescing, single-flight, persistence, failures.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_fetcher::{BlobRef, Digest, FetchError, Fetcher, ImageRef};
use support::{config, content, Reply, Request, TestServer};

const BLOCK: u64 = 4096;

struct Setup {
    server: TestServer,
    dir: tempfile::TempDir,
    data: Arc<Vec<u8>>,
    blob: BlobRef,
}

impl Setup {
    async fn new(len: usize, delay: Duration) -> Setup {
        let data = Arc::new(content(len));
        let served = data.clone();
        let server =
            TestServer::start(move |request| Reply::blob(request, &served).delayed(delay)).await;
        Setup::with_server(server, data)
    }

    fn with_server(server: TestServer, data: Arc<Vec<u8>>) -> Setup {
        let blob = BlobRef::new(
            ImageRef::repository(&server.host(), "team/layer").unwrap(),
            Digest::of(&data),
            data.len() as u64,
        );
        Setup {
            server,
            dir: tempfile::tempdir().unwrap(),
            data,
            blob,
        }
    }

    fn fetcher(&self) -> Fetcher {
        Fetcher::new(&config(self.dir.path(), 0, &[(&self.server.host(), "")])).unwrap()
    }

    fn ranges(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .filter_map(|r| r.header("range").map(str::to_owned))
            .collect()
    }
}

#[tokio::test]
async fn reads_fetch_their_bytes_and_the_blocks_they_touch_are_filled_after() {
    let setup = Setup::new(10 * BLOCK as usize + 100, Duration::ZERO).await;
    let fetcher = setup.fetcher();
    // A mounted layer pins its blob; only such blobs' blocks are filled.
    fetcher.cache().pin(&setup.blob.digest);
    let range = 5_000..9_000;
    assert!(fetcher.read_cached(&setup.blob, range.clone()).is_none());

    let bytes = fetcher.read(&setup.blob, range.clone()).await.unwrap();
    assert_eq!(&bytes[..], &setup.data[5_000..9_000]);
    assert_eq!(
        setup.ranges(),
        vec!["bytes=4864-9215"],
        "just the bytes read, widened to a sixteenth of a block"
    );

    // Reads return before their bytes are cached; once they are, they are served from it.
    fetcher.settled().await;
    let cached = fetcher.read_cached(&setup.blob, range.clone()).unwrap();
    assert_eq!(cached, bytes);

    // The blocks the read touched (4096..12288) are completed in the background.
    // Only the bytes they lack, one block at a time.
    fetcher.filled().await;
    assert_eq!(setup.ranges()[1..], ["bytes=4096-4863", "bytes=9216-12287"]);
    let whole = fetcher.read(&setup.blob, 4_096..12_288).await.unwrap();
    assert_eq!(&whole[..], &setup.data[4_096..12_288]);
    assert_eq!(setup.server.count(), 3);
    assert_eq!(fetcher.cache().usage().blocks, 2);

    // The short last block.
    let tail = fetcher
        .read(&setup.blob, 10 * BLOCK - 10..10 * BLOCK + 100)
        .await
        .unwrap();
    assert_eq!(&tail[..], &setup.data[10 * BLOCK as usize - 10..]);
    assert_eq!(
        setup.ranges()[3],
        format!("bytes={}-{}", 10 * BLOCK - 256, 10 * BLOCK + 99)
    );

    fetcher.settled().await;
    fetcher.filled().await;
    assert_eq!(
        setup.ranges()[4],
        format!("bytes={}-{}", 9 * BLOCK, 10 * BLOCK - 257)
    );
    let stats = fetcher.stats();
    // Every byte of the three blocks touched came once.
    assert_eq!(stats.bytes_from_registry, 3 * BLOCK + 100);
    assert_eq!(stats.bytes_filled, 768 + 3_072 + 3_840);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(fetcher.cache().usage().blocks, 4);

    assert!(matches!(
        fetcher.read(&setup.blob, 0..10 * BLOCK + 101).await,
        Err(FetchError::RangeOutOfBounds { .. })
    ));
}

#[tokio::test]
async fn adjacent_missing_bytes_are_fetched_together_and_separate_ones_in_parallel() {
    let setup = Setup::new(16 * BLOCK as usize, Duration::ZERO).await;
    let fetcher = setup.fetcher();
    fetcher
        .read(&setup.blob, 2 * BLOCK..4 * BLOCK)
        .await
        .unwrap();
    fetcher.settled().await;
    let bytes = fetcher.read(&setup.blob, 100..8 * BLOCK).await.unwrap();
    assert_eq!(&bytes[..], &setup.data[100..8 * BLOCK as usize]);
    let mut ranges = setup.ranges();
    // The two stretches around the cached blocks 2-3 travel at the same time, in any order.
    ranges[1..].sort();
    assert_eq!(
        ranges,
        vec!["bytes=8192-16383", "bytes=0-8191", "bytes=16384-32767"],
    );
}

#[tokio::test]
async fn concurrent_readers_of_the_same_bytes_share_one_fetch() {
    let setup = Setup::new(4 * BLOCK as usize, Duration::from_millis(300)).await;
    let fetcher = setup.fetcher();
    let readers: Vec<_> = (0..12u64)
        .map(|_| {
            let fetcher = fetcher.clone();
            let blob = setup.blob.clone();
            tokio::spawn(async move { fetcher.read(&blob, BLOCK + 10..BLOCK + 110).await })
        })
        .collect();
    for reader in readers {
        let bytes = reader.await.unwrap().unwrap();
        let start = BLOCK as usize + 10;
        assert_eq!(&bytes[..], &setup.data[start..start + 100]);
    }
    assert_eq!(setup.server.count(), 1);
    assert_eq!(setup.ranges(), vec!["bytes=4096-4351"]);
}

#[tokio::test]
async fn the_cache_survives_a_restart() {
    let setup = Setup::new(8 * BLOCK as usize, Duration::ZERO).await;
    {
        let fetcher = setup.fetcher();
        fetcher.read(&setup.blob, 0..3 * BLOCK).await.unwrap();
        fetcher.settled().await;
    }
    let fetcher = setup.fetcher();
    let usage = fetcher.cache().usage();
    assert_eq!((usage.blocks, usage.bytes), (3, 3 * BLOCK));
    let bytes = fetcher.read_cached(&setup.blob, 10..3 * BLOCK).unwrap();
    assert_eq!(&bytes[..], &setup.data[10..3 * BLOCK as usize]);
    fetcher.read(&setup.blob, 0..3 * BLOCK).await.unwrap();
    assert_eq!(setup.server.count(), 1);
}

#[tokio::test]
async fn a_truncated_response_is_an_error_and_caches_nothing() {
    let data = Arc::new(content(8 * BLOCK as usize));
    let served = data.clone();
    let server = TestServer::start(move |request: &Request| {
        // Claims the asked range but sends, and declares, half of it.
        let mut reply = Reply::blob(request, &served);
        let half = reply.body.len() / 2;
        reply.body.truncate(half);
        reply
    })
    .await;
    let setup = Setup::with_server(server, data);
    let fetcher = setup.fetcher();
    let error = fetcher.read(&setup.blob, 0..2 * BLOCK).await.unwrap_err();
    assert!(error.to_string().contains("expected 8192"), "{error}");
    assert_eq!(fetcher.cache().usage().blocks, 0);
    assert!(fetcher.read_cached(&setup.blob, 0..BLOCK).is_none());
    assert_eq!(fetcher.stats().fetch_errors, 1);
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_an_error() {
    let data = Arc::new(content(4 * BLOCK as usize));
    let served = data.clone();
    let server = TestServer::start(move |request: &Request| {
        // Declares the whole block, then closes the connection after 100 bytes.
        let mut reply = Reply::blob(request, &served);
        reply.declared_length = Some(reply.body.len());
        reply.body.truncate(100);
        reply
    })
    .await;
    let setup = Setup::with_server(server, data);
    let fetcher = setup.fetcher();
    assert!(fetcher.read(&setup.blob, 0..BLOCK).await.is_err());
    assert_eq!(fetcher.cache().usage().blocks, 0);
}

#[tokio::test]
async fn a_read_right_after_a_failed_one_is_one_attempt_not_a_second_deadline() {
    // The kernel meets the failed readahead with a read of its own, which must not wait out
    // a second deadline: it gets one attempt, not `retries + 1`.
    let data = Arc::new(content(4 * BLOCK as usize));
    let served = data.clone();
    let server =
        TestServer::start(move |request: &Request| Reply::blob(request, &served).stalling_body())
            .await;
    let setup = Setup::with_server(server, data);
    let mut config = config(setup.dir.path(), 1, &[(&setup.server.host(), "")]);
    config.registry.deadline = Duration::from_secs(30);
    let fetcher = Fetcher::new(&config).unwrap();
    let first = fetcher.read(&setup.blob, 0..BLOCK).await.unwrap_err();
    assert!(first.to_string().contains("timed out"), "{first}");
    assert_eq!(setup.server.count(), 2, "retries + 1 attempts");
    let again = fetcher.read(&setup.blob, 100..200).await.unwrap_err();
    assert!(again.to_string().contains("timed out"), "{again}");
    assert_eq!(setup.server.count(), 3, "the second read made one attempt");
    assert_eq!(fetcher.cache().usage().blocks, 0);
}

#[tokio::test]
async fn a_read_right_after_the_registry_recovers_succeeds() {
    // While the registry stalls, a read fails; the moment it answers again, the next read of
    // the same block (however soon) gets the bytes, not the remembered failure.
    let data = Arc::new(content(4 * BLOCK as usize));
    let served = data.clone();
    let healed = Arc::new(AtomicBool::new(false));
    let healed_in_server = healed.clone();
    let server = TestServer::start(move |request: &Request| {
        let reply = Reply::blob(request, &served);
        if healed_in_server.load(Ordering::SeqCst) {
            reply
        } else {
            reply.stalling_body()
        }
    })
    .await;
    let setup = Setup::with_server(server, data);
    let fetcher =
        Fetcher::new(&config(setup.dir.path(), 0, &[(&setup.server.host(), "")])).unwrap();
    let failed = fetcher.read(&setup.blob, 0..BLOCK).await.unwrap_err();
    assert!(failed.to_string().contains("timed out"), "{failed}");
    healed.store(true, Ordering::SeqCst);
    let bytes = fetcher.read(&setup.blob, 100..200).await.unwrap();
    assert_eq!(&bytes[..], &setup.data[100..200]);
    assert_eq!(setup.server.count(), 2);
    fetcher.settled().await;
    assert!(fetcher.read_cached(&setup.blob, 100..200).is_some());
}

#[tokio::test]
async fn refetch_replaces_cached_blocks() {
    let good = Arc::new(content(4 * BLOCK as usize));
    let mut bad = good.to_vec();
    bad[BLOCK as usize + 1] ^= 0xff;
    let bad = Arc::new(bad);
    let tampering = Arc::new(AtomicBool::new(true));
    let (served_good, served_bad, tamper) = (good.clone(), bad.clone(), tampering.clone());
    let server = TestServer::start(move |request| {
        if tamper.load(Ordering::SeqCst) {
            Reply::blob(request, &served_bad)
        } else {
            Reply::blob(request, &served_good)
        }
    })
    .await;
    let setup = Setup::with_server(server, good.clone());
    let fetcher = setup.fetcher();
    let first = fetcher.read(&setup.blob, 0..2 * BLOCK).await.unwrap();
    assert_eq!(&first[..], &bad[..2 * BLOCK as usize]);

    tampering.store(false, Ordering::SeqCst);
    let second = fetcher
        .refetch(&setup.blob, BLOCK..BLOCK + 10)
        .await
        .unwrap();
    assert_eq!(&second[..], &good[BLOCK as usize..BLOCK as usize + 10]);
    assert_eq!(
        setup.ranges()[1],
        "bytes=4096-8191",
        "only the block under the range"
    );
    fetcher.settled().await;
    let cached = fetcher.read_cached(&setup.blob, 0..2 * BLOCK).unwrap();
    assert_eq!(&cached[..], &good[..2 * BLOCK as usize]);
}

#[tokio::test]
async fn prefetch_fills_the_cache() {
    let setup = Setup::new(20 * BLOCK as usize, Duration::ZERO).await;
    let fetcher = setup.fetcher();
    fetcher.prefetch(&setup.blob, 0..20 * BLOCK).await.unwrap();
    let bytes = fetcher.read_cached(&setup.blob, 0..20 * BLOCK).unwrap();
    assert_eq!(&bytes[..], &setup.data[..]);
    assert_eq!(setup.server.count(), 1);
}
