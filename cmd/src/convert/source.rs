//! Where the image to convert comes from: an OCI image layout on disk (`oci:<dir>[:tag]`) or a
//! registry. Either way it yields one platform's manifest, its config, and each layer's
//! compressed blob as a file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde::Deserialize;
use shoal_fetcher::{BlobRef, Digest, HttpFailure, ImageRef, RegistryClient, RegistryError};
use tokio::io::AsyncWriteExt;

use crate::pull::image::{self, Descriptor, Document, ImageManifest, Platform};

/// Layers are downloaded in range requests of this size, each within the client's limits.
const DOWNLOAD_STEP: u64 = 16 << 20;
/// `index.json` and manifests are small; a larger one is not an image layout.
const MAX_LAYOUT_DOCUMENT_BYTES: u64 = 4 << 20;
/// Configs are small JSON documents; containerd caps them similarly.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The annotation an OCI layout names its tags with.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where an image is: `oci:<dir>[:tag]`, or a registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Layout { dir: PathBuf, tag: Option<String> },
    Registry(ImageRef),
}

/// An image to read, and the client to read it with when it is in a registry.
pub struct Source {
    pub location: Location,
    pub client: RegistryClient,
}

/// A layer's compressed blob on disk, unverified: the converter hashes it as it reads.
pub struct LayerBlob {
    pub path: PathBuf,
    /// A download kept in the work directory; removed once converted.
    pub downloaded: bool,
}

#[derive(Deserialize)]
struct LayoutIndex {
    #[serde(default)]
    manifests: Vec<LayoutEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

impl Location {
    /// Parses `oci:<dir>[:tag]`; anything else is a registry reference.
    pub fn parse(text: &str) -> anyhow::Result<Location> {
        if let Some(rest) = text.strip_prefix("oci:") {
            // A tag follows the last `:` unless that `:` is part of the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
                    (dir, Some(tag.to_owned()))
                }
                _ => (rest, None),
            };
            let dir = PathBuf::from(dir);
            if !dir.join("index.json").is_file() {
                bail!(
                    "{} is not an OCI image layout (no index.json)",
                    dir.display()
                );
            }
            return Ok(Location::Layout { dir, tag });
        }
        let reference = text.strip_prefix("docker://").unwrap_or(text);
        Ok(Location::Registry(ImageRef::parse(reference)?))
    }
}

impl Source {
    /// The image manifest for `platform`, choosing from an index when there is one.
    pub async fn manifest(&self, platform: &Platform) -> anyhow::Result<ImageManifest> {
        let (media_type, bytes) = self.top_document().await?;
        let mut document = Document::parse(&media_type, &bytes)?.1;
        // An index may point at another index; two levels are all real images use.
        for _ in 0..2 {
            let entries = match document {
                Document::Manifest(manifest) => return Ok(manifest),
                Document::Index(entries) => entries,
            };
            let entry = image::choose(&entries, platform)?;
            let bytes = self.document(&entry.descriptor).await?;
            document = Document::parse(&entry.descriptor.media_type, &bytes)?.1;
        }
        match document {
            Document::Manifest(manifest) => Ok(manifest),
            Document::Index(_) => bail!("indexes nested more than two deep are not supported"),
        }
    }

    /// The config blob, verified against its descriptor.
    pub async fn config(&self, descriptor: &Descriptor) -> anyhow::Result<Bytes> {
        if descriptor.size > MAX_CONFIG_BYTES {
            bail!(
                "config {} has {} bytes, more than the {MAX_CONFIG_BYTES} supported",
                descriptor.digest,
                descriptor.size
            );
        }
        match &self.location {
            Location::Layout { dir, .. } => read_verified(dir, descriptor),
            Location::Registry(image) => {
                let client = &self.client;
                let blob = BlobRef::new(
                    ImageRef::repository(image.host(), image.repository_name())?,
                    descriptor.digest.clone(),
                    descriptor.size,
                );
                Ok(client.get_blob(&blob).await?)
            }
        }
    }

