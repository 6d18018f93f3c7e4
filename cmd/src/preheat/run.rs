//! One preheat job: the image's manifest (with the caller's registry credential, if the
//! registry wants one), then every blob it names, config and layers (eStargz, overlaybd and
//! ordinary layers alike, whole; an overlaybd layer's block digest table too), brought into this node's cache through the fetcher: each
//! block from a peer that holds it, else fetched once in the cluster from the registry under
//! its index owner's grant, stored and announced to its owners. A blob is then checked
//! against its digest, which makes what peers sent of it shareable, so that every block of
//! the image can be served from here; a rollout finds each block at its owners.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_fetcher::{
    with_causes, BlobRef, Completion, Digest, FetchStats, Fetcher, HttpFailure, ImageRef,
    RegistryError,
};
use shoal_formats::overlaybd::TableRef;

use super::api::Preheat;
use super::jobs::{BlobOutcome, Jobs};
use super::spread;
use crate::pull::image::{choose, Document, Platform};

/// How long the end of a job waits for this node's announcements to reach the owners.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(30);

/// Runs job `id` to its end (within its timeout) and records how it ended.
pub async fn run(fetcher: Fetcher, jobs: Arc<Jobs>, id: u64, preheat: Preheat) {
    let mut blobs = Vec::new();
    let outcome = tokio::time::timeout(
        preheat.timeout,
        preheat_image(&fetcher, &jobs, id, &preheat, &mut blobs),
    )
    .await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("{error:#}")),
        Err(_) => Some(format!(
            "preheat of {} timed out after {:?}",
            preheat.image, preheat.timeout
        )),
    };
    match &error {
        None => tracing::info!(job = id, image = %preheat.image, "preheat done"),
        Some(error) => tracing::warn!(job = id, image = %preheat.image, error, "preheat failed"),
    }
    jobs.finish(id, error, blobs);
}

async fn preheat_image(
    fetcher: &Fetcher,
    jobs: &Jobs,
    id: u64,
    preheat: &Preheat,
    outcomes: &mut Vec<BlobOutcome>,
) -> anyhow::Result<()> {
    let image = &preheat.image;
    jobs.progress(id, |p| p.phase = "reading the manifest".into());
    let registry = fetcher.registry();
    // The node's own credentials (or none) first: a credential the caller lent is used only
    // where the registry refuses without it, so that a public image stays public.
    let mut _lent = None;
    let manifest = match registry.get_manifest(image).await {
        Ok(manifest) => manifest,
        Err(error) if wants_credentials(&error) => {
            let Some(value) = preheat.authorization.as_deref() else {
                bail!(
                    "fetch the manifest of {image}: {} (and the job brought no Authorization header)",
                    with_causes(&error)
                );
            };
            let header = reqwest::header::HeaderValue::from_str(value)
                .context("the job's Authorization header")?;
            _lent = Some(registry.lend_authorization(image, header, preheat.timeout));
            match registry.get_manifest(image).await {
                Ok(manifest) => manifest,
                Err(error) if wants_credentials(&error) => bail!(
                    "fetch the manifest of {image}: the registry refused the job's \
                     Authorization header ({})",
                    with_causes(&error)
                ),
                Err(error) => bail!("fetch the manifest of {image}: {}", with_causes(&error)),
            }
        }
        Err(error) => bail!("fetch the manifest of {image}: {}", with_causes(&error)),
    };
    let (_, document) = Document::parse(&manifest.media_type, &manifest.bytes)
        .with_context(|| format!("read the manifest of {image}"))?;
    let manifest = match document {
        Document::Manifest(manifest) => manifest,
        Document::Index(entries) => {
            let entry = choose(&entries, &Platform::host())
                .with_context(|| format!("choose a manifest of {image}"))?;
            let pinned = pinned(image, entry.descriptor.digest.as_str())?;
            let bytes = registry.get_manifest(&pinned).await.map_err(|error| {
                anyhow::anyhow!("fetch the manifest of {pinned}: {}", with_causes(&error))
            })?;
            match Document::parse(&bytes.media_type, &bytes.bytes)
                .with_context(|| format!("read the manifest of {pinned}"))?
            {
                (_, Document::Manifest(manifest)) => manifest,
                (_, Document::Index(_)) => anyhow::bail!("{pinned}: an index inside an index"),
            }
        }
    };
    let mut blobs: Vec<BlobRef> = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .map(|descriptor| BlobRef::new(image.clone(), descriptor.digest.clone(), descriptor.size))
        .collect();
    // An overlaybd layer's block digest table (`shoal convert` writes one beside each layer)
    // is a blob of its own, which every node reads before the layer: preheat it too.
    for layer in &manifest.layers {
        let annotations: HashMap<String, String> = layer.annotations.clone().into_iter().collect();
        if let Some(Ok(table)) = TableRef::from_annotations(&annotations) {
            let digest = Digest::parse(&table.digest)
                .with_context(|| format!("the block digest table of layer {}", layer.digest))?;
            blobs.push(BlobRef::new(image.clone(), digest, table.size));
        }
    }
    jobs.progress(id, |p| {
        p.phase = "fetching blobs".into();
        p.blobs_total = blobs.len() as u64;
        p.bytes_total = blobs.iter().map(|blob| blob.size).sum();
    });
    let start = fetcher.stats();
    let mut failed = None;
    for blob in &blobs {
        let url = blob_url(blob);
        match preheat_blob(fetcher, jobs, id, blob, &start).await {
            Ok(()) => {
                outcomes.push(BlobOutcome {
                    url,
                    node: None,
                    failure: None,
                });
                jobs.progress(id, |p| p.blobs_done += 1);
            }
            Err(error) => {
                let why = format!("{error:#}");
                outcomes.push(BlobOutcome {
                    url,
                    node: None,
                    failure: Some(why.clone()),
                });
                failed.get_or_insert(why);
            }
        }
    }
    if let Some(why) = failed {
        anyhow::bail!("preheat {image}: {why}");
    }
    let Some(peers) = fetcher.peers() else {
        return Ok(());
    };
    // The blocks' owners must know this node holds them before anyone is asked to take them
    // from it: wait (bounded) until its announcements have gone out.
    jobs.progress(id, |p| p.phase = "announcing".into());
    let until = tokio::time::Instant::now() + ANNOUNCE_WAIT;
    while peers.stats().announcing && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spread::spread(
        peers,
        jobs,
        id,
        &blobs,
        preheat.nodes,
        preheat.timeout,
        outcomes,
    )
    .await;
    Ok(())
}

