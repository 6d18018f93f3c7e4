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
    /// `eStargz` or `overlaybd` when the layer's annotations say it could be mounted lazily.
    pub lazy_format: Option<&'static str>,
    pub elapsed: Duration,
}

impl LayerReport {
    /// A layer that could have been mounted lazily and was downloaded instead.
    pub fn downloaded_lazy_format(&self) -> bool {
        self.lazy_format.is_some() && matches!(self.outcome, Outcome::Applied { .. })
    }
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
                Outcome::Applied { fetched, .. } => fetched,
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
        match &self.outcome {
            Outcome::Present => write!(f, "already unpacked"),
            Outcome::Lazy => write!(f, "lazy in {elapsed}"),
            Outcome::Applied { fetched, fallback } => {
                write!(f, "fetched {}, applied in {elapsed}", ByteSize(*fetched))?;
                match (fallback, self.lazy_format) {
                    (Some(why), _) => write!(f, " (not lazy: {why})"),
                    (None, Some(format)) => write!(
                        f,
                        " (an {format} layer, but the snapshotter said nothing of why it was \
                         not mounted lazily)"
                    ),
                    (None, None) => Ok(()),
                }
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

/// Without a terminal, a layer being fetched is reported this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Prints reports as plain lines, above a byte bar on a terminal; elsewhere (a log, a pipe)
/// a line every few seconds says how far the layer being fetched is.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: std::sync::Mutex<Option<PlainLayer>>,
}

/// The layer being fetched, for the plain lines.
struct PlainLayer {
    name: String,
    size: u64,
    done: u64,
    reported: std::time::Instant,
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
        Progress {
            bar,
            plain: std::sync::Mutex::new(None),
        }
    }

    /// A layer of `size` bytes is starting.
    pub fn start(&self, position: usize, count: usize, digest: &Digest, size: u64) {
        let name = format!("layer {position}/{count} {digest:?}");
        match &self.bar {
            Some(bar) => {
                bar.reset();
                bar.set_length(size);
                bar.set_message(name);
            }
            None => {
                *self.plain.lock().unwrap_or_else(|e| e.into_inner()) = Some(PlainLayer {
                    name,
                    size,
                    done: 0,
                    reported: std::time::Instant::now(),
                });
            }
        }
    }

    pub fn bytes(&self, count: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(count);
            return;
        }
        let mut plain = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(layer) = plain.as_mut() {
            layer.done += count;
            if layer.reported.elapsed() >= PLAIN_EVERY {
                layer.reported = std::time::Instant::now();
                println!(
                    "{}: fetching, {} of {}",
                    layer.name,
                    ByteSize(layer.done),
                    ByteSize(layer.size)
                );
            }
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
            lazy_format: None,
            elapsed: Duration::from_millis(millis),
        }
    }

    fn applied(fetched: u64) -> Outcome {
        Outcome::Applied {
            fetched,
            fallback: None,
        }
    }

    #[test]
    fn layer_lines_say_what_happened() {
        assert_eq!(
            report(Outcome::Lazy, 40).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… lazy in 40ms"
        );
        assert_eq!(
            report(applied(3_250_586), 800).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… fetched 3.1 MiB, applied in 800ms"
        );
        assert_eq!(
            report(applied(512), 1_250).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… fetched 512 B, applied in 1.2s"
        );
        assert_eq!(
            report(Outcome::Present, 1).to_string(),
            "layer 2/3 sha256:e3b0c44298fc… already unpacked"
        );
        let fell_back = Outcome::Applied {
            fetched: 512,
            fallback: Some("registry: 401".to_owned()),
        };
        let mut lazy_format = report(fell_back, 1);
        lazy_format.lazy_format = Some("eStargz");
        assert!(lazy_format.downloaded_lazy_format());
        assert_eq!(
            lazy_format.to_string(),
            "layer 2/3 sha256:e3b0c44298fc… fetched 512 B, applied in 1ms (not lazy: registry: 401)"
        );
        assert!(!report(applied(1), 1).downloaded_lazy_format());
    }

    #[test]
    fn summary_counts_outcomes_and_bytes() {
        let summary = Summary {
            image: "host/app:latest".to_owned(),
            target: Digest::of(b""),
            layers: vec![
                report(Outcome::Lazy, 1),
                report(applied(2048), 1),
                report(applied(1024), 1),
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
