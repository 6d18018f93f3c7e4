//! What `shoal bench` measured: one [`Run`] per cold run, medians per scenario, the table
//! printed on stdout and the CSV (one row per run).

use std::fmt::Write as _;

/// One cold run of one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub scenario: String,
    /// 1-based.
    pub number: usize,
    /// From the start of the pull to the container's first output line.
    pub first_output_s: f64,
    /// The pull alone.
    pub pull_s: f64,
    /// Bytes the registry sent until the first output (headers included); none when the
    /// registry could not be relayed (HTTPS).
    pub bytes: Option<u64>,
    /// HTTP requests to the registry until the first output; none as for `bytes`.
    pub requests: Option<u64>,
    /// CPU seconds (user + system) of the daemon that did the scenario's snapshotting work;
    /// none when it is not the bench's own process (stargz-snapshotter).
    pub daemon_cpu_s: Option<f64>,
    /// That daemon's peak resident set (VmHWM), bytes.
    pub daemon_peak_rss: Option<u64>,
}

pub const CSV_HEADER: &str =
    "scenario,run,first_output_s,pull_s,bytes,requests,daemon_cpu_s,daemon_peak_rss_bytes";

/// The median of `values` (the mean of the middle two for an even count); none when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

/// Scenarios in the order they first ran, each with its runs.
pub fn by_scenario(runs: &[Run]) -> Vec<(&str, Vec<&Run>)> {
    let mut groups: Vec<(&str, Vec<&Run>)> = Vec::new();
    for run in runs {
        match groups.iter_mut().find(|(name, _)| *name == run.scenario) {
            Some((_, group)) => group.push(run),
            None => groups.push((&run.scenario, vec![run])),
        }
    }
    groups
}

/// The median of one optional column over `runs`; none when no run has it.
fn median_of(runs: &[&Run], column: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(|run| column(run)).collect();
    median(&values)
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The Markdown table: one row per scenario, every cell the median of its runs, the first
/// output's min–max beside its median.
pub fn render(runs: &[Run]) -> String {
    let mut out = String::from(
        "| scenario | runs | first output s (min–max) | pull s | MB moved | requests | \
         daemon CPU s | daemon peak RSS MB |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, group) in by_scenario(runs) {
        let first: Vec<f64> = group.iter().map(|run| run.first_output_s).collect();
        let min = first.iter().copied().fold(f64::INFINITY, f64::min);
        let max = first.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            out,
            "| {name} | {} | {} ({min:.2}–{max:.2}) | {} | {} | {} | {} | {} |",
            group.len(),
            cell(median(&first), 2),
            cell(median_of(&group, |r| Some(r.pull_s)), 2),
            cell(median_of(&group, |r| r.bytes.map(|b| b as f64 / 1e6)), 1),
            cell(median_of(&group, |r| r.requests.map(|n| n as f64)), 0),
            cell(median_of(&group, |r| r.daemon_cpu_s), 2),
            cell(
                median_of(&group, |r| r.daemon_peak_rss.map(|b| b as f64 / 1e6)),
                1
            ),
        );
    }
    out
}

/// The CSV: a header, then one row per run; a column a run lacks is empty.
pub fn csv(runs: &[Run]) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    let opt = |value: Option<String>| value.unwrap_or_default();
    for run in runs {
        let _ = writeln!(
            out,
            "{},{},{:.3},{:.3},{},{},{},{}",
            run.scenario,
            run.number,
            run.first_output_s,
            run.pull_s,
            opt(run.bytes.map(|v| v.to_string())),
            opt(run.requests.map(|v| v.to_string())),
            opt(run.daemon_cpu_s.map(|v| format!("{v:.3}"))),
            opt(run.daemon_peak_rss.map(|v| v.to_string())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, number: usize, first: f64, bytes: Option<u64>) -> Run {
        Run {
            scenario: scenario.to_owned(),
            number,
            first_output_s: first,
            pull_s: first / 2.0,
            bytes,
            requests: bytes.map(|_| 4),
            daemon_cpu_s: Some(0.5),
            daemon_peak_rss: Some(20_000_000),
        }
    }

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_and_of_an_even_one_the_mean_of_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn the_table_has_one_row_per_scenario_with_medians_in_first_run_order() {
        let runs = [
            run("overlayfs", 1, 3.0, Some(10_000_000)),
            run("shoal", 1, 1.0, Some(1_000_000)),
            run("overlayfs", 2, 5.0, Some(10_000_000)),
            run("shoal", 2, 0.5, Some(3_000_000)),
            run("overlayfs", 3, 4.0, Some(10_000_000)),
            run("shoal", 3, 0.8, Some(2_000_000)),
        ];
        let table = render(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("| scenario | runs | first output s"));
        assert_eq!(
            lines[2],
            "| overlayfs | 3 | 4.00 (3.00–5.00) | 2.00 | 10.0 | 4 | 0.50 | 20.0 |"
        );
        assert_eq!(
            lines[3],
            "| shoal | 3 | 0.80 (0.50–1.00) | 0.40 | 2.0 | 4 | 0.50 | 20.0 |"
        );
    }

    #[test]
    fn what_a_run_lacks_is_a_dash_in_the_table_and_empty_in_the_csv() {
        let mut stargz = run("stargz", 1, 2.0, None);
        stargz.daemon_cpu_s = None;
        stargz.daemon_peak_rss = None;
        let table = render(std::slice::from_ref(&stargz));
        assert!(
            table.contains("| stargz | 1 | 2.00 (2.00–2.00) | 1.00 | – | – | – | – |"),
            "{table}"
        );
        let csv = csv(&[stargz]);
        assert_eq!(csv, format!("{CSV_HEADER}\nstargz,1,2.000,1.000,,,,\n"));
    }

    #[test]
    fn the_csv_has_a_row_per_run_with_as_many_fields_as_the_header() {
        let runs = [
            run("overlayfs", 1, 3.25, Some(123)),
            run("shoal", 1, 1.5, Some(45)),
        ];
        let text = csv(&runs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines[1], "overlayfs,1,3.250,1.625,123,4,0.500,20000000");
        assert_eq!(lines[2], "shoal,1,1.500,0.750,45,4,0.500,20000000");
        for line in &lines {
            assert_eq!(line.split(',').count(), CSV_HEADER.split(',').count());
        }
    }
}
