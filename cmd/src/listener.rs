//! The unix sockets Shoal serves (the snapshotter's, the CRI proxy's): root's alone, a stale
//! one (nobody answers on it) replaced, a live one refused rather than taken over.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};

/// Binds `socket`, the value of the setting `field`, with mode 0600: its clients (containerd,
/// kubelet) run as root, and nobody else has business on it.
pub async fn bind_private(socket: &Path, field: &str) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!(
                "{field} {} is served by another process; stop it or choose another socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("remove stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(listener)
}
