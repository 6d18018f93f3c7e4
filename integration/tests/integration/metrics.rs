//! The metrics endpoint watched during a lazy run: `/metrics` is scraped between steps and its
//! counters must move exactly as the steps imply. Registry bytes appear with the first
//! container's reads, a second container reading the same file is served from the chunk cache
//! without a registry byte, every eStargz layer counts as a lazy mount, a plain image counts
//! its fallback, and `/status` lists the mounted layers with what the cache holds of each.
//! Per-layer read bytes add up to the totals, and the daemon's JSON log holds one line per
//! layer mounted and unmounted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::Snapshots;
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{self, Stack};

/// A data file large enough to span several 1 MiB cache blocks.
const DATA_BYTES: usize = 3 << 20;

/// One scrape of `/metrics`: series (name with labels) → value.
pub(crate) struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub(crate) fn take(address: SocketAddr) -> Result<Scrape> {
        let body = get(address, "/metrics")?;
        let mut series = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("malformed sample {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("malformed value in {line:?}"))?;
            series.insert(name.to_owned(), value);
        }
        Ok(Scrape(series))
    }

    /// The sample `name` (labels included), 0 when absent, as Prometheus treats a counter
    /// that has not been exported yet.
    pub(crate) fn value(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    fn registry_bytes(&self) -> f64 {
        self.value("shoal_read_bytes_total{source=\"registry\"}")
    }

    /// Bytes of blob `digest` read from `source`.
    fn layer_bytes(&self, digest: &str, source: &str) -> f64 {
        self.value(&format!(
            "shoal_layer_read_bytes_total{{digest=\"{digest}\",source=\"{source}\"}}"
        ))
    }

    /// Bytes read from `source`, summed over the per-layer series.
    fn layers_total(&self, source: &str) -> f64 {
        let suffix = format!(",source=\"{source}\"}}");
        self.0
            .iter()
            .filter(|(name, _)| {
                name.starts_with("shoal_layer_read_bytes_total{") && name.ends_with(&suffix)
            })
            .map(|(_, n)| n)
            .sum()
    }
}

/// Restarts the daemon with JSON logs. `[log]` comes before the settings `Stack::start`
/// takes, so it is set in the written configuration instead.
fn log_json(stack: &mut Stack) -> Result<()> {
    stack.daemon.stop()?;
    let config = stack.daemon.config().to_owned();
    let text = std::fs::read_to_string(&config)?;
    let table = "[log]\nlevel = \"debug\"\n";
    anyhow::ensure!(text.contains(table), "no {table:?} in {text}");
    let text = text.replacen(table, &format!("{table}format = \"json\"\n"), 1);
    std::fs::write(&config, text)?;
    stack.daemon.launch()?;
    stack.ctd.wait_for_snapshotter("shoal")
}

/// The daemon's JSON log events whose message is `message`; a log line naming the message
/// that is not JSON fails.
fn events(log: &str, message: &str) -> Result<Vec<serde_json::Value>> {
    let mut found = Vec::new();
    for line in log.lines().filter(|l| l.contains(message)) {
        let event: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("log line is not JSON: {line}"))?;
        if event["message"] == message {
            found.push(event);
        }
    }
    Ok(found)
}

/// One plain HTTP/1.1 GET that must answer 200, the body as text.
fn get(address: SocketAddr, path: &str) -> Result<String> {
    let (status, body) = get_answer(address, path)?;
    anyhow::ensure!(status == 200, "{path}: status {status}: {body}");
    Ok(body)
}

/// One plain HTTP/1.1 GET: the status code and the body as text.
pub(crate) fn get_answer(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("connect to metrics at {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write: the endpoint answers after its first read and closes.
    let request = format!("GET {path} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed response to {path}: {response:?}"))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line for {path}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Evicts the kernel's page cache, so that the second container's reads reach the FUSE layer
/// instead of pages the first one left behind.
pub(crate) fn drop_page_cache() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")
}

