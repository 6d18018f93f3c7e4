//! `shoal convert`: an ordinary OCI image, from an image layout or a registry, rebuilt as
//! eStargz and pushed to a registry, so that Shoal can mount its layers lazily.
//!
//! Each layer is fetched as a file, checked to be a gzip or plain tar, run through the
//! eStargz builder (`shoal_formats::estargz::build_with_spill`) while its original digest is
//! verified, and uploaded. The builder's diff IDs replace the config's (an eStargz blob
//! decompresses to a different tar), the config is uploaded under its new digest, and an OCI
//! manifest whose layers carry the TOC digest and uncompressed size annotations is pushed last,
//! so a failed conversion never leaves a tag pointing at missing blobs.
//!
//! - [`job`]: what every format shares: the source read and checked, the final config and
//!   manifest push.
//! - [`source`]: the image to convert: [`source::Location`] and [`source::Source`].
//! - [`layer`]: one layer's checks and conversion.
//! - [`manifest`]: the new layer descriptors, config and manifest (pure).
//! - [`report`]: per-layer lines and the [`Summary`].
//! - [`optimize`]: `--optimize`, the image's command run once and the files it reads placed
//!   first in the layers that provide them.
//! - [`overlaybd`] and [`overlaybd_disk`]: `--format overlaybd`, the layers applied to an ext4
//!   work disk and the blocks each changes written as overlaybd layers.

pub mod job;
pub mod layer;
pub mod manifest;
pub mod optimize;
pub mod overlaybd;
pub mod overlaybd_disk;
pub mod report;
pub mod source;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use shoal_config::Config;
use shoal_fetcher::{BlobContent, Digest, ImageRef, RegistryClient};
use shoal_formats::estargz::build::DEFAULT_CHUNK_SIZE;
use shoal_formats::estargz::BuildOptions;

pub use self::report::{LayerReport, Summary};

use self::job::Job;
use self::source::Source;
use crate::pull::image::Descriptor;
use crate::pull::Progress;

/// The platform picked from a multi-platform source unless told otherwise.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// A prioritize list longer than this is not a list of files someone means to prefetch.
const MAX_PRIORITIZE_LIST_BYTES: u64 = 16 << 20;

/// The lazily mountable format an image is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Seekable gzip layers with a TOC (file-level lazy reads).
    Estargz,
    /// ext4 block layers: LSMT in zstd-compressed ZFile (block-level lazy reads); zstd moves
    /// 18% fewer bytes than LZ4 for a Debian rootfs (README, "Layer formats in bytes").
    Overlaybd,
    /// As `overlaybd`, with LZ4-compressed blocks (the reference converter's default).
    OverlaybdLz4,
    /// As `overlaybd` (zstd), named explicitly.
    OverlaybdZstd,
}

/// What to convert, where to push it, and how to lay the layers out.
#[derive(Debug, Clone)]
pub struct Options {
    /// `oci:<layout dir>[:tag]` or a registry reference.
    pub source: String,
    /// A registry reference with a tag (`latest` when none is given).
    pub destination: String,
    /// Talk plain HTTP to the source's and the destination's registries.
    pub plain_http: bool,
    /// Files to place first in every layer that has them, in this order.
    pub prioritize: Vec<String>,
    /// A file naming more of them, one path a line (`#` starts a comment).
    pub prioritize_list: Option<PathBuf>,
    pub chunk_size: u64,
    /// `os/arch[/variant]` to pick from an index; [`DEFAULT_PLATFORM`] when absent.
    pub platform: Option<String>,
    /// overlaybd: push a block digest table beside each layer.
    pub block_digests: bool,
    /// Run the image's command once and prioritize what it reads (eStargz only).
    pub optimize: Option<optimize::Optimize>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            source: String::new(),
            destination: String::new(),
            plain_http: false,
            prioritize: Vec::new(),
            prioritize_list: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            platform: None,
            block_digests: true,
            optimize: None,
        }
    }
}

/// Converts `options.source` and pushes it as `options.destination`, reporting each layer to
/// `progress`.
pub async fn convert(
    config: Config,
    options: &Options,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let prioritized = prioritized_paths(options)?;
    let job = Job::open(config, options).await?;
    let work_dir = tempfile::Builder::new()
        .prefix("shoal-convert-")
        .tempdir()
        .context("create a work directory")?;
    let learned = match &options.optimize {
        Some(optimize) => Some(optimize::learn(&job, optimize, work_dir.path(), progress).await?),
        None => None,
    };
    let push = Push {
        source: &job.source,
        client: &job.client,
        repository: job.repository.clone(),
        work_dir: work_dir.path(),
        build: BuildOptions {
            chunk_size: options.chunk_size,
            prioritized: prioritized.clone(),
            ..BuildOptions::default()
        },
        progress,
        learned: learned.map(|l| l.per_layer),
    };
    let result = push.layers(&job.manifest.layers).await;
    progress.finish();
    let converted = result?;

    let diff_ids: Vec<Digest> = converted.iter().map(|c| c.diff_id.clone()).collect();
    let layers: Vec<Descriptor> = converted.iter().map(|c| c.descriptor.clone()).collect();
    let manifest = job.push_image(&diff_ids, &layers).await?;

    let unmatched_prioritized = prioritized
        .iter()
        .filter(|path| converted.iter().all(|c| c.missed.contains(*path)))
        .cloned()
        .collect();
    Ok(Summary {
        destination: job.destination_name(),
        manifest,
        layers: converted.into_iter().map(|c| c.report).collect(),
        unmatched_prioritized,
        elapsed: started.elapsed(),
    })
}

