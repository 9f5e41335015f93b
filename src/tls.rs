//! TLS material: the server config for an HTTPS client port, and the client
//! config the gateway uses towards Knoq.
//!
//! Only rustls' `ring` provider is used, passed explicitly, so the build
//! needs no cmake or clang (aws-lc-rs would) and no process-wide default
//! provider has to be installed.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;
use crate::secrets::read_secret_file;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Builds the HTTPS config for the clients' port (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let certs = read_certs(&files.cert)?;
    let key_pem = read_secret_file(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("{} holds no PEM private key", files.key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Builds the client config towards Knoq: the platform's trust roots plus
/// `ca_file`. ALPN is left empty: the HTTPS connector fills it in.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let extra = match ca_file {
        Some(path) => read_certs(path)?,
        None => Vec::new(),
    };
    client_config_with(&extra, ca_file)
}

/// As [`client_config`], with `ca_file`'s certificates already read (so a
/// reload can tell whether they changed, reading the file once).
pub fn client_config_with(
    extra: &[CertificateDer<'static>],
    ca_file: Option<&Path>,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A platform store may hold a certificate rustls cannot parse; skip it.
        let _ = roots.add(cert);
    }
    for cert in extra {
        roots.add(cert.clone()).map_err(|e| {
            let file = ca_file.map_or_else(String::new, |p| format!("{}: ", p.display()));
            format!("{file}not a usable CA certificate: {e}")
        })?;
    }
    if roots.is_empty() {
        return Err(
            "no trust roots: the platform store is empty (install ca-certificates) and no upstream.ca_file is set"
                .to_string(),
        );
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
