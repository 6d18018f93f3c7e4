//! Who can reach the peer listener: it hands out cached layer bytes, so without TLS it stays
//! on loopback unless the file asks for more in so many words (`peers.insecure`).

use crate::error::ConfigError;
use crate::peers::PeersConfig;

/// Without TLS a listener serves whoever reaches it from a member's address, so one that
/// anything but this host can reach must be asked for (`insecure`).
pub(crate) fn check(peers: &PeersConfig) -> Result<(), ConfigError> {
    let listen = peers.listen;
    match (&peers.tls, peers.insecure) {
        (Some(_), true) => Err(ConfigError::invalid(
            "peers.insecure",
            "a listener with `tls` is not insecure: drop one of them",
        )),
        (None, false) if !listen.ip().is_loopback() => Err(ConfigError::invalid(
            "peers.listen",
            format!(
                "{listen} without `tls` would serve cached blocks to anyone who can reach it: \
                 set `tls` (mutual TLS), listen on loopback, or set `insecure = true` to serve \
                 members by their address alone"
            ),
        )),
        _ => Ok(()),
    }
}
