//! `shoal rpull`: pulls an image through containerd's gRPC API the way containerd's own
//! pull-and-unpack does, but layer by layer with the labels a remote snapshotter needs to
//! mount a layer lazily instead of having it downloaded.
//!
//! Shoal's registry client resolves the reference (choosing a platform from an index); under a
//! containerd lease, index, manifest and config go into containerd's content store with the
//! garbage-collection labels containerd sets; each layer is then unpacked ([`unpack`]) and the
//! image record is created or updated.
//!
//! - [`image`]: manifests, indexes, configs, platforms (pure).
//! - [`labels`]: chain IDs, the Prepare labels and the GC labels (pure).
//! - [`containerd`]: the connection, with namespace and lease on every request.
//! - [`content`]: the content store.
//! - [`unpack`]: one layer: skip, lazy, or fetch + apply + commit.
//! - [`progress`]: per-layer lines and the summary.
//! - [`daemon_view`]: whether the daemon reads the image's registry as rpull does.

pub(crate) mod containerd;
mod content;
mod daemon_view;
pub(crate) mod image;
mod labels;
mod progress;
mod unpack;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use containerd_client::services::v1::{CreateImageRequest, Image, UpdateImageRequest};
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor as ApiDescriptor;
use shoal_config::Config;
use shoal_fetcher::{BlobRef, Digest, HttpFailure, ImageRef, RegistryClient, RegistryError};

pub use self::image::Platform;
pub use self::progress::{LayerReport, Progress, Summary};
pub use self::unpack::Outcome;

use self::containerd::{Containerd, Lease, OrStatus};
use self::content::{ContentStore, Stored};
use self::image::{Document, ImageManifest};
use self::labels::{ChainId, ImageLabels};
use self::unpack::{Layer, Unpacker};

pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_SNAPSHOTTER: &str = "shoal";

/// What to pull, from where, into what.
#[derive(Debug, Clone)]
pub struct Options {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// Talk plain HTTP to the reference's registry.
    pub plain_http: bool,
    /// `os/arch[/variant]`; the host's platform when absent.
    pub platform: Option<String>,
    pub reference: String,
    /// The `--config` file the config came from; none: the default file, if it exists.
    pub config_path: Option<PathBuf>,
}

/// Pulls `options.reference` into containerd, reporting each layer to `progress`.
pub async fn rpull(
    mut config: Config,
    options: &Options,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let image = ImageRef::parse(&options.reference)?;
    let name = canonical_name(&image);
    let platform = match &options.platform {
        Some(text) => Platform::parse(text)?,
        None => Platform::host(),
    };
    // Without the daemon's own view, rpull can only say that its config lacks the flag.
    let mut flag_unconfigured = false;
    if options.plain_http {
        let host = config
            .registry
            .hosts
            .entry(image.host().to_owned())
            .or_default();
        flag_unconfigured = !host.plain_http;
        host.plain_http = true;
    }
    let registry = RegistryClient::new(&config.registry).context("build the registry client")?;

    let containerd = Containerd::connect(&options.address, &options.namespace).await?;
    let mut daemon = None;
    if let Some(dialed) = containerd.ensure_snapshotter(&options.snapshotter).await? {
        check_daemon_socket(&options.snapshotter, &dialed, &config.socket).await?;
        daemon = crate::reload::DaemonSettings::read_live(&dialed);
    }
    match &daemon {
        Some(daemon) => {
            let own = daemon_view::OwnView {
                config: &config,
                source: crate::reload::settings::config_source(options.config_path.as_deref()),
                credentials: registry.credential_sources(),
                plain_http_flag: options.plain_http,
            };
            if let Some(warning) = daemon_view::warning(&own, daemon, image.host()) {
                eprintln!("{warning}");
            }
        }
        None if flag_unconfigured => {
            // The daemon reads the registry itself, with its own config: the flag is not
            // passed on, and without the setting it cannot mount this image's layers.
            eprintln!(
                "warning: --plain-http applies to this pull only; Shoal's config has no \
                 `plain_http = true` under `[registry.hosts.\"{}\"]`, so unless the daemon's \
                 config has it, the daemon cannot read the layers lazily and they are downloaded",
                image.host()
            );
        }
        None => {}
    }
    let resolved = resolve(&registry, &image, &name, &platform).await?;

    let lease = containerd.create_lease().await?;
    let pull = Pull {
        containerd: containerd.within(&lease)?,
        lease: &lease,
        registry: &registry,
        image: &image,
        name: &name,
        snapshotter: &options.snapshotter,
        progress,
    };
    let result = pull.run(&resolved).await;
    progress.finish();
    // The image record (or, on failure, nothing) now holds what the lease protected.
    let released = containerd.delete_lease(&lease).await;
    let layers = result?;
    released?;
    Ok(Summary {
        image: name,
        target: resolved.target().digest.clone(),
        layers,
        elapsed: started.elapsed(),
    })
}

