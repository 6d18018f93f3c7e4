//! What every conversion shares, whatever the target format: the source image read and checked
//! (manifest for the platform, layer media types, config with one diff ID a layer), where the
//! result goes, and the final push of the rewritten config and the new manifest.

use anyhow::{bail, Context};
use bytes::Bytes;
use shoal_config::Config;
use shoal_fetcher::{BlobContent, Digest, ImageRef, RegistryClient};

use super::source::{Location, Source};
use super::{layer, manifest, Options, DEFAULT_PLATFORM};
use crate::pull::image::{self, Descriptor, ImageManifest, Platform, OCI_MANIFEST};

/// A source image ready to convert, and its destination.
pub struct Job {
    /// The source as the user named it, for messages.
    pub name: String,
    pub source: Source,
    pub client: RegistryClient,
    pub manifest: ImageManifest,
    /// The source's config, as stored.
    pub config: Bytes,
    pub destination: ImageRef,
    /// The destination's repository, where blobs are pushed.
    pub repository: ImageRef,
}

impl Job {
    /// Reads and checks the source named by `options`, with plain HTTP to both registries when
    /// asked for.
    pub async fn open(mut config: Config, options: &Options) -> anyhow::Result<Job> {
        let destination = ImageRef::parse(&options.destination)?;
        if destination.digest().is_some() {
            bail!(
                "destination {destination} names a digest; push to a tag (the digest is only \
                 known after converting)"
            );
        }
        let location = Location::parse(&options.source)?;
        let platform = Platform::parse(options.platform.as_deref().unwrap_or(DEFAULT_PLATFORM))?;
        if options.plain_http {
            let mut hosts = vec![destination.host().to_owned()];
            if let Location::Registry(image) = &location {
                hosts.push(image.host().to_owned());
            }
            for host in hosts {
                config.registry.hosts.entry(host).or_default().plain_http = true;
            }
        }
        let client = RegistryClient::new(&config.registry).context("build the registry client")?;
        let source = Source {
            location,
            client: client.clone(),
        };
        let name = options.source.clone();
        let manifest = source
            .manifest(&platform)
            .await
            .with_context(|| format!("read the manifest of {name}"))?;
        for layer in &manifest.layers {
            layer::check_media_type(layer).with_context(|| format!("convert {name}"))?;
        }
        let config = source
            .config(&manifest.config)
            .await
            .with_context(|| format!("read the config of {name}"))?;
        let diff_ids =
            image::diff_ids(&config).with_context(|| format!("read the config of {name}"))?;
        if diff_ids.len() != manifest.layers.len() {
            bail!(
                "{name}: the manifest lists {} layers but the config {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            );
        }
        let repository = ImageRef::repository(destination.host(), destination.repository_name())?;
        Ok(Job {
            name,
            source,
            client,
            manifest,
            config,
            destination,
            repository,
        })
    }

    /// Pushes the source's config with `diff_ids` in place of the original ones, then the
    /// manifest of `layers` (last, so the image appears only once everything it names exists);
    /// returns the manifest's digest.
    pub async fn push_image(
        &self,
        diff_ids: &[Digest],
        layers: &[Descriptor],
    ) -> anyhow::Result<Digest> {
        let new_config = manifest::rewrite_config(&self.config, diff_ids)
            .with_context(|| format!("rewrite the config of {}", self.name))?;
        let config_descriptor = Descriptor {
            media_type: manifest::config_media_type(&self.manifest.config.media_type).to_owned(),
            digest: Digest::of(&new_config),
            size: new_config.len() as u64,
            annotations: self.manifest.config.annotations.clone(),
        };
        self.client
            .push_blob(
                &self.repository,
                &config_descriptor.digest,
                config_descriptor.size,
                &BlobContent::Bytes(Bytes::from(new_config)),
            )
            .await
            .context("push the config")?;
        let manifest_bytes = manifest::oci_manifest(&config_descriptor, layers)?;
        let pushed = self
            .client
            .put_manifest(&self.destination, OCI_MANIFEST, Bytes::from(manifest_bytes))
            .await
            .context("push the manifest")?;
        Ok(pushed.digest)
    }

    /// `host/repository:tag` of the destination, for the summary.
    pub fn destination_name(&self) -> String {
        format!(
            "{}/{}:{}",
            self.destination.host(),
            self.destination.repository_name(),
            self.destination.manifest_reference()
        )
    }
}
