//! What a registry serves for an image: indexes, manifests, configs, and the choice of one
//! platform's manifest out of an index. Pure parsing, no I/O.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Context};
use serde::Deserialize;
use shoal_fetcher::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Images with more layers than this are refused: containerd itself caps overlay lowerdirs
/// far below it, and every layer costs a snapshot.
const MAX_LAYERS: usize = 1000;

/// A content descriptor as manifests and indexes carry it, digest validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

/// One entry of an index: a manifest and the platform it is for.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub descriptor: Descriptor,
    pub platform: Option<Platform>,
}

/// A single-platform image manifest.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a manifest request returned.
#[derive(Debug, Clone)]
pub enum Document {
    Index(Vec<IndexEntry>),
    Manifest(ImageManifest),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    rootfs: RawRootfs,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl RawDescriptor {
    fn validate(self) -> anyhow::Result<(Descriptor, Option<Platform>)> {
        let digest = Digest::parse(&self.digest)?;
        let platform = self.platform.map(|p| Platform {
            os: p.os,
            architecture: p.architecture,
            variant: p.variant.filter(|v| !v.is_empty()),
        });
        let descriptor = Descriptor {
            media_type: self.media_type,
            digest,
            size: self.size,
            annotations: self.annotations,
        };
        Ok((descriptor, platform))
    }
}

impl Document {
    /// Parses a manifest response; `media_type` is the `Content-Type` the registry sent, and
    /// the document's own `mediaType` (or its shape) decides when that is missing or generic.
    /// Returns the document and the media type it goes by.
    pub fn parse(media_type: &str, bytes: &[u8]) -> anyhow::Result<(&'static str, Document)> {
        let raw: RawDocument = serde_json::from_slice(bytes).context("parse manifest json")?;
        let declared = match media_type {
            OCI_INDEX | DOCKER_LIST | OCI_MANIFEST | DOCKER_MANIFEST => media_type,
            _ => raw.media_type.as_deref().unwrap_or(""),
        };
        let media_type = match declared {
            OCI_INDEX => OCI_INDEX,
            DOCKER_LIST => DOCKER_LIST,
            OCI_MANIFEST => OCI_MANIFEST,
            DOCKER_MANIFEST => DOCKER_MANIFEST,
            _ if raw.manifests.is_some() => OCI_INDEX,
            _ => OCI_MANIFEST,
        };
        if matches!(media_type, OCI_INDEX | DOCKER_LIST) {
            let entries = raw
                .manifests
                .context("index has no `manifests`")?
                .into_iter()
                .map(|raw| {
                    let (descriptor, platform) = raw.validate()?;
                    Ok(IndexEntry {
                        descriptor,
                        platform,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()
                .context("parse index entries")?;
            return Ok((media_type, Document::Index(entries)));
        }
        let (config, _) = raw
            .config
            .context("manifest has no `config`")?
            .validate()
            .context("parse manifest config descriptor")?;
        let layers = raw
            .layers
            .context("manifest has no `layers`")?
            .into_iter()
            .map(|raw| raw.validate().map(|(descriptor, _)| descriptor))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("parse manifest layers")?;
        if layers.is_empty() {
            bail!("manifest has no layers");
        }
        if layers.len() > MAX_LAYERS {
            bail!(
                "manifest has {} layers, more than the {MAX_LAYERS} supported",
                layers.len()
            );
        }
        Ok((
            media_type,
            Document::Manifest(ImageManifest { config, layers }),
        ))
    }
}

/// The uncompressed digests of an image's layers, from its config's `rootfs.diff_ids`.
pub fn diff_ids(config: &[u8]) -> anyhow::Result<Vec<Digest>> {
    let raw: RawConfig = serde_json::from_slice(config).context("parse image config json")?;
    raw.rootfs
        .diff_ids
        .iter()
        .map(|text| Digest::parse(text).context("parse image config diff_ids"))
        .collect()
}

/// An `os/architecture[/variant]` platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, normalising architecture aliases as containerd does.
    pub fn parse(text: &str) -> anyhow::Result<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        let (os, architecture, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => bail!("platform `{text}` is not `os/architecture[/variant]`"),
        };
        if os.is_empty() || architecture.is_empty() || variant.is_some_and(str::is_empty) {
            bail!("platform `{text}` has an empty component");
        }
        Ok(Platform {
            os: os.to_ascii_lowercase(),
            architecture: normalise_architecture(&architecture.to_ascii_lowercase()).to_owned(),
            variant: variant.map(str::to_ascii_lowercase),
        })
    }

    /// The platform this binary runs on.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Whether an index entry for `candidate` can run here. A wanted variant must match
    /// (arm64's implied variant is v8); with none wanted, any variant does.
    fn accepts(&self, candidate: &Platform) -> bool {
        let variant = |platform: &Platform| match (&platform.variant, &*platform.architecture) {
            (None, "arm64") => Some("v8".to_owned()),
            (variant, _) => variant.clone(),
        };
        candidate.os == self.os
            && normalise_architecture(&candidate.architecture) == self.architecture
            && (self.variant.is_none() || variant(candidate) == variant(self))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

fn normalise_architecture(architecture: &str) -> &str {
    match architecture {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" => "386",
        other => other,
    }
}

/// The first manifest of `entries` for `platform`; the error lists what the index offers.
pub fn choose<'a>(
    entries: &'a [IndexEntry],
    platform: &Platform,
) -> anyhow::Result<&'a IndexEntry> {
    if let Some(entry) = entries.iter().find(|entry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|candidate| platform.accepts(candidate))
    }) {
        return Ok(entry);
    }
    let offered: Vec<String> = entries
        .iter()
        .filter_map(|entry| entry.platform.as_ref().map(Platform::to_string))
        .collect();
    bail!(
        "no manifest for platform {platform} in the index (it offers: {})",
        if offered.is_empty() {
            "no platforms".to_owned()
        } else {
            offered.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,
                  "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":11,
                  "platform":{{"os":"linux","architecture":"amd64"}}}},
                {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":12,
                  "platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            digest(1),
            digest(2),
            digest(3)
        )
    }

