//! The benchmark script in its tiny mode (one 8 MB workload, one cold run, overlayfs and Shoal
//! with eStargz and overlaybd, no shaping, a 16 MB FUSE read): the full benchmark is not a CI test, but its tooling is, so
//! that the published numbers stay reproducible. Checks the outputs are well formed: a CSV
//! with its header and a row per run, a Markdown table with a row per scenario, a real PNG.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::binary;
use crate::fixture::{privileged, Fixture};
use crate::process;

const BENCH_TIMEOUT: Duration = Duration::from_secs(240);
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const CSV_HEADER: &str = "workload,scenario,run,pull_s,create_s,ready_s,total_s,\
                          registry_bytes,peer_bytes,needed_bytes,limit_s,requests,\
                          daemon_cpu_s,daemon_peak_rss_mb";

#[test]
fn tiny_mode_writes_a_table_a_csv_and_a_chart() {
    privileged!();
    Fixture::run(|fixture| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/bench.py");
        let bin_dir = binary::cli()?
            .parent()
            .context("the CLI has no directory")?
            .to_owned();
        let out = fixture.path("results");
        let mut command = Command::new("/usr/bin/python3");
        command
            .arg(&script)
            .arg("--tiny")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--work")
            .arg(fixture.path("work"))
            .arg("--out")
            .arg(&out);
        let printed = process::run(&mut command, BENCH_TIMEOUT).context("bench.py --tiny")?;

        let csv = fs::read_to_string(out.join("bench.csv")).context("read bench.csv")?;
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        let scenarios: Vec<&str> = rows.iter().map(|r| r[1]).collect();
        // overlaybd runs too where `shoal convert --format overlaybd` exists.
        assert_eq!(
            scenarios[..2],
            ["overlayfs", "shoal"],
            "one run per scenario: {csv}"
        );
        assert!(scenarios.len() <= 3, "{csv}");
        for row in &rows {
            assert_eq!(row.len(), CSV_HEADER.split(',').count(), "{row:?}");
            let number = |i: usize| -> f64 { row[i].parse().unwrap_or(f64::NAN) };
            let (pull, create, ready, total) = (number(3), number(4), number(5), number(6));
            assert!(pull > 0.0 && create > 0.0 && ready > 0.0, "{row:?}");
            assert!((pull + create + ready - total).abs() < 0.01, "{row:?}");
            assert!(number(7) > 0.0, "registry bytes counted: {row:?}");
        }
        // The plain image moves all of its ~8 MB; Shoal only what `echo` reads.
        let bytes = |i: usize| -> f64 { rows[i][7].parse().unwrap_or(f64::NAN) };
        assert!(bytes(0) > 8e6, "{csv}");
        assert!(bytes(1) < bytes(0) / 2.0, "{csv}");
        // Requests counted for every run; the daemon's CPU and memory for Shoal's (overlayfs
        // has no daemon of its own).
        for row in &rows {
            assert!(row[11].parse::<u64>().is_ok_and(|n| n > 0), "{row:?}");
        }
        assert_eq!((rows[0][12], rows[0][13]), ("", ""), "{csv}");
        let usage = |i: usize| -> f64 { rows[1][i].parse().unwrap_or(f64::NAN) };
        assert!(
            usage(12) > 0.0 && usage(13) > 1.0,
            "shoal's CPU and RSS: {csv}"
        );

        let table = fs::read_to_string(out.join("bench.md")).context("read bench.md")?;
        assert!(
            table.contains("| workload | scenario | pull s |"),
            "{table}"
        );
        assert!(table.contains("| echo-large | overlayfs |"), "{table}");
        assert!(table.contains("| echo-large | shoal |"), "{table}");
        assert!(printed.contains("| echo-large | shoal |"), "{printed}");

        let png = fs::read(out.join("bench.png")).context("read bench.png")?;
        assert!(png.starts_with(PNG_MAGIC), "bench.png is not a PNG");
        assert!(png.len() > 1000);

        let fuse = fs::read_to_string(out.join("fuse-read.md")).context("read fuse-read.md")?;
        for pattern in ["| sequential 1 MiB |", "| random 4 KiB |"] {
            assert!(fuse.contains(pattern), "{fuse}");
        }
        Ok(())
    });
}
