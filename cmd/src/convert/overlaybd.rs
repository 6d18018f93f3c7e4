//! `shoal convert --format overlaybd`: an ordinary OCI image rebuilt as an overlaybd image.
//!
//! The layers are applied in order to one ext4 work disk ([`super::overlaybd_disk`]); the 4 KiB
//! blocks each layer changes become that layer's LSMT file, which is compressed into a ZFile
//! (LZ4 or zstd, 4 KiB blocks with CRCs), wrapped in the `overlaybd.commit` tar and pushed with
//! the overlaybd annotations. Beside each layer goes its block digest table (the sha256 of
//! every 64 KiB of the blob, `shoal_formats::overlaybd::block_digests`), a blob of its own the
//! layer's annotations name by digest, so that peers' blocks can be checked one by one. Each
//! wrapped blob is an uncompressed tar, so it is its own diff ID. The manifest is pushed last, so a failed conversion never leaves a tag pointing at
//! missing blobs. Needs root: the work disk is loop-mounted to apply layers.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_config::{ByteSize, Config};
use shoal_fetcher::{BlobContent, Digest, Pushed};
use shoal_formats::overlaybd::block_digests::DEFAULT_UNIT;
use shoal_formats::overlaybd::lsmt::{Extent, Writer};
use shoal_formats::overlaybd::zfile::{self, Algorithm};
use shoal_formats::overlaybd::{
    tar_wrapper, BlockDigests, TableRef, ANNOTATION_BLOB_DIGEST, ANNOTATION_BLOB_SIZE,
    ANNOTATION_VERSION,
};

use super::job::Job;
use super::overlaybd_disk::{Change, WorkDisk, VIRTUAL_SIZE};
use super::Options;
use crate::pull::image::Descriptor;
use crate::pull::Progress;

/// The overlaybd format version the annotations declare (the reference converter's).
const FORMAT_VERSION: &str = "0.1.0";
/// Uncompressed ZFile block size.
const ZFILE_BLOCK: u32 = 4096;
/// Media type of a wrapped overlaybd layer: a plain tar.
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How one layer went.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub position: usize,
    pub count: usize,
    pub original_size: u64,
    /// Bytes of the virtual disk the layer changed.
    pub changed: u64,
    pub blob_size: u64,
    pub pushed: Pushed,
}

