//! `shoal bench` against a small eStargz image on a loopback registry, with the real
//! containerd, runc and shoal-snapshotter the bench starts itself: the table, the CSV and the
//! PNG it writes, and that neither a finished run nor a failed one leaves a namespace, a
//! mount, a process or a file of its own behind.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::binary;
use crate::convert::convert;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;
use crate::tree;

const BENCH_TIMEOUT: Duration = Duration::from_secs(180);
const CSV_HEADER: &str =
    "scenario,run,first_output_s,pull_s,bytes,requests,daemon_cpu_s,daemon_peak_rss_bytes";
/// Random, so incompressible: overlayfs moves all of it, a lazy start none of it.
const PAYLOAD: usize = 6 << 20;
const GREETING: &str = "hello from the bench image";

/// What one `shoal bench` printed.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// An eStargz image (busybox, a 6 MiB file its command never reads) whose command prints
/// [`GREETING`]; returns its reference.
fn push_image(fixture: &Fixture, registry: &Registry) -> Result<String> {
    let mut layer = image::busybox_layer()?;
    // xorshift64: bytes gzip cannot shrink, the same in every run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let payload: Vec<u8> = (0..PAYLOAD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    layer.extend([
        tree::file("/etc/greeting", format!("{GREETING}\n"), 0o644),
        tree::dir("/data", 0o755),
        tree::file("/data/payload", payload, 0o644),
    ]);
    let built = image::build(fixture, "bench", &[layer])?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image"]).arg(
        built
            .oci()
            .strip_prefix("oci:")
            .context("an oci: reference")?,
    );
    config.args(["--config.cmd", "/bin/cat", "--config.cmd", "/etc/greeting"]);
    process::run(&mut config, Duration::from_secs(60)).context("set the image's command")?;
    let reference = format!("{}/bench/app:esgz", registry.host());
    convert(fixture, &[], &built.oci(), &reference)?;
    Ok(reference)
}

fn bench(fixture: &Fixture, args: &[&str]) -> Result<Outcome> {
    let child = start_bench(fixture, args)?;
    finish_bench(fixture, child)
}

fn start_bench(fixture: &Fixture, args: &[&str]) -> Result<std::process::Child> {
    Command::new(binary::cli()?)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(fixture.path("bench.stdout"))?)
        .stderr(fs::File::create(fixture.path("bench.stderr"))?)
        .spawn()
        .context("start shoal bench")
}

fn finish_bench(fixture: &Fixture, mut child: std::process::Child) -> Result<Outcome> {
    let stdout_path = fixture.path("bench.stdout");
    let stderr_path = fixture.path("bench.stderr");
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "shoal bench did not end within {BENCH_TIMEOUT:?}:\n{}",
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Outcome {
        status,
        stdout: fs::read_to_string(&stdout_path)?,
        stderr: fs::read_to_string(&stderr_path)?,
    })
}

/// Nothing of the bench is left under `work`: no folder, no mount, no process naming it.
fn assert_nothing_left(work: &Path) -> Result<()> {
    let left: Vec<PathBuf> = fs::read_dir(work)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    assert!(left.is_empty(), "the bench left {left:?}");
    let prefix = work.to_string_lossy().into_owned();
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let mounted: Vec<&str> = mounts
        .lines()
        .filter(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|p| p.starts_with(&prefix))
        })
        .collect();
    assert!(mounted.is_empty(), "the bench left mounts: {mounted:?}");
    for entry in fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !text.contains(&prefix),
            "the bench left process {:?}: {text}",
            entry.file_name()
        );
    }
    Ok(())
}

