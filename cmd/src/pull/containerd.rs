//! A connection to containerd's gRPC socket whose every request is scoped to a namespace and,
//! once one is taken, to a lease that keeps what the pull writes safe from garbage collection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    AddResourceRequest, CreateRequest, DeleteRequest, PluginsRequest, Resource,
};
use containerd_client::tonic::metadata::AsciiMetadataValue;
use containerd_client::tonic::service::interceptor::InterceptedService;
use containerd_client::tonic::service::Interceptor;
use containerd_client::tonic::transport::{Channel, Endpoint, Uri};
use containerd_client::tonic::{Request, Status};

use super::labels::GC_EXPIRE;

/// containerd reads the namespace of every request from this gRPC metadata key.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// ... and the lease new content and snapshots are added to from this one.
const LEASE_HEADER: &str = "containerd-lease";
const SNAPSHOTTER_PLUGIN_TYPE: &str = "io.containerd.snapshotter.v1";
/// A lease that outlives a crashed pull is collected after this long.
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// Adds the namespace and lease headers to each request.
#[derive(Clone)]
pub struct Scope {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Interceptor for Scope {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert(LEASE_HEADER, lease.clone());
        }
        Ok(request)
    }
}

pub type Scoped = InterceptedService<Channel, Scope>;

/// containerd's services over one connection, in one namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    scope: Scope,
}

impl Containerd {
    pub async fn connect(address: &Path, namespace: &str) -> anyhow::Result<Containerd> {
        let namespace: AsciiMetadataValue = namespace
            .parse()
            .with_context(|| format!("namespace `{namespace}` is not a valid header value"))?;
        let path: PathBuf = address.to_owned();
        // The URI is required by tonic but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .with_context(|| {
                format!(
                    "connect to containerd at {} (is it running? see --address)",
                    address.display()
                )
            })?;
        Ok(Containerd {
            channel,
            scope: Scope {
                namespace,
                lease: None,
            },
        })
    }

    /// The same connection with every request inside `lease`.
    pub fn within(&self, lease: &Lease) -> anyhow::Result<Containerd> {
        let lease = lease
            .id
            .parse()
            .context("lease id is not a valid header value")?;
        Ok(Containerd {
            channel: self.channel.clone(),
            scope: Scope {
                namespace: self.scope.namespace.clone(),
                lease: Some(lease),
            },
        })
    }

    fn scoped(&self) -> Scoped {
        InterceptedService::new(self.channel.clone(), self.scope.clone())
    }

    pub fn content(&self) -> ContentClient<Scoped> {
        ContentClient::new(self.scoped())
    }

    pub fn snapshots(&self) -> SnapshotsClient<Scoped> {
        SnapshotsClient::new(self.scoped())
    }

    pub fn diff(&self) -> DiffClient<Scoped> {
        DiffClient::new(self.scoped())
    }

    pub fn images(&self) -> ImagesClient<Scoped> {
        ImagesClient::new(self.scoped())
    }

    fn leases(&self) -> LeasesClient<Scoped> {
        LeasesClient::new(self.scoped())
    }

    /// Fails unless containerd has loaded a snapshotter called `name` (the error lists the
    /// ones it has); returns the socket containerd dials for it when it is a proxy plugin.
    pub async fn ensure_snapshotter(&self, name: &str) -> anyhow::Result<Option<PathBuf>> {
        let request = PluginsRequest {
            filters: vec![format!("type=={SNAPSHOTTER_PLUGIN_TYPE}")],
        };
        let plugins = IntrospectionClient::new(self.scoped())
            .plugins(request)
            .await
            .or_status(|| "list containerd's snapshotters".to_owned())?
            .into_inner()
            .plugins;
        match plugins.iter().find(|plugin| plugin.id == name) {
            Some(plugin) => match &plugin.init_err {
                Some(status) if status.code != 0 => bail!(
                    "containerd's snapshotter `{name}` failed to load: {}",
                    status.message
                ),
                // containerd exports a proxy plugin's socket as `address`.
                _ => Ok(plugin.exports.get("address").map(PathBuf::from)),
            },
            None => {
                let known: Vec<&str> = plugins.iter().map(|p| p.id.as_str()).collect();
                bail!(
                    "containerd has no snapshotter `{name}` (it has: {}); register Shoal as a \
                     proxy plugin in containerd's config",
                    known.join(", ")
                )
            }
        }
    }

    /// Takes a lease that expires on its own should this process die before deleting it.
    pub async fn create_lease(&self) -> anyhow::Result<Lease> {
        let now = SystemTime::now();
        let nanos = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let id = format!("shoal-rpull-{nanos}-{}", std::process::id());
        let expire = humantime::format_rfc3339_seconds(now + LEASE_EXPIRY).to_string();
        let request = CreateRequest {
            id: id.clone(),
            labels: HashMap::from([(GC_EXPIRE.to_owned(), expire)]),
        };
        self.leases()
            .create(request)
            .await
            .or_status(|| "create a containerd lease".to_owned())?;
        Ok(Lease { id })
    }

    /// Adds an existing resource to `lease`, so that it survives until the image refers to
    /// it; `kind` is `content` or `snapshots/<snapshotter>`.
    pub async fn add_to_lease(&self, lease: &Lease, kind: &str, id: &str) -> anyhow::Result<()> {
        let request = AddResourceRequest {
            id: lease.id.clone(),
            resource: Some(Resource {
                id: id.to_owned(),
                r#type: kind.to_owned(),
            }),
        };
        self.leases()
            .add_resource(request)
            .await
            .or_status(|| format!("add {kind} {id} to lease {}", lease.id))?;
        Ok(())
    }

    pub async fn delete_lease(&self, lease: &Lease) -> anyhow::Result<()> {
        let request = DeleteRequest {
            id: lease.id.clone(),
            sync: false,
        };
        self.leases()
            .delete(request)
            .await
            .or_status(|| format!("delete lease {}", lease.id))?;
        Ok(())
    }
}

/// Turns a gRPC status into an error naming the operation, containerd's message and the code
/// (tonic's own rendering of a status is a debug dump).
pub trait OrStatus<T> {
    fn or_status(self, what: impl FnOnce() -> String) -> anyhow::Result<T>;
}

impl<T> OrStatus<T> for Result<T, Status> {
    fn or_status(self, what: impl FnOnce() -> String) -> anyhow::Result<T> {
        self.map_err(|status| {
            anyhow::anyhow!("{}: {} ({:?})", what(), status.message(), status.code())
        })
    }
}

/// A containerd lease taken for one pull.
#[derive(Debug)]
pub struct Lease {
    id: String,
}