/// How the whole conversion went.
#[derive(Debug, Clone)]
pub struct Summary {
    pub destination: String,
    pub manifest: Digest,
    pub layers: Vec<LayerReport>,
    pub elapsed: Duration,
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layer {}/{}: {} -> {} overlaybd ({} of the disk changed)",
            self.position,
            self.count,
            ByteSize(self.original_size),
            ByteSize(self.blob_size),
            ByteSize(self.changed)
        )?;
        if self.pushed == Pushed::Present {
            write!(f, " (already in the registry)")?;
        }
        Ok(())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let original: u64 = self.layers.iter().map(|l| l.original_size).sum();
        let converted: u64 = self.layers.iter().map(|l| l.blob_size).sum();
        write!(
            f,
            "pushed {}@{}: {} overlaybd layers, {} -> {} in {:.1}s",
            self.destination,
            self.manifest,
            self.layers.len(),
            ByteSize(original),
            ByteSize(converted),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Converts `options.source` to overlaybd (blocks compressed with `algorithm`) and pushes it
/// as `options.destination`.
pub async fn convert(
    config: Config,
    options: &Options,
    algorithm: Algorithm,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    if !options.prioritize.is_empty() || options.prioritize_list.is_some() {
        bail!("--prioritize and --prioritize-list apply to eStargz, not overlaybd");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("converting to overlaybd loop-mounts an ext4 work disk, which needs root");
    }
    let job = Job::open(config, options).await?;
    let Job {
        source,
        client,
        manifest,
        repository,
        ..
    } = &job;
    let work_dir = tempfile::Builder::new()
        .prefix("shoal-convert-overlaybd-")
        .tempdir()
        .context("create a work directory")?;
    let disk_dir = work_dir.path().to_owned();
    let mut disk = tokio::task::spawn_blocking(move || WorkDisk::create(&disk_dir))
        .await
        .context("the work disk task did not finish")??;

    let count = manifest.layers.len();
    let mut layers = Vec::with_capacity(count);
    let mut reports = Vec::with_capacity(count);
    for (index, original) in manifest.layers.iter().enumerate() {
        progress.start(index + 1, count, &original.digest, original.size);
        let blob = source
            .layer(original, work_dir.path(), &|bytes| progress.bytes(bytes))
            .await
            .with_context(|| format!("layer {}/{count} {}", index + 1, original.digest))?;
        let (path, descriptor) = (blob.path.clone(), original.clone());
        let (returned, built) = tokio::task::spawn_blocking(move || {
            let built = build_layer(&mut disk, &path, &descriptor, algorithm);
            (disk, built)
        })
        .await
        .context("the conversion task did not finish")?;
        disk = returned;
        let built =
            built.with_context(|| format!("layer {}/{count} {}", index + 1, original.digest))?;
        if blob.downloaded {
            std::fs::remove_file(&blob.path)
                .with_context(|| format!("remove {}", blob.path.display()))?;
        }
        let digest = Digest::of(&built.blob);
        let size = built.blob.len() as u64;
        let table = match options.block_digests {
            true => Some(
                push_table(client, repository, &built.blob)
                    .await
                    .with_context(|| {
                        format!("block digest table of layer {}/{count}", index + 1)
                    })?,
            ),
            false => None,
        };
        let pushed = client
            .push_blob(
                repository,
                &digest,
                size,
                &BlobContent::Bytes(Bytes::from(built.blob)),
            )
            .await
            .with_context(|| format!("push layer {}/{count}", index + 1))?;
        let report = LayerReport {
            position: index + 1,
            count,
            original_size: original.size,
            changed: built.changed,
            blob_size: size,
            pushed,
        };
        progress.line(&report);
        reports.push(report);
        let mut descriptor = descriptor_of(&digest, size);
        descriptor.annotations.extend(table.into_iter().flatten());
        layers.push(descriptor);
    }
    progress.finish();

    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.digest.clone()).collect();
    let manifest = job.push_image(&diff_ids, &layers).await?;
    Ok(Summary {
        destination: job.destination_name(),
        manifest,
        layers: reports,
        elapsed: started.elapsed(),
    })
}

/// A converted layer: the wrapped blob and how much of the disk it changed.
struct BuiltLayer {
    blob: Vec<u8>,
    changed: u64,
}

/// Applies the layer blob at `path` to `disk` (checking its digest) and builds its overlaybd
/// blob from the blocks it changed. Blocking.
fn build_layer(
    disk: &mut WorkDisk,
    path: &std::path::Path,
    original: &Descriptor,
    algorithm: Algorithm,
) -> anyhow::Result<BuiltLayer> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut reader = Hashing::new(BufReader::new(file));
    let gzip = reader
        .inner
        .fill_buf()
        .context("read the layer")?
        .starts_with(&GZIP_MAGIC);
    let changes = if gzip {
        let mut tar = flate2::read::MultiGzDecoder::new(&mut reader);
        let changes = disk.apply(&mut tar)?;
        std::io::copy(&mut tar, &mut std::io::sink()).context("read the layer to its end")?;
        changes
    } else {
        disk.apply(&mut reader)?
    };
    std::io::copy(&mut reader, &mut std::io::sink()).context("read the layer to its end")?;
    let actual = reader.digest();
    if actual != original.digest {
        bail!(
            "layer blob has digest {actual}, the manifest says {}",
            original.digest
        );
    }
    let changed = changes.iter().map(|c| c.data.len() as u64).sum();
    Ok(BuiltLayer {
        blob: overlaybd_blob(&changes, algorithm)?,
        changed,
    })
}