    /// The layer's compressed blob as a file: in place for a layout, downloaded into
    /// `work_dir` with range requests from a registry (`on_bytes` hears of each piece).
    pub async fn layer(
        &self,
        descriptor: &Descriptor,
        work_dir: &Path,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> anyhow::Result<LayerBlob> {
        match &self.location {
            Location::Layout { dir, .. } => {
                let path = blob_path(dir, &descriptor.digest);
                let size = std::fs::metadata(&path)
                    .with_context(|| format!("layer blob {}", path.display()))?
                    .len();
                on_bytes(size);
                Ok(LayerBlob {
                    path,
                    downloaded: false,
                })
            }
            Location::Registry(image) => {
                let client = &self.client;
                let blob = BlobRef::new(
                    ImageRef::repository(image.host(), image.repository_name())?,
                    descriptor.digest.clone(),
                    descriptor.size,
                );
                let path = work_dir.join(format!("{}.download", descriptor.digest.hex()));
                download(client, &blob, &path, on_bytes).await?;
                Ok(LayerBlob {
                    path,
                    downloaded: true,
                })
            }
        }
    }

    /// The document a reference or layout tag names, and its media type as served.
    async fn top_document(&self) -> anyhow::Result<(String, Bytes)> {
        match &self.location {
            Location::Registry(image) => {
                let client = &self.client;
                let manifest = client.get_manifest(image).await.map_err(|err| match &err {
                    RegistryError::FetchManifest {
                        cause: HttpFailure::Status { status: 404 },
                        ..
                    } => anyhow::Error::new(err).context(format!("image {image} not found")),
                    _ => anyhow::Error::new(err).context(format!("resolve {image}")),
                })?;
                Ok((manifest.media_type, manifest.bytes))
            }
            Location::Layout { dir, tag } => {
                let entry = layout_entry(dir, tag.as_deref())?;
                let bytes = read_verified(dir, &entry)?;
                Ok((entry.media_type, bytes))
            }
        }
    }

    /// A manifest or index that `descriptor` (an index entry) points at, verified.
    async fn document(&self, descriptor: &Descriptor) -> anyhow::Result<Bytes> {
        match &self.location {
            Location::Layout { dir, .. } => read_verified(dir, descriptor),
            Location::Registry(image) => {
                let client = &self.client;
                let pinned = ImageRef::parse(&format!(
                    "{}/{}@{}",
                    image.host(),
                    image.repository_name(),
                    descriptor.digest
                ))?;
                Ok(client.get_manifest(&pinned).await?.bytes)
            }
        }
    }
}

/// The `index.json` entry for `tag`, or its only entry when no tag is asked for.
fn layout_entry(dir: &Path, tag: Option<&str>) -> anyhow::Result<Descriptor> {
    let path = dir.join("index.json");
    let bytes = read_capped(&path, MAX_LAYOUT_DOCUMENT_BYTES)?;
    let index: LayoutIndex =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    let tags = || {
        index
            .manifests
            .iter()
            .filter_map(|entry| entry.annotations.get(REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|entry| entry.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
            .with_context(|| {
                format!("{} has no tag `{tag}` (it has: {})", dir.display(), tags())
            })?,
        None => match index.manifests.as_slice() {
            [only] => only,
            [] => bail!("{} holds no image", dir.display()),
            _ => bail!(
                "{} holds several images; name one as oci:{}:<tag> (tags: {})",
                dir.display(),
                dir.display(),
                tags()
            ),
        },
    };
    Ok(Descriptor {
        media_type: entry.media_type.clone(),
        digest: Digest::parse(&entry.digest)?,
        size: entry.size,
        annotations: entry.annotations.clone(),
    })
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// A small blob of the layout, checked against its descriptor's size and digest.
fn read_verified(dir: &Path, descriptor: &Descriptor) -> anyhow::Result<Bytes> {
    let path = blob_path(dir, &descriptor.digest);
    let bytes = read_capped(&path, descriptor.size.min(MAX_CONFIG_BYTES))?;
    if bytes.len() as u64 != descriptor.size || Digest::of(&bytes) != descriptor.digest {
        bail!(
            "{} does not match its descriptor ({} bytes, {})",
            path.display(),
            descriptor.size,
            descriptor.digest
        );
    }
    Ok(Bytes::from(bytes))
}

fn read_capped(path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("read {}", path.display()))?
        .len();
    if size > limit {
        bail!(
            "{} has {size} bytes, more than the {limit} expected",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// Writes `blob` to `path` piece by piece; the digest is checked by whoever reads it next.
async fn download(
    client: &RegistryClient,
    blob: &BlobRef,
    path: &Path,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("create {}", path.display()))?;
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + DOWNLOAD_STEP).min(blob.size);
        let bytes = client
            .get_blob_range(blob, offset..end)
            .await
            .with_context(|| format!("download layer {}", blob.digest))?;
        file.write_all(&bytes)
            .await
            .with_context(|| format!("write {}", path.display()))?;
        on_bytes(bytes.len() as u64);
        offset = end;
    }
    file.flush()
        .await
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sources_take_an_optional_tag() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.json"), "{}").unwrap();
        let text = format!("oci:{}:v1", dir.path().display());
        let Location::Layout { dir: parsed, tag } = Location::parse(&text).unwrap() else {
            panic!("{text} is a layout");
        };
        assert_eq!((parsed.as_path(), tag.as_deref()), (dir.path(), Some("v1")));
        let text = format!("oci:{}", dir.path().display());
        let Location::Layout { tag, .. } = Location::parse(&text).unwrap() else {
            panic!("{text} is a layout");
        };
        assert_eq!(tag, None);

        let err = Location::parse("oci:/nonexistent/layout").unwrap_err();
        assert!(err.to_string().contains("not an OCI image layout"), "{err}");
        assert_eq!(
            Location::parse("docker://127.0.0.1:5000/app:1").unwrap(),
            Location::Registry(ImageRef::parse("127.0.0.1:5000/app:1").unwrap())
        );
    }

    #[test]
    fn layout_entries_are_chosen_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let index = format!(
            r#"{{"manifests":[
                {{"mediaType":"m","digest":"{a}","size":1,"annotations":{{"{REF_NAME}":"one"}}}},
                {{"mediaType":"m","digest":"{b}","size":1,"annotations":{{"{REF_NAME}":"two"}}}}]}}"#
        );
        std::fs::write(dir.path().join("index.json"), index).unwrap();
        assert_eq!(layout_entry(dir.path(), Some("two")).unwrap().digest, b);
        let err = layout_entry(dir.path(), Some("three"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tag `three` (it has: one, two)"), "{err}");
        let err = layout_entry(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("several images"), "{err}");
    }
}
