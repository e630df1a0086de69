//! WSS: rustls over the listener, with certificates that can be replaced
//! while the edge runs. A reload (SIGHUP) builds a new server config from
//! the files; new handshakes use it, open sockets keep the session they
//! negotiated. A reload that fails keeps the old certificate.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

/// The certificate and key files of `--tls-cert-file` / `--tls-key-file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

pub(crate) struct Tls {
    files: TlsFiles,
    current: RwLock<TlsAcceptor>,
}

/// Builds a server config from the files, with the ring provider (two
/// providers are linked into test builds; see DEPS.md).
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let read_err = |p: &Path, e: rustls_pki_types::pem::Error| format!("{}: {e}", p.display());
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read_err(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(&files.cert, e))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| read_err(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    // WebSocket upgrades are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    pub(crate) fn load(files: TlsFiles) -> Result<Tls, String> {
        let acceptor = TlsAcceptor::from(server_config(&files)?);
        Ok(Tls {
            files,
            current: RwLock::new(acceptor),
        })
    }

    /// The acceptor for a new connection.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again; on error the current certificate stays.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let acceptor = TlsAcceptor::from(server_config(&self.files)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        Ok(())
    }
}