/// `--prioritize` paths, then those of `--prioritize-list`, each once, in order.
fn prioritized_paths(options: &Options) -> anyhow::Result<Vec<String>> {
    let mut paths = options.prioritize.clone();
    if let Some(list) = &options.prioritize_list {
        paths.extend(read_prioritize_list(list)?);
    }
    let mut seen = BTreeSet::new();
    paths.retain(|path| seen.insert(path.clone()));
    Ok(paths)
}

fn read_prioritize_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("read prioritize list {}", path.display()))?
        .len();
    if size > MAX_PRIORITIZE_LIST_BYTES {
        bail!(
            "prioritize list {} has {size} bytes, more than the {MAX_PRIORITIZE_LIST_BYTES} \
             supported",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read prioritize list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// One converted and uploaded layer.
struct Converted {
    descriptor: Descriptor,
    diff_id: Digest,
    missed: Vec<String>,
    report: LayerReport,
}

/// The per-layer part of a conversion.
struct Push<'a> {
    source: &'a Source,
    client: &'a RegistryClient,
    /// The destination's repository, where blobs go.
    repository: ImageRef,
    work_dir: &'a Path,
    build: BuildOptions,
    progress: &'a Progress,
    /// `--optimize`: each layer's files read by the run, placed before the listed ones.
    learned: Option<Vec<Vec<String>>>,
}

impl Push<'_> {
    async fn layers(&self, layers: &[Descriptor]) -> anyhow::Result<Vec<Converted>> {
        let mut converted = Vec::with_capacity(layers.len());
        for (i, original) in layers.iter().enumerate() {
            let layer = self
                .layer(i, layers.len(), original)
                .await
                .with_context(|| format!("layer {}/{} {}", i + 1, layers.len(), original.digest))?;
            self.progress.line(&layer.report);
            converted.push(layer);
        }
        Ok(converted)
    }

    async fn layer(
        &self,
        index: usize,
        count: usize,
        original: &Descriptor,
    ) -> anyhow::Result<Converted> {
        self.progress
            .start(index + 1, count, &original.digest, original.size);
        let blob = self
            .source
            .layer(original, self.work_dir, &|bytes| self.progress.bytes(bytes))
            .await?;
        let output = self.work_dir.join(format!("{index}.estargz"));
        let built = {
            let (input, original, output) = (blob.path.clone(), original.clone(), output.clone());
            let (work_dir, build) = (self.work_dir.to_owned(), self.layer_build(index));
            tokio::task::spawn_blocking(move || {
                layer::convert(&input, &original, &output, &work_dir, &build)
            })
            .await
            .context("the conversion task did not finish")??
            .built
        };
        if blob.downloaded {
            remove(&blob.path)?;
        }
        let descriptor = manifest::estargz_layer(original, &built)?;
        let pushed = self
            .client
            .push_blob(
                &self.repository,
                &descriptor.digest,
                descriptor.size,
                &BlobContent::File(output.clone()),
            )
            .await?;
        remove(&output)?;
        Ok(Converted {
            diff_id: Digest::parse(&built.diff_id.to_string())?,
            missed: built.missed_prioritized.clone(),
            report: LayerReport {
                position: index + 1,
                count,
                original_size: original.size,
                estargz_size: descriptor.size,
                toc_digest: built.toc_digest,
                pushed,
                prioritized: self.learned.as_ref().map(|learned| {
                    learned.get(index).map_or(0, |files| {
                        files
                            .iter()
                            .filter(|f| !built.missed_prioritized.contains(f))
                            .count()
                    })
                }),
            },
            descriptor,
        })
    }
}

impl Push<'_> {
    /// The build options of layer `index`: its learned files first, then the listed ones.
    fn layer_build(&self, index: usize) -> BuildOptions {
        let mut build = self.build.clone();
        if let Some(learned) = &self.learned {
            let mut prioritized = learned.get(index).cloned().unwrap_or_default();
            prioritized.extend(build.prioritized);
            build.prioritized = prioritized;
        }
        build
    }
}

/// Work files go as soon as they are used, so a many-layer image needs room for one layer.
fn remove(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prioritized_paths_merge_flags_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list");
        std::fs::write(
            &list,
            "# startup files\n/bin/sh\n\n  /etc/passwd \n/bin/app\n",
        )
        .unwrap();
        let options = Options {
            prioritize: vec!["/bin/app".to_owned()],
            prioritize_list: Some(list),
            ..Options::default()
        };
        assert_eq!(
            prioritized_paths(&options).unwrap(),
            ["/bin/app", "/bin/sh", "/etc/passwd"]
        );
        let missing = Options {
            prioritize_list: Some(dir.path().join("nope")),
            ..Options::default()
        };
        let err = prioritized_paths(&missing).unwrap_err().to_string();
        assert!(err.contains("read prioritize list"), "{err}");
    }
}