/// Decodes a PNG (signature, chunk CRCs, zlib data, row filters): its width and height.
fn decode_png(png: &[u8]) -> Result<(u32, u32)> {
    anyhow::ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "no PNG signature");
    let mut at = 8;
    let (mut size, mut colour, mut data, mut ended) = (None, 0, Vec::new(), false);
    while at + 12 <= png.len() {
        let length = u32::from_be_bytes(png[at..at + 4].try_into()?) as usize;
        let kind = &png[at + 4..at + 8];
        let body = png.get(at + 8..at + 8 + length).context("a cut chunk")?;
        let stored = u32::from_be_bytes(png[at + 8 + length..at + 12 + length].try_into()?);
        let mut crc = flate2::Crc::new();
        crc.update(&png[at + 4..at + 8 + length]);
        anyhow::ensure!(crc.sum() == stored, "bad CRC on a {kind:?} chunk");
        match kind {
            b"IHDR" => {
                size = Some((
                    u32::from_be_bytes(body[0..4].try_into()?),
                    u32::from_be_bytes(body[4..8].try_into()?),
                ));
                anyhow::ensure!(body[8] == 8, "bit depth {}", body[8]);
                colour = body[9];
            }
            b"IDAT" => data.extend_from_slice(body),
            b"IEND" => ended = true,
            _ => {}
        }
        at += 12 + length;
    }
    anyhow::ensure!(ended, "no IEND");
    let (width, height) = size.context("no IHDR")?;
    let channels = match colour {
        2 => 3,
        6 => 4,
        other => bail!("colour type {other}"),
    };
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&data[..]).read_to_end(&mut raw)?;
    let stride = width as usize * channels + 1;
    anyhow::ensure!(raw.len() == stride * height as usize, "{} bytes", raw.len());
    anyhow::ensure!(raw.chunks(stride).all(|row| row[0] <= 4), "bad row filter");
    Ok((width, height))
}

#[test]
fn a_bench_prints_its_table_writes_csv_and_chart_and_leaves_nothing() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let reference = push_image(fixture, &registry)?;
        let work = fixture.mkdir("work")?;
        let out = fixture.path("results");
        let png = fixture.path("chart/bench.png");
        let outcome = bench(
            fixture,
            &[
                "--plain-http",
                "--runs",
                "2",
                "--work",
                &work.to_string_lossy(),
                "--out",
                &out.to_string_lossy(),
                "--png",
                &png.to_string_lossy(),
                &reference,
            ],
        )?;
        let Outcome {
            status,
            stdout,
            stderr,
        } = &outcome;
        assert!(status.success(), "{status}\n{stderr}");

        // The table: a header, then overlayfs and shoal with their medians.
        let rows: Vec<Vec<&str>> = stdout
            .lines()
            .skip(2)
            .map(|line| line.split('|').map(str::trim).collect())
            .collect();
        assert!(
            stdout.starts_with("| scenario | runs | first output s"),
            "{stdout}"
        );
        assert_eq!(rows.len(), 2, "{stdout}");
        assert_eq!((rows[0][1], rows[0][2]), ("overlayfs", "2"), "{stdout}");
        assert_eq!((rows[1][1], rows[1][2]), ("shoal", "2"), "{stdout}");
        let number = |row: usize, column: usize| -> f64 {
            let cell = rows[row][column].split(' ').next().unwrap_or("");
            cell.parse().unwrap_or(f64::NAN)
        };
        for row in 0..2 {
            assert!(number(row, 3) > 0.0, "first output: {stdout}");
            assert!(number(row, 7) > 0.0, "daemon CPU: {stdout}");
            assert!(number(row, 8) > 1.0, "daemon RSS: {stdout}");
        }
        assert!(
            number(0, 5) > PAYLOAD as f64 / 1e6,
            "overlayfs moves it all: {stdout}"
        );
        assert!(
            number(1, 5) < number(0, 5) / 2.0,
            "Shoal moves what cat reads: {stdout}"
        );
        // The image's own command ran.
        assert_eq!(stderr.matches(GREETING).count(), 4, "{stderr}");

        // The CSV: one row per scenario and run.
        let csv = fs::read_to_string(out.join("bench.csv"))?;
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        let runs: Vec<Vec<&str>> = lines.map(|line| line.split(',').collect()).collect();
        let mut seen: Vec<(&str, &str)> = runs.iter().map(|r| (r[0], r[1])).collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("overlayfs", "1"),
                ("overlayfs", "2"),
                ("shoal", "1"),
                ("shoal", "2")
            ],
            "{csv}"
        );
        for run in &runs {
            assert_eq!(run.len(), CSV_HEADER.split(',').count(), "{csv}");
            let value = |i: usize| run[i].parse::<f64>().unwrap_or(f64::NAN);
            assert!(
                value(2) > 0.0 && value(3) > 0.0 && value(2) >= value(3),
                "{csv}"
            );
            assert!(
                value(4) > 0.0 && value(5) >= 1.0,
                "bytes and requests: {csv}"
            );
            assert!(value(6) >= 0.0 && value(7) > 1e6, "CPU and RSS: {csv}");
        }

        // The chart: a PNG of the declared size where --png put it.
        let (width, height) = decode_png(&fs::read(&png)?)?;
        assert_eq!((width, height), (800, 400));
        assert!(!out.join("bench.png").exists());

        // Each run's namespace was emptied (containerd deletes only an empty namespace).
        let namespace = stderr
            .split_whitespace()
            .find(|word| word.starts_with("shoal-bench-"))
            .context("the namespace in the progress lines")?
            .trim_end_matches(',');
        let removed = format!("namespace {namespace} emptied and removed");
        assert_eq!(stderr.matches(&removed).count(), 4, "{stderr}");
        assert_nothing_left(&work)
    });
}

