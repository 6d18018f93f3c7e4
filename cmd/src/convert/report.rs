//! What a conversion tells its user: one line per layer and a summary.

use std::fmt;
use std::time::Duration;

use shoal_config::ByteSize;
use shoal_fetcher::{Digest, Pushed};
use shoal_formats::estargz::TocDigest;

/// How one layer went.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// 1-based position, bottom layer first.
    pub position: usize,
    pub count: usize,
    /// Size of the original, compressed blob.
    pub original_size: u64,
    pub estargz_size: u64,
    pub toc_digest: TocDigest,
    pub pushed: Pushed,
    /// `--optimize`: how many of the files the run read this layer placed first.
    pub prioritized: Option<usize>,
}

/// How the whole conversion went.
#[derive(Debug, Clone)]
pub struct Summary {
    /// `host/repository:tag` the manifest was pushed as.
    pub destination: String,
    pub manifest: Digest,
    pub layers: Vec<LayerReport>,
    /// Prioritized paths that no layer holds: likely typos.
    pub unmatched_prioritized: Vec<String>,
    pub elapsed: Duration,
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layer {}/{}: {} -> {} eStargz, toc {}",
            self.position,
            self.count,
            ByteSize(self.original_size),
            ByteSize(self.estargz_size),
            self.toc_digest
        )?;
        if let Some(count) = self.prioritized {
            write!(f, ", {count} files prioritized")?;
        }
        if self.pushed == Pushed::Present {
            write!(f, " (already in the registry)")?;
        }
        Ok(())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let original: u64 = self.layers.iter().map(|l| l.original_size).sum();
        let estargz: u64 = self.layers.iter().map(|l| l.estargz_size).sum();
        write!(
            f,
            "pushed {}@{}: {} layers, {} -> {} in {:.1}s",
            self.destination,
            self.manifest,
            self.layers.len(),
            ByteSize(original),
            ByteSize(estargz),
            self.elapsed.as_secs_f64()
        )?;
        if !self.unmatched_prioritized.is_empty() {
            write!(
                f,
                "; prioritized but in no layer: {}",
                self.unmatched_prioritized.join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lines_show_sizes_and_the_toc() {
        let toc = TocDigest::of(b"toc");
        let report = LayerReport {
            position: 1,
            count: 3,
            original_size: 12 << 20,
            estargz_size: 13_002_342,
            toc_digest: toc,
            pushed: Pushed::Uploaded,
            prioritized: None,
        };
        assert_eq!(
            report.to_string(),
            format!("layer 1/3: 12.0 MiB -> 12.4 MiB eStargz, toc {toc}")
        );
        let present = LayerReport {
            pushed: Pushed::Present,
            original_size: 512,
            ..report
        };
        assert!(present
            .to_string()
            .starts_with("layer 1/3: 512 B -> 12.4 MiB"));
        assert!(present.to_string().ends_with("(already in the registry)"));
        let optimized = LayerReport {
            prioritized: Some(7),
            ..present
        };
        assert!(
            optimized
                .to_string()
                .ends_with(", 7 files prioritized (already in the registry)"),
            "{optimized}"
        );
    }
}