    #[test]
    fn chooses_the_platform_from_an_index() {
        let (media_type, Document::Index(entries)) =
            Document::parse("", index_json().as_bytes()).unwrap()
        else {
            panic!("an index was parsed as a manifest");
        };
        assert_eq!(media_type, OCI_INDEX);
        let amd64 = choose(&entries, &Platform::parse("linux/amd64").unwrap()).unwrap();
        assert_eq!(amd64.descriptor.digest, digest(2));
        let arm64 = choose(&entries, &Platform::parse("linux/aarch64").unwrap()).unwrap();
        assert_eq!(arm64.descriptor.digest, digest(1));
        let v8 = choose(&entries, &Platform::parse("linux/arm64/v8").unwrap()).unwrap();
        assert_eq!(v8.descriptor.digest, digest(1));

        let err = choose(&entries, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/s390x"), "{err}");
        assert!(err.contains("linux/arm64/v8, linux/amd64"), "{err}");
    }

    #[test]
    fn parses_a_manifest_with_annotations() {
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{}","size":5}},
                "layers":[{{"mediaType":"l","digest":"{}","size":7,
                  "annotations":{{"containerd.io/snapshot/stargz/toc.digest":"x"}}}}]}}"#,
            digest(4),
            digest(5)
        );
        let (media_type, Document::Manifest(manifest)) =
            Document::parse("text/plain", json.as_bytes()).unwrap()
        else {
            panic!("a manifest was parsed as an index");
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(manifest.config.digest, digest(4));
        assert_eq!(manifest.layers.len(), 1);
        assert_eq!(manifest.layers[0].size, 7);
        assert_eq!(
            manifest.layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"],
            "x"
        );
    }

    #[test]
    fn rejects_bad_documents() {
        let bad_digest = r#"{"config":{"digest":"md5:00","size":1},"layers":[]}"#;
        assert!(Document::parse(OCI_MANIFEST, bad_digest.as_bytes()).is_err());
        let no_layers = format!(
            r#"{{"config":{{"digest":"{}","size":1}},"layers":[]}}"#,
            digest(1)
        );
        assert!(Document::parse(OCI_MANIFEST, no_layers.as_bytes()).is_err());
        assert!(Document::parse(OCI_INDEX, b"{}").is_err());
        assert!(Document::parse("", b"not json").is_err());
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//v7").is_err());
    }

    #[test]
    fn reads_diff_ids() {
        let json = format!(
            r#"{{"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            digest(9)
        );
        assert_eq!(diff_ids(json.as_bytes()).unwrap(), vec![digest(9)]);
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["sha256:zz"]}}"#).is_err());
    }
}
