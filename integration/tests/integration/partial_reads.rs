//! Cold reads move about what they read: a container reading a few small files that lie
//! between large ones in an eStargz layer makes the registry send little more than those
//! files' chunks for its reads (not the 1 MiB cache blocks around them), and the blocks it
//! touched are completed in the background afterwards, so that later reads (and peers) find
//! them whole.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{self, Stack};
use crate::metrics::Scrape;
use crate::tree;

/// The small files the container reads, each between two large files nobody reads.
const SMALL: usize = 6;
const SMALL_BYTES: usize = 3000;
const LARGE_BYTES: usize = 3 << 20;
/// What each file's read may move beyond 1.3x its chunk: the fetcher widens a read to 64 KiB
/// aligned (so neighbouring small files share a round trip), two such units when the chunk
/// crosses a boundary. A whole-block fetch moves 1 MiB.
const SLACK_PER_FILE: f64 = 128.0 * 1024.0;
const FILL_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_container_reading_small_files_between_large_ones_moves_about_what_it_reads() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        // No decoded-chunk memory, so a second read must find the chunk cache filled.
        let settings = format!("[metrics]\naddress = \"{address}\"\n[cache]\nmemory = \"0B\"\n");
        let stack = Stack::start(fixture, &settings)?;
        let mut data = vec![tree::dir("/data", 0o755)];
        let mut expected = BTreeMap::new();
        for index in 0..SMALL {
            data.push(tree::file(
                format!("/data/{index}-large"),
                lazy::random_bytes(LARGE_BYTES)?,
                0o644,
            ));
            let bytes = lazy::random_bytes(SMALL_BYTES)?;
            expected.insert(format!("/data/{index}-small"), lazy::sha256_hex(&bytes));
            // Named so that the layer (in name order) puts each between two large ones.
            data.push(tree::file(format!("/data/{index}-small"), bytes, 0o644));
        }
        let (mut layers, _) = lazy::data_image(&[])?;
        layers[1] = data;
        let published = stack.publish(fixture, "partial", &layers)?;
        stack.rpull(&published.estargz)?;
        let script = "sha256sum /data/*-small";

        // A first container brings busybox's pages into the cache; once its blocks are
        // filled, what the next one moves is its small files alone.
        stack.run(&published.estargz, "partial-warm", "true")?;
        wait_for_fills(address)?;
        stack.registry.proxy().reset();
        let before = Scrape::take(address)?;
        let sums = lazy::sums(&stack.run(&published.estargz, "partial-read", script)?);
        assert_eq!(sums, expected, "the container reads the right bytes");
        wait_for_fills(address)?;
        let after = Scrape::take(address)?;

        let sent = stack.registry.proxy().response_bytes_for("/blobs/") as f64;
        let filled = after.value("shoal_fill_bytes_total") - before.value("shoal_fill_bytes_total");
        // Every read waited for its own fetches; fills ran when reads were quiet, and
        // nothing waited for them.
        let read = sent - filled;
        let chunks = (SMALL * SMALL_BYTES) as f64;
        eprintln!(
            "registry sent {sent} bytes of blobs: {read} for reads of {chunks} bytes of files, \
             {filled} to fill the blocks they touched"
        );
        assert!(
            read <= 1.3 * chunks + SMALL as f64 * SLACK_PER_FILE,
            "reads of {chunks} bytes moved {read} bytes: {:#?}",
            stack.registry.proxy().stats()
        );
        // The touched blocks are whole now: the rest of each came in the background.
        assert!(
            filled >= (SMALL as f64 - 1.0) * 512.0 * 1024.0,
            "only {filled} bytes filled"
        );

        // A second container finds every byte cached: no registry request at all.
        stack.registry.proxy().reset();
        crate::metrics::drop_page_cache()?;
        let again = lazy::sums(&stack.run(&published.estargz, "partial-again", script)?);
        assert_eq!(again, expected);
        assert_eq!(stack.registry.proxy().response_bytes_for("/blobs/"), 0);
        Ok(())
    });
}

/// Waits until the daemon has no partly read block left to fill.
fn wait_for_fills(address: std::net::SocketAddr) -> Result<()> {
    wait_until("background fills", FILL_TIMEOUT, || {
        Ok(Scrape::take(address)?.value("shoal_fill_pending_blocks") == 0.0)
    })
}