#[test]
fn a_bad_reference_fails_clearly_and_leaves_nothing() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let work = fixture.mkdir("work")?;
        let out = fixture.path("results");
        let missing = format!("{}/bench/absent:1.0", registry.host());
        let outcome = bench(
            fixture,
            &[
                "--plain-http",
                "--runs",
                "1",
                "--work",
                &work.to_string_lossy(),
                "--out",
                &out.to_string_lossy(),
                &missing,
            ],
        )?;
        assert!(!outcome.status.success(), "{}", outcome.stderr);
        assert!(
            outcome
                .stderr
                .contains(&format!("the pull of {missing} failed"))
                && outcome.stderr.contains("not found"),
            "{}",
            outcome.stderr
        );
        assert!(outcome.stdout.is_empty(), "{}", outcome.stdout);
        assert!(!out.exists(), "no results for a failed bench");
        assert_nothing_left(&work)?;

        let outcome = bench(
            fixture,
            &["--work", &work.to_string_lossy(), "Not A/Reference!"],
        )?;
        assert!(!outcome.status.success());
        assert!(
            outcome
                .stderr
                .starts_with("shoal: bad image reference \"Not A/Reference!\""),
            "{}",
            outcome.stderr
        );
        assert_nothing_left(&work)
    });
}

#[test]
fn an_interrupted_bench_cleans_up_and_fails() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let reference = push_image(fixture, &registry)?;
        let work = fixture.mkdir("work")?;
        let out = fixture.path("results");
        // A command that runs on without printing: the bench is waiting for its output.
        let child = start_bench(
            fixture,
            &[
                "--plain-http",
                "--work",
                &work.to_string_lossy(),
                "--out",
                &out.to_string_lossy(),
                &reference,
                "--",
                "sleep",
                "120",
            ],
        )?;
        let waiting = || {
            Ok(fs::read_to_string(fixture.path("bench.stderr"))
                .unwrap_or_default()
                .contains("starting the container"))
        };
        let waited =
            crate::fixture::wait_until("the bench to start the container", BENCH_TIMEOUT, waiting);
        // The container is being started or runs; SIGINT, as Ctrl-C sends it (also when the
        // wait failed, so that the bench ends).
        std::thread::sleep(Duration::from_millis(500));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let outcome = finish_bench(fixture, child)?;
        waited?;
        assert!(!outcome.status.success(), "{}", outcome.stderr);
        assert!(
            outcome.stderr.contains("overlayfs run 1/3: interrupted"),
            "{}",
            outcome.stderr
        );
        assert!(!out.exists(), "no results for an interrupted bench");
        assert_nothing_left(&work)
    });
}