/// The tar-wrapped ZFile of the LSMT file holding `changes`.
pub fn overlaybd_blob(changes: &[Change], algorithm: Algorithm) -> anyhow::Result<Vec<u8>> {
    let extents: Vec<Extent<'_>> = changes
        .iter()
        .map(|c| Extent {
            offset: c.offset,
            data: &c.data,
        })
        .collect();
    let lsmt = Writer::new(VIRTUAL_SIZE)
        .write(&extents)
        .context("write the lsmt layer")?;
    let payload =
        zfile::compress(&lsmt, ZFILE_BLOCK, algorithm).context("compress the lsmt layer")?;
    Ok(tar_wrapper::wrap(&payload))
}

/// Pushes the block digest table of `blob`; the annotations that name it.
async fn push_table(
    client: &shoal_fetcher::RegistryClient,
    repository: &shoal_fetcher::ImageRef,
    blob: &[u8],
) -> anyhow::Result<[(String, String); 2]> {
    let table = BlockDigests::of(blob, DEFAULT_UNIT)?.encode();
    let digest = Digest::of(&table);
    client
        .push_blob(
            repository,
            &digest,
            table.len() as u64,
            &BlobContent::Bytes(Bytes::from(table.clone())),
        )
        .await
        .context("push it")?;
    Ok(TableRef::annotations(&table))
}

fn descriptor_of(digest: &Digest, size: u64) -> Descriptor {
    let annotations = BTreeMap::from([
        (ANNOTATION_BLOB_DIGEST.to_owned(), digest.to_string()),
        (ANNOTATION_BLOB_SIZE.to_owned(), size.to_string()),
        (ANNOTATION_VERSION.to_owned(), FORMAT_VERSION.to_owned()),
    ]);
    Descriptor {
        media_type: LAYER_MEDIA_TYPE.to_owned(),
        digest: digest.clone(),
        size,
        annotations,
    }
}

/// Hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn digest(self) -> Digest {
        let hex: String = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // 64 lowercase hex digits always parse.
        Digest::parse(&format!("sha256:{hex}")).unwrap_or_else(|_| Digest::of(&[]))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_formats::overlaybd::{Disk, Window, ZFileReader};

    #[test]
    fn a_built_blob_reads_back_through_the_overlaybd_readers() {
        let changes = vec![
            Change {
                offset: 0,
                data: vec![7; 8192],
            },
            Change {
                offset: 1 << 20,
                data: vec![0; 4096],
            },
        ];
        for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
            let blob = overlaybd_blob(&changes, algorithm).unwrap();
            let payload =
                tar_wrapper::locate(&blob[..tar_wrapper::PROBE_LEN], blob.len() as u64).unwrap();
            let window = Window::new(&blob[..], payload.offset, payload.len).unwrap();
            let disk = Disk::open(vec![ZFileReader::open(window).unwrap()]).unwrap();
            assert_eq!(disk.stack().virtual_size(), VIRTUAL_SIZE);
            let mut buf = vec![1u8; 12288];
            disk.read(0, &mut buf).unwrap();
            assert!(buf[..8192].iter().all(|&b| b == 7));
            assert!(buf[8192..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn layers_carry_the_overlaybd_annotations() {
        let digest = Digest::of(b"blob");
        let descriptor = descriptor_of(&digest, 4);
        assert_eq!(descriptor.media_type, LAYER_MEDIA_TYPE);
        assert_eq!(
            descriptor.annotations[ANNOTATION_BLOB_DIGEST],
            digest.to_string()
        );
        assert_eq!(descriptor.annotations[ANNOTATION_BLOB_SIZE], "4");
        assert_eq!(descriptor.annotations[ANNOTATION_VERSION], FORMAT_VERSION);
    }
}
