//! The converted image's documents: layer descriptors with the eStargz annotations, the config
//! with the new `rootfs.diff_ids`, and the OCI manifest that ties them together. Pure.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use shoal_fetcher::Digest;
use shoal_formats::estargz::{BuildOutput, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};

use crate::pull::image::{Descriptor, OCI_MANIFEST};

/// Every converted layer is gzip: eStargz is a gzip stream that any puller can unpack.
pub const ESTARGZ_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The descriptor of a converted layer: the original's annotations, with the TOC digest and
/// the uncompressed size set (replacing those of a layer converted before).
pub fn estargz_layer(original: &Descriptor, built: &BuildOutput) -> anyhow::Result<Descriptor> {
    let mut annotations = original.annotations.clone();
    annotations.insert(
        TOC_DIGEST_ANNOTATION.to_owned(),
        built.toc_digest.to_string(),
    );
    annotations.insert(
        UNCOMPRESSED_SIZE_ANNOTATION.to_owned(),
        built.uncompressed_size.to_string(),
    );
    Ok(Descriptor {
        media_type: ESTARGZ_LAYER.to_owned(),
        digest: Digest::parse(&built.blob_digest.to_string())?,
        size: built.compressed_size,
        annotations,
    })
}

/// `config` with `rootfs.diff_ids` replaced: an eStargz blob decompresses to a different tar
/// (TOC entry, landmark files) than the original layer, so its diff ID differs. Everything
/// else is kept as it was.
pub fn rewrite_config(config: &[u8], diff_ids: &[Digest]) -> anyhow::Result<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(config).context("parse image config json")?;
    let old = value
        .pointer_mut("/rootfs/diff_ids")
        .and_then(Value::as_array_mut)
        .context("image config has no rootfs.diff_ids")?;
    if old.len() != diff_ids.len() {
        bail!(
            "image config lists {} diff_ids for {} layers",
            old.len(),
            diff_ids.len()
        );
    }
    *old = diff_ids
        .iter()
        .map(|digest| Value::String(digest.to_string()))
        .collect();
    serde_json::to_vec(&value).context("encode image config json")
}

/// The config's media type in an OCI manifest: Docker's config JSON is the same document.
pub fn config_media_type(original: &str) -> &str {
    match original {
        DOCKER_CONFIG | "" => OCI_CONFIG,
        other => other,
    }
}

/// An OCI image manifest for `config` and `layers`.
pub fn oci_manifest(config: &Descriptor, layers: &[Descriptor]) -> anyhow::Result<Vec<u8>> {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor_json(config),
        "layers": layers.iter().map(descriptor_json).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&manifest).context("encode manifest json")
}

fn descriptor_json(descriptor: &Descriptor) -> Value {
    let mut object = Map::new();
    object.insert("mediaType".into(), descriptor.media_type.clone().into());
    object.insert("digest".into(), descriptor.digest.to_string().into());
    object.insert("size".into(), descriptor.size.into());
    if !descriptor.annotations.is_empty() {
        let annotations: BTreeMap<&str, &str> = descriptor
            .annotations
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        object.insert("annotations".into(), json!(annotations));
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::image::Document;

    fn descriptor(media_type: &str, n: u8) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: Digest::of(&[n]),
            size: u64::from(n) * 100,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn config_keeps_everything_but_the_diff_ids() {
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa","sha256:bb"]},"history":[{}]}"#;
        let new = [Digest::of(b"1"), Digest::of(b"2")];
        let rewritten: Value =
            serde_json::from_slice(&rewrite_config(config, &new).unwrap()).unwrap();
        assert_eq!(rewritten["rootfs"]["diff_ids"][1], new[1].to_string());
        assert_eq!(rewritten["rootfs"]["type"], "layers");
        assert_eq!(rewritten["config"]["Cmd"][0], "/bin/sh");
        assert_eq!(rewritten["history"].as_array().unwrap().len(), 1);

        let err = rewrite_config(config, &new[..1]).unwrap_err().to_string();
        assert!(err.contains("2 diff_ids for 1 layers"), "{err}");
        assert!(rewrite_config(b"{}", &new).is_err());
        assert!(rewrite_config(b"not json", &new).is_err());
    }

    #[test]
    fn manifest_round_trips_with_estargz_annotations() {
        let mut layer = descriptor(ESTARGZ_LAYER, 2);
        layer.annotations.insert(
            TOC_DIGEST_ANNOTATION.to_owned(),
            Digest::of(b"toc").to_string(),
        );
        let config = descriptor(OCI_CONFIG, 1);
        let bytes = oci_manifest(&config, &[layer.clone()]).unwrap();
        let (media_type, Document::Manifest(parsed)) = Document::parse("", &bytes).unwrap() else {
            panic!("the manifest parsed as an index");
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(parsed.config, config);
        assert_eq!(parsed.layers, vec![layer]);
    }

    #[test]
    fn docker_configs_become_oci_configs() {
        assert_eq!(config_media_type(DOCKER_CONFIG), OCI_CONFIG);
        assert_eq!(config_media_type(OCI_CONFIG), OCI_CONFIG);
    }
}
