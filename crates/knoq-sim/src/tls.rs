//! The simulator's TLS: a fresh self-signed certificate, a stable one kept in
//! a directory (see `files`), or one from files; ALPN `h2` then `http/1.1`,
//! rustls with the ring provider.
//!
//! The provider is passed explicitly so no process-wide default provider has
//! to be installed (and none installed elsewhere can conflict).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::config::SimTls;
use super::files;

/// Names the self-signed certificate is valid for.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What the listener needs to speak the configured protocol.
pub(super) struct TlsSetup {
    /// `None`: plain HTTP.
    pub(super) acceptor: Option<TlsAcceptor>,
    /// PEM of the self-signed certificate (fresh or stable), for clients to trust.
    pub(super) ca_pem: Option<String>,
}

/// Builds the acceptor for `tls`. Errors are `InvalidInput`/`InvalidData`
/// with a message naming the file or the step that failed.
pub(super) fn setup(tls: &SimTls) -> io::Result<TlsSetup> {
    match tls {
        SimTls::Plain => Ok(TlsSetup {
            acceptor: None,
            ca_pem: None,
        }),
        SimTls::SelfSigned => {
            let certified = self_signed()?;
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
            let config = server_config(vec![certified.cert.der().clone()], key)?;
            Ok(TlsSetup {
                acceptor: Some(TlsAcceptor::from(Arc::new(config))),
                ca_pem: Some(certified.cert.pem()),
            })
        }
        SimTls::SelfSignedIn(dir) => {
            let pair = files::load_or_create(dir, || {
                let certified = self_signed()?;
                Ok((certified.cert.pem(), certified.key_pair.serialize_pem()))
            })?;
            let config = server_config(pair.certs, pair.key).map_err(|e| {
                invalid_data(format!(
                    "certificate directory {}: {e}; remove {} and {} to make a new pair",
                    dir.display(),
                    dir.join(files::CERT_FILE).display(),
                    dir.join(files::KEY_FILE).display()
                ))
            })?;
            if pair.created {
                info!(dir = %dir.display(), "simulated Knoq: made a self-signed certificate to keep");
            } else {
                debug!(dir = %dir.display(), "simulated Knoq: reusing the kept self-signed certificate");
            }
            Ok(TlsSetup {
                acceptor: Some(TlsAcceptor::from(Arc::new(config))),
                ca_pem: Some(pair.cert_pem),
            })
        }
        SimTls::Files { cert, key } => {
            let certs = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| invalid_data(format!("reading private key {}: {e}", key.display())))?;
            let config = server_config(certs, key)?;
            Ok(TlsSetup {
                acceptor: Some(TlsAcceptor::from(Arc::new(config))),
                ca_pem: None,
            })
        }
    }
}

/// A new self-signed certificate for [`SELF_SIGNED_NAMES`].
fn self_signed() -> io::Result<rcgen::CertifiedKey> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|n| n.to_string()).collect();
    rcgen::generate_simple_self_signed(names)
        .map_err(|e| other(format!("generating a self-signed certificate: {e}")))
}

fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid_data(format!("reading certificates {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid_data(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> io::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| other(format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid_data(format!("TLS certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}