/// Fails when nothing answers at `dialed`, where containerd reaches snapshotter `name`, naming
/// both that and `configured` (where Shoal's config puts the daemon's socket); warns when
/// they differ but something answers, which may be another daemon than this config's.
async fn check_daemon_socket(
    name: &str,
    dialed: &std::path::Path,
    configured: &std::path::Path,
) -> anyhow::Result<()> {
    let differ = dialed != configured;
    let connect = tokio::net::UnixStream::connect(dialed);
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => {
            if differ {
                eprintln!(
                    "warning: containerd reaches snapshotter `{name}` at {}, but Shoal's config \
                     puts the daemon's socket at {}; make containerd's `proxy_plugins.{name}.address` \
                     and Shoal's `socket` agree",
                    dialed.display(),
                    configured.display()
                );
            }
            Ok(())
        }
        Ok(Err(error)) => {
            let hint = if differ {
                format!(
                    "Shoal's config puts the daemon's socket at {}: make containerd's \
                     `proxy_plugins.{name}.address` and Shoal's `socket` agree",
                    configured.display()
                )
            } else {
                "is shoal-snapshotter running?".to_owned()
            };
            bail!(
                "containerd reaches snapshotter `{name}` at {}, where nothing answers ({error}); \
                 {hint}",
                dialed.display()
            )
        }
        Err(_) => bail!(
            "containerd reaches snapshotter `{name}` at {}, which did not accept a connection \
             within 5 s; is shoal-snapshotter running?",
            dialed.display()
        ),
    }
}

/// `host/repository:tag[@digest]`, with `:latest` when neither tag nor digest was given: the
/// image's name in containerd and in the snapshot labels.
fn canonical_name(image: &ImageRef) -> String {
    if image.tag().is_none() && image.digest().is_none() {
        format!("{image}:latest")
    } else {
        image.to_string()
    }
}

/// A manifest-like document as fetched: its descriptor and its bytes.
struct Fetched {
    descriptor: image::Descriptor,
    bytes: Bytes,
}

/// Everything about the image that comes before its layers.
struct Resolved {
    index: Option<Fetched>,
    manifest: Fetched,
    parsed: ImageManifest,
    config: Bytes,
    diff_ids: Vec<Digest>,
}

impl Resolved {
    /// What the image record points at.
    fn target(&self) -> &image::Descriptor {
        self.index
            .as_ref()
            .map_or(&self.manifest.descriptor, |index| &index.descriptor)
    }
}

