//! The standard `process_*` metrics of the daemon itself, read from `/proc/self`: what an
//! operator's dashboards expect of every Prometheus target.

use std::fmt::Write as _;

use nix::sys::resource::{getrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};

/// One reading of the daemon's process; a field is absent where `/proc` did not say.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Reads `/proc/self/stat`, `/proc/self/fd` and `/proc/stat` (for the boot time).
    pub fn now() -> ProcessSample {
        let ticks = sysconf(SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .map(|t| t as f64);
        let page = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        let mut sample = ProcessSample::from_stat(&stat, ticks, page, boot);
        sample.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as u64);
        sample.max_fds = getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        sample
    }

    /// The fields of a `/proc/<pid>/stat` line (see proc(5)); `ticks` is `CLK_TCK`, `page`
    /// the page size, `boot` the boot time in seconds since the epoch.
    fn from_stat(stat: &str, ticks: Option<f64>, page: u64, boot: Option<u64>) -> ProcessSample {
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // `fields[0]` is field 3 (state) of proc(5).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let cpu = field(14).zip(field(15)).map(|(user, system)| user + system);
        ProcessSample {
            cpu_seconds: cpu.zip(ticks).map(|(cpu, ticks)| cpu as f64 / ticks),
            resident_bytes: field(24).map(|pages| pages * page),
            virtual_bytes: field(23),
            threads: field(20),
            start_time_seconds: field(22)
                .zip(ticks)
                .zip(boot)
                .map(|((start, ticks), boot)| boot as f64 + start as f64 / ticks),
            open_fds: None,
            max_fds: None,
        }
    }

    /// Appends the Prometheus text of every field that was read.
    pub fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = writeln!(out, "# HELP process_{name} {help}");
                let _ = writeln!(out, "# TYPE process_{name} {kind}");
                let _ = writeln!(out, "process_{name} {value}");
            }
        };
        let int = |v: Option<u64>| v.map(|v| v.to_string());
        let float = |v: Option<f64>| v.map(|v| v.to_string());
        metric(
            "cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            float(self.cpu_seconds),
        );
        metric(
            "resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            int(self.resident_bytes),
        );
        metric(
            "virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            int(self.virtual_bytes),
        );
        metric(
            "open_fds",
            "gauge",
            "Number of open file descriptors.",
            int(self.open_fds),
        );
        metric(
            "max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            int(self.max_fds),
        );
        metric(
            "threads",
            "gauge",
            "Number of OS threads.",
            int(self.threads),
        );
        metric(
            "start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            float(self.start_time_seconds),
        );
    }
}

/// `btime` of `/proc/stat`: when the system booted, in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_has_spaces_and_parentheses() {
        // Fields 3.. of proc(5): utime is 14, stime 15, threads 20, starttime 22, vsize 23,
        // rss 24.
        let stat = "4242 (shoal (snap) er) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let sample = ProcessSample::from_stat(stat, Some(100.0), 4096, Some(1_700_000_000));
        assert_eq!(sample.cpu_seconds, Some(3.0));
        assert_eq!(sample.threads, Some(7));
        assert_eq!(sample.virtual_bytes, Some(123_456_789));
        assert_eq!(sample.resident_bytes, Some(300 * 4096));
        assert_eq!(sample.start_time_seconds, Some(1_700_000_010.0));
    }

    #[test]
    fn a_garbled_stat_line_gives_no_values_rather_than_wrong_ones() {
        let sample = ProcessSample::from_stat("garbage", Some(100.0), 4096, Some(1));
        assert_eq!(sample, ProcessSample::default());
        let mut out = String::new();
        sample.render(&mut out);
        assert!(out.is_empty(), "{out}");
    }

    #[test]
    fn reads_this_process() {
        let sample = ProcessSample::now();
        assert!(sample.resident_bytes.is_some_and(|rss| rss > 0));
        assert!(sample.open_fds.is_some_and(|fds| fds > 0));
        assert!(sample.threads.is_some_and(|threads| threads >= 1));
        let mut out = String::new();
        sample.render(&mut out);
        assert!(
            out.contains("# TYPE process_cpu_seconds_total counter"),
            "{out}"
        );
        assert!(out.contains("process_start_time_seconds "), "{out}");
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }
}
