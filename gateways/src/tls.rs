//! TLS for the adapters (rustls): the server configuration from PEM files, and a listener that
//! completes handshakes off the accept loop so one slow client never holds up the others.

use anyhow::Context;
use rustls_pki_types::UnixTime;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    self, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use tokio_rustls::server::TlsStream;

/// The `[gateway.tls]` section: without a certificate the TLS ports stay closed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain; empty: no TLS ports.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key.
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// Whether a certificate is configured, and so the TLS ports are served.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }

    /// The acceptor, or `None` when TLS is not configured.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> anyhow::Result<Option<TlsAcceptor>> {
        if !self.enabled() {
            return Ok(None);
        }
        let (cert, key) = (&self.cert_file, &self.key_file);
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading {}", key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(DeferredClientCert {
            provider: provider.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("the TLS certificate and key do not fit together")?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Some(TlsAcceptor::from(Arc::new(cfg))))
    }
}

/// Asks for a client certificate without requiring one, and checks only that the client holds
/// its key. Whether the certificate is trusted depends on the tenant, which is known only from
/// the certificate itself: the ingest pipeline checks it against the tenant's trust anchors.
#[derive(Debug)]
struct DeferredClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client certificate of a TLS connection (DER), if the client sent one.
pub fn client_certificate(stream: &TlsStream<TcpStream>) -> Option<Arc<Vec<u8>>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| Arc::new(c.to_vec()))
}

/// The cipher suite the TLS handshake settled on, by its IANA name (`TLS13_AES_128_GCM_SHA256`
/// and the like).
pub fn cipher_suite(stream: &TlsStream<TcpStream>) -> &'static str {
    stream
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or(crate::metrics::NO_CIPHER_SUITE)
}

/// Per-connection data the HTTPS handlers see (axum `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub client_cert: Option<Arc<Vec<u8>>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for TlsPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        TlsPeer {
            client_cert: client_certificate(stream.io()),
        }
    }
}

/// Handshakes longer than this are abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and yields them once their TLS handshake completed.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        // Bounded: while the server does not take connections, finished handshakes wait here.
        let (tx, ready) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, ready_tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready_tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            crate::metrics::rejected("tls", "handshake-failed");
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => crate::metrics::rejected("tls", "handshake-timeout"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { ready, local })
    }

    /// The bound address, for logs.
    pub fn local_addr_or_unknown(&self) -> SocketAddr {
        self.local
    }

    /// The next connection whose handshake completed; `None` once the listener is gone.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.ready.recv().await
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(c) => c,
            // The accept task never ends on its own; park if it ever did.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
