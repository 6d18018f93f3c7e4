//! The manifest a remote layer's labels point to: the image's layers from the bottom up to
//! the labelled one, looked up through an index's manifests when the image is an index.

use std::collections::HashMap;

use serde::Deserialize;
use shoal_fetcher::{Fetcher, ImageRef};

use crate::remote::{Fallback, LayerLabels};

/// Manifests of an index looked through for the layer, at most (one per platform).
const MAX_INDEX_MANIFESTS: usize = 16;

#[derive(Debug, Default, Deserialize)]
struct Document {
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// One layer (or, in an index, one manifest) as a manifest describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// Every layer of an image's manifest, bottom first, and where the labelled one is.
#[derive(Debug, Clone)]
pub struct ImageLayers {
    pub all: Vec<Descriptor>,
    /// The index in `all` of the layer the labels name.
    pub at: usize,
}

impl ImageLayers {
    /// The labelled layer.
    pub fn labelled(&self) -> &Descriptor {
        &self.all[self.at]
    }

    /// The layers above the labelled one, bottom first: those containerd prepares next.
    pub fn above(&self) -> &[Descriptor] {
        &self.all[self.at + 1..]
    }
}

/// The layers of the manifest that holds the labelled layer, from the manifest the labels name
/// (by digest when they carry one, else by reference; in an index, the manifest holding it).
pub async fn layers_of(
    fetcher: &Fetcher,
    image: &ImageRef,
    labels: &LayerLabels,
) -> Result<ImageLayers, Fallback> {
    let registry = |e: shoal_fetcher::ParseError| Fallback::Registry(e.to_string());
    let top = match &labels.manifest_digest {
        Some(digest) => at_digest(image, digest).map_err(registry)?,
        None => image.clone(),
    };
    let doc = manifest(fetcher, &top).await?;
    if let Some(layers) = layers_in(doc.layers, &labels.layer_digest) {
        return Ok(layers);
    }
    // An index: the layer is in one of its manifests (a few at most, so ask each in turn).
    for child in doc.manifests.iter().take(MAX_INDEX_MANIFESTS) {
        let child = at_digest(image, &child.digest).map_err(registry)?;
        if let Some(layers) = layers_in(
            manifest(fetcher, &child).await?.layers,
            &labels.layer_digest,
        ) {
            return Ok(layers);
        }
    }
    Err(Fallback::Registry(format!(
        "layer {} is not in the manifest of {}",
        labels.layer_digest, labels.image_ref
    )))
}

fn layers_in(all: Vec<Descriptor>, layer: &str) -> Option<ImageLayers> {
    let at = all.iter().position(|l| l.digest == layer)?;
    Some(ImageLayers { all, at })
}

async fn manifest(fetcher: &Fetcher, image: &ImageRef) -> Result<Document, Fallback> {
    let manifest = fetcher
        .registry()
        .get_manifest(image)
        .await
        .map_err(|e| Fallback::Registry(e.to_string()))?;
    serde_json::from_slice(&manifest.bytes)
        .map_err(|e| Fallback::Registry(format!("manifest is not JSON: {e}")))
}

fn at_digest(image: &ImageRef, digest: &str) -> Result<ImageRef, shoal_fetcher::ParseError> {
    ImageRef::parse(&format!(
        "{}/{}@{digest}",
        image.host(),
        image.repository_name()
    ))
}