#[test]
fn counters_follow_a_lazy_run() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        // The settings land after an empty `[registry]` header; `[metrics]` and `[cache]`
        // are tables of their own there. No decoded-chunk memory: every read after the
        // first must come through the chunk cache, where it is counted.
        let settings = format!("[metrics]\naddress = \"{address}\"\n[cache]\nmemory = \"0B\"\n");
        let mut stack = Stack::start(fixture, &settings)?;
        log_json(&mut stack)?;
        let (layers, expected) = lazy::data_image(&[("blob", DATA_BYTES)])?;
        let published = stack.publish(fixture, "metrics", &layers)?;

        let idle = Scrape::take(address)?;
        assert_eq!(idle.registry_bytes(), 0.0, "registry bytes before any pull");
        assert_eq!(idle.value("shoal_lazy_layers_mounted_total"), 0.0);

        stack.rpull(&published.estargz)?;
        let pulled = Scrape::take(address)?;
        assert_eq!(
            pulled.value("shoal_lazy_layers_mounted_total"),
            published.layers.len() as f64,
            "every eStargz layer mounts lazily"
        );
        assert_eq!(
            pulled.value("shoal_lazy_layers_mounted"),
            published.layers.len() as f64,
            "the gauge counts what is mounted"
        );

        let first =
            lazy::sums(&stack.run(&published.estargz, "metrics-first", "sha256sum /data/blob")?);
        assert_eq!(first, expected, "the first container reads the right bytes");
        let after_first = Scrape::take(address)?;
        let registry_bytes = after_first.registry_bytes();
        assert!(
            registry_bytes >= DATA_BYTES as f64 / 2.0,
            "reading a {DATA_BYTES}-byte random file fetched only {registry_bytes} bytes"
        );
        let fetches = after_first.value("shoal_fetch_duration_seconds_count{source=\"registry\"}");
        assert!(fetches > 0.0, "registry fetches are timed");
        assert!(
            after_first.value("shoal_fuse_read_duration_seconds_count") > 0.0,
            "FUSE reads are timed"
        );
        assert_eq!(after_first.value("shoal_fetches_in_flight"), 0.0);
        let big = published
            .layers
            .iter()
            .max_by_key(|l| l.size)
            .context("an image without layers")?;
        assert!(
            after_first.layer_bytes(&big.digest, "registry") > 0.0,
            "no registry bytes counted for the data layer {}",
            big.digest
        );
        assert_eq!(
            after_first.layers_total("registry"),
            registry_bytes,
            "per-layer registry bytes add up to the total"
        );

        let status: serde_json::Value = serde_json::from_str(&get(address, "/status")?)?;
        let listed = status["layers"]
            .as_array()
            .context("/status without layers")?;
        for layer in &published.layers {
            let entry = listed
                .iter()
                .find(|l| l["digest"] == layer.digest.as_str())
                .with_context(|| format!("{} not listed in {listed:?}", layer.digest))?;
            assert_eq!(entry["size"], layer.size);
            assert!(entry["mounts"].as_u64() >= Some(1));
        }
        let cached: u64 = listed
            .iter()
            .filter_map(|l| l["cached_bytes"].as_u64())
            .sum();
        assert!(
            cached as f64 >= registry_bytes * 0.9,
            "layers show {cached} cached bytes after {registry_bytes} fetched"
        );
        assert!(status["cache_capacity"].as_u64() > Some(0));

        // The snapshots of lazy layers report what their blocks take on this node.
        let usage = stack
            .ctd
            .ctr(&["snapshots", "--snapshotter", "shoal", "usage"])?;
        let nonzero_layers = usage
            .lines()
            .filter(|line| line.starts_with("sha256:"))
            .filter(|line| {
                line.split_whitespace()
                    .nth(1)
                    .is_some_and(|size| size != "0.0")
            })
            .count();
        assert!(
            nonzero_layers >= 1,
            "no lazy layer snapshot reports a usage:\n{usage}"
        );
        let reads = status["layer_reads"]
            .as_array()
            .context("/status without layer_reads")?;
        let big_reads = reads
            .iter()
            .find(|l| l["digest"] == big.digest.as_str())
            .with_context(|| format!("{} not in layer_reads {reads:?}", big.digest))?;
        assert!(big_reads["bytes_from_registry"].as_u64() > Some(0));

        drop_page_cache()?;
        let second =
            lazy::sums(&stack.run(&published.estargz, "metrics-second", "sha256sum /data/blob")?);
        assert_eq!(second, expected);
        let after_second = Scrape::take(address)?;
        assert_eq!(
            after_second.registry_bytes(),
            registry_bytes,
            "the second container fetched nothing"
        );
        assert!(
            after_second.value("shoal_cache_hits_total")
                > after_first.value("shoal_cache_hits_total"),
            "the second container's reads hit the cache"
        );
        assert!(
            after_second.value("shoal_read_bytes_total{source=\"cache\"}")
                >= after_first.value("shoal_read_bytes_total{source=\"cache\"}")
                    + DATA_BYTES as f64 / 2.0
        );
        assert!(
            after_second.value("shoal_fetch_duration_seconds_count{source=\"cache\"}")
                > after_first.value("shoal_fetch_duration_seconds_count{source=\"cache\"}")
        );
        assert!(
            after_second.layer_bytes(&big.digest, "cache")
                >= after_first.layer_bytes(&big.digest, "cache") + DATA_BYTES as f64 / 2.0,
            "the second container's reads count as cache bytes of the data layer"
        );
        assert_eq!(
            after_second.layer_bytes(&big.digest, "registry"),
            after_first.layer_bytes(&big.digest, "registry")
        );

        // The image as umoci built it: gzip layers without a TOC, downloaded, not mounted.
        stack.rpull(&published.plain)?;
        let fell_back = Scrape::take(address)?;
        let fallbacks: f64 = fell_back
            .0
            .iter()
            .filter(|(name, _)| name.starts_with("shoal_lazy_fallbacks_total{"))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            fallbacks,
            published.layers.len() as f64,
            "each plain layer counts a fallback: {:?}",
            fell_back.0
        );
        assert_eq!(
            fell_back.value("shoal_lazy_layers_mounted_total"),
            published.layers.len() as f64,
            "a plain layer is not counted as mounted"
        );

        // Removing the image unmounts its lazy layers; each mount and unmount is one JSON
        // line naming the blob and the mountpoint.
        stack
            .ctd
            .ctr(&["images", "rm", "--sync", &published.estargz])?;
        let unmounted = |log: &str| -> Result<usize> { Ok(events(log, "layer unmounted")?.len()) };
        wait_until("the layers' unmount lines", Duration::from_secs(30), || {
            Ok(unmounted(&stack.daemon.log())? >= published.layers.len())
        })?;
        let log = stack.daemon.log();
        let mounted = events(&log, "layer mounted")?;
        let unmounted = events(&log, "layer unmounted")?;
        for layer in &published.layers {
            let of = |events: &[serde_json::Value]| -> Vec<String> {
                events
                    .iter()
                    .filter(|e| e["blob"] == layer.digest.as_str())
                    .map(|e| e["mountpoint"].as_str().unwrap_or_default().to_owned())
                    .collect()
            };
            let (mounts, unmounts) = (of(&mounted), of(&unmounted));
            assert_eq!(mounts.len(), 1, "{}: mounted {mounts:?}", layer.digest);
            assert!(!mounts[0].is_empty(), "{}: no mountpoint", layer.digest);
            assert_eq!(unmounts, mounts, "{} unmounted where mounted", layer.digest);
        }
        assert!(
            mounted.iter().all(|e| e["level"] == "INFO"),
            "lifecycle events log at info: {mounted:?}"
        );
        let removed = Scrape::take(address)?;
        assert_eq!(
            removed.value("shoal_lazy_layers_mounted"),
            0.0,
            "nothing is mounted once the image is removed"
        );
        assert_eq!(
            removed.value("shoal_lazy_layers_mounted_total"),
            published.layers.len() as f64,
            "the counter does not go down"
        );
        Ok(())
    });
}

