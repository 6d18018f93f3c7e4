//! Runs the peer protocol's simulation (`shoal_fetcher::peer::sim`) for clusters of the given
//! sizes starting one 300 MiB image together, and prints a Markdown table of what each took.
//!
//! Usage: `peer_sim [--seed N] [--out FILE] NODES...` (default 10 100 1000).

use std::io::Write as _;
use std::process::ExitCode;

use shoal_fetcher::peer::sim::{run, SimConfig, SimReport};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut seed = 1u64;
    let mut out = None;
    let mut sizes = Vec::new();
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--seed" => args.next().and_then(|s| s.parse().ok()).map(|s| seed = s),
            "--out" => args.next().map(|path| out = Some(path)),
            size => size.parse().ok().map(|n: usize| sizes.push(n)),
        };
        if parsed.is_none() {
            eprintln!("usage: peer_sim [--seed N] [--out FILE] NODES...");
            return ExitCode::from(2);
        }
    }
    if sizes.is_empty() {
        sizes = vec![10, 100, 1000];
    }
    let mut table = SimReport::table_header();
    let mut broken = false;
    let mut details = String::new();
    for nodes in sizes {
        let started = std::time::Instant::now();
        let report = run(&SimConfig::image_start(nodes, seed));
        let detail = format!(
            "{nodes} nodes: {} events, {:.1} s of virtual time, simulated in {:.1} s; \
             {} waits, {} fallbacks ({} after busy holders), {} busy answers, {} timeouts, {} renewals, {} owners, longest wait for an owner {:?}",
            report.events,
            report.span.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            report.waits,
            report.fallbacks,
            report.busy_expired,
            report.busy,
            report.timeouts,
            report.renewals,
            report.owners_used,
            report.owner_wait,
        );
        eprintln!("{detail}");
        details.push_str(&format!("- {detail}\n"));
        for violation in report.invariants.violations() {
            eprintln!("{nodes} nodes: INVARIANT BROKEN: {violation}");
            broken = true;
        }
        table.push_str(&report.table_row());
        print!("{}", report.table_row());
        let _ = std::io::stdout().flush();
    }
    println!("\n{table}");
    if let Some(path) = out {
        let text = format!("Seed {seed}.\n\n{table}\n{details}");
        if let Err(error) = std::fs::write(&path, text) {
            eprintln!("cannot write {path}: {error}");
            return ExitCode::FAILURE;
        }
    }
    if broken {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
