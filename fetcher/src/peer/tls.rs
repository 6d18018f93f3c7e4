//! Mutual TLS between peers (`peers.tls`): both ends present a certificate signed by the
//! configured CA, and a client without one is refused during the handshake, before any
//! request is read.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shoal_config::PeerTls;
use tokio_rustls::TlsAcceptor;

use super::error::PeerError;

fn read(path: &Path) -> Result<Vec<u8>, PeerError> {
    std::fs::read(path).map_err(|source| PeerError::ReadPeerTls {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: impl ToString) -> PeerError {
    PeerError::ParsePeerTls {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PeerError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, e))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The peer client's side: trust only `ca`, present `cert` and `key`.
pub fn client(
    builder: reqwest::ClientBuilder,
    tls: &PeerTls,
) -> Result<reqwest::ClientBuilder, PeerError> {
    let ca = reqwest::Certificate::from_pem(&read(&tls.ca)?).map_err(|e| invalid(&tls.ca, e))?;
    let mut identity = read(&tls.cert)?;
    identity.push(b'\n');
    identity.extend_from_slice(&read(&tls.key)?);
    let identity = reqwest::Identity::from_pem(&identity).map_err(|e| invalid(&tls.cert, e))?;
    Ok(builder
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(identity))
}

/// The listener's side: present `cert`, require a client certificate signed by `ca`.
pub fn acceptor(tls: &PeerTls) -> Result<TlsAcceptor, PeerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&tls.ca)? {
        roots.add(cert).map_err(|e| invalid(&tls.ca, e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| invalid(&tls.ca, e))?;
    let key_pem = read(&tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(&tls.key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&tls.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&tls.cert)?, key)
        .map_err(|e| invalid(&tls.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