/// The probes and the process metrics of an idle daemon, and `/ready` turning 503 while a
/// stop drains: what a supervisor and a Prometheus server see.
#[test]
fn probes_answer_and_ready_turns_off_while_a_stop_drains() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        let mut daemon =
            Daemon::configure_with(fixture, &format!("\n[metrics]\naddress = \"{address}\"\n"))?;
        daemon.launch()?;
        // The listener answers once start-up is done, before the socket is bound.
        wait_until("the metrics listener", Duration::from_secs(30), || {
            Ok(get_answer(address, "/health").is_ok())
        })?;
        assert_eq!(get_answer(address, "/health")?, (200, "ok\n".into()));
        assert_eq!(get_answer(address, "/ready")?, (200, "ready\n".into()));
        assert_eq!(get_answer(address, "/nowhere")?.0, 404);

        let scrape = Scrape::take(address)?;
        let build = scrape
            .0
            .keys()
            .find(|name| name.starts_with("shoal_build_info{"))
            .context("no shoal_build_info")?;
        anyhow::ensure!(
            build.contains("version=\"0.1.0\",commit=\""),
            "build info {build}"
        );
        anyhow::ensure!(scrape.value("process_resident_memory_bytes") > 1e6);
        anyhow::ensure!(scrape.value("process_open_fds") >= 3.0);
        anyhow::ensure!(scrape.value("process_max_fds") >= scrape.value("process_open_fds"));
        anyhow::ensure!(scrape.value("process_start_time_seconds") > 1.5e9);

        let status: serde_json::Value = serde_json::from_str(&get(address, "/status")?)?;
        let bounds = status["histogram_bounds_seconds"]
            .as_array()
            .context("no histogram bounds in /status")?;
        let counts = status["fuse_read_latency"]["counts"]
            .as_array()
            .context("no FUSE read histogram in /status")?;
        assert_eq!(
            bounds.len() + 1,
            counts.len(),
            "one count above every bound"
        );

        // A client that never reads its connection keeps the drain going until its deadline.
        let hung = Snapshots::connect_hung(daemon.socket())?;
        hung.prepare("held", "")?;
        daemon.signal(nix::sys::signal::Signal::SIGTERM)?;
        wait_until("/ready to say draining", Duration::from_secs(8), || {
            Ok(get_answer(address, "/ready")? == (503, "draining for a stop\n".into()))
        })?;
        assert_eq!(get_answer(address, "/health")?, (200, "ok\n".into()));
        let status = daemon.stop()?;
        anyhow::ensure!(status.success(), "exit status {status}");
        Ok(())
    })
}

