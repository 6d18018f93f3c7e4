//! What a pull tells its user: one line per layer and a summary, with a byte bar for the
//! layer being fetched when stdout is a terminal.

use std::fmt;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use shoal_config::ByteSize;
use shoal_fetcher::Digest;

use super::unpack::Outcome;

/// How one layer went.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// 1-based position, bottom layer first.
    pub position: usize,
    pub count: usize,
    pub digest: Digest,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// How the whole pull went.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The image name containerd now lists.
    pub image: String,
    /// The image's target: the index, or the manifest when there is no index.
    pub target: Digest,
    pub layers: Vec<LayerReport>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn count(&self, wanted: fn(&Outcome) -> bool) -> usize {
        self.layers.iter().filter(|l| wanted(&l.outcome)).count()
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|layer| match layer.outcome {
                Outcome::Applied { fetched } => fetched,
                Outcome::Lazy | Outcome::Present => 0,
            })
            .sum()
    }
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layer {}/{} {:?} ",
            self.position, self.count, self.digest
        )?;
        let elapsed = Seconds(self.elapsed);
        match self.outcome {
            Outcome::Present => write!(f, "already unpacked"),
            Outcome::Lazy => write!(f, "lazy in {elapsed}"),
            Outcome::Applied { fetched } => {
                write!(f, "fetched {}, applied in {elapsed}", ByteSize(fetched))
            }
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pulled {} ({:?}): {} layers, {} lazy, {} fetched and applied, {} already unpacked; \
             {} fetched in {}",
            self.image,
            self.target,
            self.layers.len(),
            self.count(|o| *o == Outcome::Lazy),
            self.count(|o| matches!(o, Outcome::Applied { .. })),
            self.count(|o| *o == Outcome::Present),
            ByteSize(self.fetched_bytes()),
            Seconds(self.elapsed),
        )
    }
}

/// Prints reports as plain lines, above a byte bar on a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new() -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress { bar }
    }

    /// A layer of `size` bytes is starting.
    pub fn start(&self, position: usize, count: usize, digest: &Digest, size: u64) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(size);
            bar.set_message(format!("layer {position}/{count} {digest:?}"));
        }
    }

    pub fn bytes(&self, count: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(count);
        }
    }

    pub fn line(&self, line: &dyn fmt::Display) {
        match &self.bar {
            Some(bar) => bar.println(line.to_string()),
            None => println!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

/// `40ms` below a second, `0.8s`-style above.
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < Duration::from_secs(1) {
            write!(f, "{}ms", self.0.as_millis())
        } else {
            write!(f, "{:.1}s", self.0.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome, millis: u64) -> LayerReport {
        LayerReport {
            position: 2,
            count: 3,
            digest: Digest::of(b""),
            outcome,
            elapsed: Duration::from_millis(millis),
        }
    }

    #[test]
    fn layer_lines_say_what_happened() {
        assert_eq!(
            report(Outcome::Lazy, 40).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… lazy in 40ms"
        );
        assert_eq!(
            report(Outcome::Applied { fetched: 3_250_586 }, 800).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… fetched 3.1 MiB, applied in 800ms"
        );
        assert_eq!(
            report(Outcome::Applied { fetched: 512 }, 1_250).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… fetched 512 B, applied in 1.2s"
        );
        assert_eq!(
            report(Outcome::Present, 1).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… already unpacked"
        );
    }

    #[test]
    fn summary_counts_outcomes_and_bytes() {
        let summary = Summary {
            image: "host/app:latest".to_owned(),
            target: Digest::of(b""),
            layers: vec![
                report(Outcome::Lazy, 1),
                report(Outcome::Applied { fetched: 2048 }, 1),
                report(Outcome::Applied { fetched: 1024 }, 1),
            ],
            elapsed: Duration::from_millis(2_500),
        };
        assert_eq!(summary.fetched_bytes(), 3072);
        assert_eq!(
            summary.to_string(),
            "pulled host/app:latest (sha256:e3b0c44298fc…): 3 layers, 1 lazy, 2 fetched and \
             applied, 0 already unpacked; 3.0 KiB fetched in 2.5s"
        );
    }
}
