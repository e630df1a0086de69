//! TLS for `wss://` URLs: rustls with the ring provider (the one provider
//! of the workspace; named explicitly, so a build that also links
//! aws-lc-rs does not panic choosing a default).
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::ClientError;

fn builder(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Trusts the Mozilla roots bundled by `webpki-roots`: the default for
/// `wss://` (public certificates).
pub fn webpki_roots() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Building from the bundled roots with ring's safe defaults cannot fail.
    builder(roots).expect("ring supports the default protocol versions")
}

/// Trusts only the CA certificates in `pem` (a private PKI, or a test CA).
pub fn custom_ca(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("CA file has no certificate".into()));
    }
    builder(roots)
}

/// TLS handshake with the edge named `host`.
pub(super) async fn handshake(
    tcp: TcpStream,
    host: &str,
    config: Option<Arc<rustls::ClientConfig>>,
) -> Result<Io, ClientError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Tls(format!("server name {host:?}: {e}")))?;
    let config = config.unwrap_or_else(webpki_roots);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(ClientError::Io)?;
    Ok(Io::Tls(Box::new(tls)))
}

/// The bytes under the WebSocket: TCP, or TLS over it.
#[derive(Debug)]
pub(super) enum Io {
    Plain(TcpStream),
    /// Boxed: a TLS session is much larger than a socket.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ca_refuses_files_without_certificates() {
        assert!(matches!(custom_ca(b""), Err(ClientError::Tls(_))));
        assert!(matches!(custom_ca(b"not pem"), Err(ClientError::Tls(_))));
    }

    #[test]
    fn webpki_roots_are_not_empty() {
        let _ = webpki_roots();
        assert!(!webpki_roots::TLS_SERVER_ROOTS.is_empty());
    }
}