/// The socket accepts connections only once the daemon serves them. containerd dials it as
/// soon as it exists: bound during start-up, a loaded machine left containerd waiting for the
/// HTTP/2 handshake until it timed out, and every Prepare failed for its reconnect back-off
/// (`timed out waiting for server handshake`). At the first instant the socket accepts, start-up
/// is over (the metrics listener, bound just before it, answers), and a containerd started then
/// prepares a snapshot at once.
#[test]
fn the_socket_accepts_only_once_the_daemon_serves() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        let mut daemon =
            Daemon::configure_with(fixture, &format!("\n[metrics]\naddress = \"{address}\"\n"))?;
        daemon.launch_starting()?;
        // Polled without pause: the first connection the socket accepts is the one that counts.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(daemon.socket()).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the socket never accepted a connection"
            );
            anyhow::ensure!(daemon.is_running()?, "the daemon exited: {}", daemon.log());
            std::thread::yield_now();
        }
        let ready = get_answer(address, "/ready")
            .context("the socket accepted a connection before start-up was over")?;
        assert_eq!(ready, (200, "ready\n".into()));

        let ctd = crate::containerd::Containerd::start(
            fixture,
            &crate::containerd::Options {
                shoal_socket: Some(daemon.socket().to_owned()),
                ..Default::default()
            },
        )?;
        ctd.ctr(&["snapshots", "--snapshotter", "shoal", "prepare", "first"])?;
        Ok(())
    })
}
