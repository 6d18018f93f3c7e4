//! A distribution registry (Debian's `docker-registry`) on loopback, storing into the fixture,
//! with a counting proxy in front.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{loopback_addr, wait_until, Fixture};
use crate::process::Process;
use crate::proxy::CountingProxy;

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    addr: SocketAddr,
    storage: PathBuf,
    proxy: CountingProxy,
    _process: Process,
}

/// The one account of a registry that wants credentials ([`Registry::start_private`]).
pub const PRIVATE_USER: &str = "kubelet";
pub const PRIVATE_PASSWORD: &str = "shoal-pull-secret";
/// bcrypt (cost 5) of [`PRIVATE_PASSWORD`], as docker-registry's htpasswd file wants it; made
/// once with Python's `crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))`.
const PRIVATE_HTPASSWD: &str =
    "kubelet:$2b$05$yeU90AUihOVu0zBBkuAxlu77scIleE97lkfRWs5jOaw3Rw3SvaSs.\n";

impl Registry {
    pub fn start(fixture: &Fixture) -> Result<Registry> {
        Registry::start_with(fixture, "")
    }

    /// A registry that answers every request without [`PRIVATE_USER`]'s basic credentials
    /// with 401 (htpasswd authentication).
    pub fn start_private(fixture: &Fixture) -> Result<Registry> {
        let htpasswd = fixture.path("registry/htpasswd");
        fs::create_dir_all(fixture.path("registry"))?;
        fs::write(&htpasswd, PRIVATE_HTPASSWD)
            .with_context(|| format!("write {}", htpasswd.display()))?;
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
            htpasswd.display()
        );
        Registry::start_with(fixture, &auth)
    }

    fn start_with(fixture: &Fixture, auth: &str) -> Result<Registry> {
        let addr = loopback_addr(5000);
        let storage = fixture.mkdir("registry/data")?;
        let config = fixture.path("registry/config.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{auth}",
            storage.display()
        );
        fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let log = fixture.path("registry/registry.log");
        fixture.register_log("docker-registry", &log);
        let mut command = Command::new(REGISTRY_BINARY);
        command.arg("serve").arg(&config);
        let mut process = Process::spawn("docker-registry", &mut command, &log)?;
        wait_until("the registry to listen", Duration::from_secs(20), || {
            if let Some(status) = process.try_status()? {
                anyhow::bail!("docker-registry exited ({status}):\n{}", process.log());
            }
            Ok(TcpStream::connect(addr).is_ok())
        })?;
        let proxy = CountingProxy::start(addr)?;
        Ok(Registry {
            addr,
            storage,
            proxy,
            _process: process,
        })
    }

    /// `127.0.0.1:<port>` of the registry itself, bypassing the proxy.
    pub fn direct_host(&self) -> String {
        self.addr.to_string()
    }

    /// `127.0.0.1:<port>` of the counting proxy: what clients under test should pull from.
    pub fn host(&self) -> String {
        self.proxy.addr().to_string()
    }

    pub fn proxy(&self) -> &CountingProxy {
        &self.proxy
    }

    /// Where the registry stores the blob `sha256:<hex>` (the file it serves).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64)
            .with_context(|| format!("not a sha256 digest: {digest}"))?;
        Ok(self
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }
}