/// Brings all of `blob` into the cache and checks it against its digest.
async fn preheat_blob(
    fetcher: &Fetcher,
    jobs: &Jobs,
    id: u64,
    blob: &BlobRef,
    start: &FetchStats,
) -> anyhow::Result<()> {
    // Peers first (whole blocks, under the owners' grants), the registry for the rest, in
    // the ranges of a background completion, each reported as it lands; nothing here
    // reaches a container, and the digest below vouches for every byte.
    Completion::new(None)
        .run(
            blob,
            || fetcher.foreground_fetching(),
            |range| async move {
                let landed = range.end - range.start;
                fetcher.warm_range(blob, range).await?;
                let now = fetcher.stats();
                jobs.progress(id, |p| {
                    p.bytes_done += landed;
                    p.bytes_from_registry = now.bytes_from_registry - start.bytes_from_registry;
                    p.bytes_from_peers = now.bytes_from_peers - start.bytes_from_peers;
                });
                Ok(())
            },
        )
        .await
        .map_err(|error| anyhow::anyhow!("fetch blob {}: {}", blob.digest, with_causes(&error)))?;
    // Makes the blocks peers sent shareable (or drops them, blaming their senders).
    fetcher
        .warm_check(blob)
        .await
        .map_err(|error| anyhow::anyhow!("check blob {}: {}", blob.digest, with_causes(&error)))
}

/// Whether the registry refused for want of (other) credentials.
fn wants_credentials(error: &RegistryError) -> bool {
    matches!(
        error,
        RegistryError::FetchManifest {
            cause: HttpFailure::NoCredentials { .. }
                | HttpFailure::Unauthorized
                | HttpFailure::Status { status: 401 | 403 },
            ..
        }
    )
}

fn pinned(image: &ImageRef, digest: &str) -> anyhow::Result<ImageRef> {
    ImageRef::parse(&format!(
        "{}/{}@{digest}",
        image.host(),
        image.repository_name()
    ))
    .with_context(|| format!("name {digest} of {image}"))
}

/// The blob's URL on its registry, for the job's result (Harbor shows it).
pub(super) fn blob_url(blob: &BlobRef) -> String {
    format!(
        "{}/v2/{}/blobs/{}",
        blob.image.api_host(),
        blob.image.repository_name(),
        blob.digest
    )
}
