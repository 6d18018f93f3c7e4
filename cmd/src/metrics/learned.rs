//! Learned prefetch in `/metrics`: traces recorded, replayed, rejected and ignored, and what
//! replays fetched ahead.

use std::fmt::Write as _;

use shoal_fuse::layer::LearnStats;

/// Writes the `shoal_learn_*` series.
pub fn render(out: &mut String, learn: &LearnStats) {
    let mut metric = |name: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP shoal_learn_{name} {help}");
        let _ = writeln!(out, "# TYPE shoal_learn_{name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "shoal_learn_{name}{labels} {value}");
        }
    };
    metric(
        "traces_total",
        "Learned-prefetch traces: recorded and kept, replayed (of which from a peer, from the registry), \
         rejected as damaged, ignored as another image's.",
        &[
            ("{outcome=\"recorded\"}", learn.recorded),
            ("{outcome=\"replayed\"}", learn.replayed),
            ("{outcome=\"from_peer\"}", learn.from_peers),
            ("{outcome=\"from_registry\"}", learn.from_registry),
            ("{outcome=\"rejected\"}", learn.rejected),
            ("{outcome=\"ignored\"}", learn.ignored),
        ],
    );
    metric(
        "prefetched_chunks_total",
        "Chunks replays fetched ahead, and those whose fetch failed.",
        &[
            ("{outcome=\"fetched\"}", learn.prefetched_chunks),
            ("{outcome=\"failed\"}", learn.prefetch_failed_chunks),
        ],
    );
    metric(
        "prefetched_bytes_total",
        "Compressed bytes of the chunks replays fetched ahead.",
        &[("", learn.prefetched_bytes)],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let mut out = String::new();
        let learn = LearnStats {
            replayed: 2,
            prefetched_bytes: 4096,
            ..LearnStats::default()
        };
        render(&mut out, &learn);
        assert!(
            out.contains("shoal_learn_traces_total{outcome=\"replayed\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("shoal_learn_prefetched_bytes_total 4096"),
            "{out}"
        );
    }
}
