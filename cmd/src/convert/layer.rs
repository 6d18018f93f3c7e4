//! One layer: check that it is a gzip or plain tar, run the eStargz builder over it while
//! verifying the original blob's digest, and leave the result in a file ready to upload.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::{Digest as _, Sha256};
use shoal_fetcher::Digest;
use shoal_formats::estargz::{build_with_spill, BuildOptions, BuildOutput, Sha256Digest};

use crate::pull::image::Descriptor;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Media types of layers the converter reads: tar, gzip'd tar, and their non-distributable
/// and Docker forms.
const ACCEPTED: [&str; 6] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A converted layer: the eStargz blob in `path` and what the builder reported.
pub struct ConvertedLayer {
    pub path: PathBuf,
    pub built: BuildOutput,
}

/// Refuses what the builder cannot read, by media type, before anything is downloaded.
pub fn check_media_type(descriptor: &Descriptor) -> anyhow::Result<()> {
    let media_type = descriptor.media_type.as_str();
    if media_type.contains("zstd") {
        bail!(
            "layer {} is zstd-compressed ({media_type}); only gzip and uncompressed tar layers \
             can be converted",
            descriptor.digest
        );
    }
    if !ACCEPTED.contains(&media_type) {
        bail!(
            "layer {} has media type `{media_type}`, which is not a tar layer",
            descriptor.digest
        );
    }
    Ok(())
}

/// Converts the blob at `input` (whose descriptor is `original`) into an eStargz blob at
/// `output`, spilling into `work_dir` when prioritized files need reordering. Blocking.
pub fn convert(
    input: &Path,
    original: &Descriptor,
    output: &Path,
    work_dir: &Path,
    options: &BuildOptions,
) -> anyhow::Result<ConvertedLayer> {
    let file = File::open(input).with_context(|| format!("open {}", input.display()))?;
    let mut reader = Verifying::new(BufReader::new(file));
    sniff(&mut reader, original)?;
    let out = File::create(output).with_context(|| format!("create {}", output.display()))?;
    let mut out = BufWriter::new(out);
    let spill = tempfile::tempfile_in(work_dir)
        .with_context(|| format!("create a spill file in {}", work_dir.display()))?;
    let built =
        build_with_spill(&mut reader, &mut out, spill, options.clone()).with_context(|| {
            format!(
                "convert layer {} (is it a tar, or a gzip'd tar?)",
                original.digest
            )
        })?;
    out.flush()
        .and_then(|()| out.get_ref().sync_all())
        .with_context(|| format!("write {}", output.display()))?;
    // The builder may stop at the tar's end-of-archive blocks; the digest covers it all.
    io::copy(&mut reader, &mut io::sink()).with_context(|| format!("read {}", input.display()))?;
    let (digest, size) = reader.finish()?;
    if size != original.size || digest != original.digest {
        bail!(
            "layer blob {} does not match its descriptor: {size} bytes with digest {digest}, \
             expected {} bytes",
            original.digest,
            original.size
        );
    }
    Ok(ConvertedLayer {
        path: output.to_owned(),
        built,
    })
}

/// Peeks at the first bytes: zstd is refused whatever the media type claimed.
fn sniff<R: Read>(
    reader: &mut Verifying<BufReader<R>>,
    original: &Descriptor,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let head = reader
        .inner
        .fill_buf()
        .with_context(|| format!("read layer {}", original.digest))?;
    if head.starts_with(&ZSTD_MAGIC) {
        bail!(
            "layer {} is zstd-compressed; only gzip and uncompressed tar layers can be converted",
            original.digest
        );
    }
    if original.media_type.ends_with("gzip") && !head.starts_with(&GZIP_MAGIC) {
        bail!(
            "layer {} is declared gzip ({}) but is not gzip data",
            original.digest,
            original.media_type
        );
    }
    Ok(())
}

/// Hashes and counts everything read through it.
struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> Verifying<R> {
    fn new(inner: R) -> Self {
        Verifying {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> anyhow::Result<(Digest, u64)> {
        let digest = Sha256Digest::from_hasher(self.hasher);
        Ok((Digest::parse(&digest.to_string())?, self.size))
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        }
    }

    fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..107].copy_from_slice(b"0000644");
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        header[136..147].copy_from_slice(b"00000000000");
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut tar = header.to_vec();
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
        tar
    }

    /// Converts `blob` in a temporary directory: the builder's report and the eStargz bytes.
    fn run(
        media_type: &str,
        blob: &[u8],
        claimed: Option<Descriptor>,
    ) -> anyhow::Result<(BuildOutput, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, blob).unwrap();
        let original = claimed.unwrap_or_else(|| descriptor(media_type, blob));
        check_media_type(&original)?;
        let out = dir.path().join("out");
        let converted = convert(
            &input,
            &original,
            &out,
            dir.path(),
            &BuildOptions::default(),
        )?;
        Ok((converted.built, std::fs::read(&out).unwrap()))
    }

    #[test]
    fn converts_a_plain_tar_and_verifies_the_original() {
        let tar = tar_with("hello.txt", b"hello\n");
        let (built, blob) = run("application/vnd.oci.image.layer.v1.tar", &tar, None).unwrap();
        assert!(blob.starts_with(&GZIP_MAGIC));
        assert_eq!(built.compressed_size, blob.len() as u64);
        assert_eq!(built.blob_digest, Sha256Digest::of(&blob));
        // The same tar, gzip'd by anyone, converts to the same blob.
        let gzipped = {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&tar).unwrap();
            encoder.finish().unwrap()
        };
        let (regzipped, _) = run(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &gzipped,
            None,
        )
        .unwrap();
        assert_eq!(regzipped.blob_digest, built.blob_digest);

        let mut lying = descriptor("application/vnd.oci.image.layer.v1.tar", &tar);
        lying.digest = Digest::of(b"something else");
        let err = run("", &tar, Some(lying)).unwrap_err();
        assert!(
            format!("{err:#}").contains("does not match its descriptor"),
            "{err:#}"
        );
    }

    #[test]
    fn refuses_zstd_and_non_tar_layers() {
        let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
        let err = run(zstd, b"whatever", None).unwrap_err().to_string();
        assert!(err.contains("zstd-compressed"), "{err}");
        let mut frame = ZSTD_MAGIC.to_vec();
        frame.extend_from_slice(&[0; 600]);
        let err = run("application/vnd.oci.image.layer.v1.tar", &frame, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("zstd-compressed"), "{err}");
        let err = run("application/vnd.oci.image.layer.v1.tar", &[7u8; 2048], None).unwrap_err();
        assert!(format!("{err:#}").contains("is it a tar"), "{err:#}");
        let err = run(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &[7u8; 2048],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not gzip data"), "{err:#}");
        let err = run("application/json", b"{}", None).unwrap_err();
        assert!(err.to_string().contains("not a tar layer"), "{err:#}");
    }
}
