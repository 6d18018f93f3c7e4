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

/// The layers of the labelled layer's `image` from the bottom up to and including that layer,
/// from the manifest the labels name (by digest when they carry one, else by reference).
pub async fn chain_of(
    fetcher: &Fetcher,
    image: &ImageRef,
    labels: &LayerLabels,
) -> Result<Vec<Descriptor>, Fallback> {
    let registry = |e: shoal_fetcher::ParseError| Fallback::Registry(e.to_string());
    let top = match &labels.manifest_digest {
        Some(digest) => at_digest(image, digest).map_err(registry)?,
        None => image.clone(),
    };
    let doc = manifest(fetcher, &top).await?;
    if let Some(chain) = chain_in(&doc, &labels.layer_digest) {
        return Ok(chain);
    }
    // An index: the layer is in one of its manifests (a few at most, so ask each in turn).
    for child in doc.manifests.iter().take(MAX_INDEX_MANIFESTS) {
        let child = at_digest(image, &child.digest).map_err(registry)?;
        if let Some(chain) = chain_in(&manifest(fetcher, &child).await?, &labels.layer_digest) {
            return Ok(chain);
        }
    }
    Err(Fallback::Registry(format!(
        "layer {} is not in the manifest of {}",
        labels.layer_digest, labels.image_ref
    )))
}

fn chain_in(doc: &Document, layer: &str) -> Option<Vec<Descriptor>> {
    let at = doc.layers.iter().position(|l| l.digest == layer)?;
    Some(doc.layers[..=at].to_vec())
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