async fn resolve(
    registry: &RegistryClient,
    image: &ImageRef,
    name: &str,
    platform: &Platform,
) -> anyhow::Result<Resolved> {
    let top = registry
        .get_manifest(image)
        .await
        .map_err(|err| match &err {
            RegistryError::FetchManifest {
                cause: HttpFailure::Status { status: 404 },
                ..
            } => anyhow::Error::new(err).context(format!("image {name} not found")),
            _ => anyhow::Error::new(err).context(format!("resolve {name}")),
        })?;
    let (media_type, document) = Document::parse(&top.media_type, &top.bytes)
        .with_context(|| format!("parse the manifest of {name}"))?;
    let top = Fetched {
        descriptor: image::Descriptor {
            media_type: media_type.to_owned(),
            digest: top.digest,
            size: top.bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        bytes: top.bytes,
    };
    let (index, manifest, parsed) = match document {
        Document::Manifest(parsed) => (None, top, parsed),
        Document::Index(entries) => {
            let entry =
                image::choose(&entries, platform).with_context(|| format!("pull {name}"))?;
            let pinned = ImageRef::parse(&format!(
                "{}/{}@{}",
                image.host(),
                image.repository_name(),
                entry.descriptor.digest
            ))?;
            let fetched = registry
                .get_manifest(&pinned)
                .await
                .with_context(|| format!("fetch the {platform} manifest of {name}"))?;
            let (media_type, document) = Document::parse(&fetched.media_type, &fetched.bytes)
                .with_context(|| format!("parse the {platform} manifest of {name}"))?;
            let Document::Manifest(parsed) = document else {
                bail!("the {platform} entry of {name}'s index is another index: not supported");
            };
            let manifest = Fetched {
                descriptor: image::Descriptor {
                    media_type: media_type.to_owned(),
                    digest: fetched.digest,
                    size: fetched.bytes.len() as u64,
                    annotations: BTreeMap::new(),
                },
                bytes: fetched.bytes,
            };
            (Some(top), manifest, parsed)
        }
    };
    let config_blob = BlobRef::new(
        repository(image)?,
        parsed.config.digest.clone(),
        parsed.config.size,
    );
    let config = registry
        .get_blob(&config_blob)
        .await
        .with_context(|| format!("fetch the config of {name}"))?;
    let diff_ids =
        image::diff_ids(&config).with_context(|| format!("read the config of {name}"))?;
    if diff_ids.len() != parsed.layers.len() {
        bail!(
            "{name}: the manifest lists {} layers but the config {} diff_ids",
            parsed.layers.len(),
            diff_ids.len()
        );
    }
    Ok(Resolved {
        index,
        manifest,
        parsed,
        config,
        diff_ids,
    })
}

fn repository(image: &ImageRef) -> anyhow::Result<ImageRef> {
    Ok(ImageRef::repository(image.host(), image.repository_name())?)
}

/// One pull inside its lease.
struct Pull<'a> {
    containerd: Containerd,
    lease: &'a Lease,
    registry: &'a RegistryClient,
    image: &'a ImageRef,
    name: &'a str,
    snapshotter: &'a str,
    progress: &'a Progress,
}

