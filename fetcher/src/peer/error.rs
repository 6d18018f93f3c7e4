//! [`PeerError`]: what failed in setting up or keeping the peer side, one variant per
//! operation. Failures of one exchange with a peer are not errors of this kind: the peer is
//! penalised and the block fetched elsewhere ([`PeerFailure`](super::client::PeerFailure)).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("build http client for {host}")]
    BuildClient {
        host: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("read peer tls file {}", path.display())]
    ReadPeerTls {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse peer tls file {}: {reason}", path.display())]
    ParsePeerTls { path: PathBuf, reason: String },

    #[error("bind peer listener {address}")]
    BindPeerListener {
        address: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("save the shareable blocks to {}", path.display())]
    PersistShareable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