impl Pull<'_> {
    async fn run(&self, resolved: &Resolved) -> anyhow::Result<Vec<LayerReport>> {
        self.store_metadata(resolved).await?;
        let chains = ChainId::all(&resolved.diff_ids);
        let reports = self.unpack_layers(resolved, &chains).await?;
        let top = chains.last().context("an image without layers")?;
        // As containerd's unpacker does: the config holds the unpacked chain against GC.
        let snapshot_ref = BTreeMap::from([(
            format!("{}{}", labels::GC_SNAPSHOT_PREFIX, self.snapshotter),
            top.to_string(),
        )]);
        ContentStore::new(&self.containerd)
            .set_labels(&resolved.parsed.config.digest, &snapshot_ref)
            .await?;
        self.record_image(resolved.target()).await?;
        Ok(reports)
    }

    /// Labels every blob gets: where it came from, so containerd can mount it across
    /// repositories of that registry when pushing.
    fn source_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(
            format!(
                "{}{}",
                labels::DISTRIBUTION_SOURCE_PREFIX,
                self.image.host()
            ),
            self.image.repository_name().to_owned(),
        )])
    }

    /// Index, manifest and config, each labelled with the GC references to its children.
    async fn store_metadata(&self, resolved: &Resolved) -> anyhow::Result<()> {
        let mut store = ContentStore::new(&self.containerd);
        let manifest = &resolved.manifest.descriptor;
        if let Some(index) = &resolved.index {
            let mut labels = self.source_labels();
            labels.insert(
                format!("{}0", labels::GC_MANIFEST_PREFIX),
                manifest.digest.to_string(),
            );
            self.put(&mut store, &index.descriptor.digest, &index.bytes, &labels)
                .await
                .context("store the index")?;
        }
        let mut labels = self.source_labels();
        labels.insert(
            labels::GC_CONFIG.to_owned(),
            resolved.parsed.config.digest.to_string(),
        );
        for (i, layer) in resolved.parsed.layers.iter().enumerate() {
            labels.insert(
                format!("{}{i}", labels::GC_LAYER_PREFIX),
                layer.digest.to_string(),
            );
        }
        self.put(
            &mut store,
            &manifest.digest,
            &resolved.manifest.bytes,
            &labels,
        )
        .await
        .context("store the manifest")?;
        self.put(
            &mut store,
            &resolved.parsed.config.digest,
            &resolved.config,
            &self.source_labels(),
        )
        .await
        .context("store the config")?;
        Ok(())
    }

    async fn put(
        &self,
        store: &mut ContentStore,
        digest: &Digest,
        bytes: &[u8],
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        if store.put(digest, bytes, labels).await? == Stored::Present {
            self.containerd
                .add_to_lease(self.lease, "content", digest.as_str())
                .await?;
        }
        Ok(())
    }

    async fn unpack_layers(
        &self,
        resolved: &Resolved,
        chains: &[ChainId],
    ) -> anyhow::Result<Vec<LayerReport>> {
        let layers = &resolved.parsed.layers;
        let image_labels = ImageLabels {
            reference: self.name,
            manifest: &resolved.manifest.descriptor.digest,
            layers,
        };
        let repository = repository(self.image)?;
        let blob_labels = self.source_labels();
        let unpacker = Unpacker {
            containerd: &self.containerd,
            lease: self.lease,
            snapshotter: self.snapshotter,
            registry: self.registry,
            repository: &repository,
            blob_labels: &blob_labels,
        };
        let mut reports = Vec::with_capacity(layers.len());
        for (i, descriptor) in layers.iter().enumerate() {
            let started = Instant::now();
            self.progress
                .start(i + 1, layers.len(), &descriptor.digest, descriptor.size);
            let layer = Layer {
                descriptor,
                diff_id: &resolved.diff_ids[i],
                chain: &chains[i],
                parent: i.checked_sub(1).map(|parent| &chains[parent]),
                labels: image_labels.prepare(i, &chains[i]),
            };
            let outcome = unpacker
                .unpack(&layer, &|bytes| self.progress.bytes(bytes))
                .await
                .with_context(|| {
                    format!(
                        "unpack layer {}/{} {}",
                        i + 1,
                        layers.len(),
                        descriptor.digest
                    )
                })?;
            let report = LayerReport {
                position: i + 1,
                count: layers.len(),
                digest: descriptor.digest.clone(),
                outcome,
                lazy_format: labels::lazy_format(descriptor),
                elapsed: started.elapsed(),
            };
            self.progress.line(&report);
            reports.push(report);
        }
        Ok(reports)
    }

    /// Creates the image record, or points an existing one at what was just pulled.
    async fn record_image(&self, target: &image::Descriptor) -> anyhow::Result<()> {
        let image = Image {
            name: self.name.to_owned(),
            target: Some(ApiDescriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.to_string(),
                size: i64::try_from(target.size).context("manifest size exceeds i64")?,
                annotations: Default::default(),
            }),
            ..Image::default()
        };
        let mut images = self.containerd.images();
        let request = CreateImageRequest {
            image: Some(image.clone()),
        };
        match images.create(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                let request = UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_owned()],
                    }),
                };
                images
                    .update(request)
                    .await
                    .or_status(|| format!("update image {}", self.name))?;
                Ok(())
            }
            Err(status) => Err(status).or_status(|| format!("create image {}", self.name)),
        }
    }
}
