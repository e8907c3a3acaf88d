//! TLS with rustls (ring): the client-facing acceptor (certificate and key
//! re-read on every reload) and the server-facing connector
//! (`cluster.server_tls_mode`), plus the `tls-server-end-point` channel
//! binding data for SCRAM-SHA-256-PLUS.

use crate::config::ServerTlsMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client-facing TLS: the acceptor and the certificate's channel binding.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// tls-server-end-point (RFC 5929): hash of our certificate.
    pub end_point: Vec<u8>,
}

impl ServerTls {
    /// The client-facing TLS of a `[listen]` section (None when disabled).
    pub fn from_config(listen: &crate::config::Listen) -> Result<Option<Arc<ServerTls>>, String> {
        if listen.tls_mode() == crate::config::TlsMode::Disable {
            return Ok(None);
        }
        match (&listen.tls_cert, &listen.tls_key) {
            (Some(c), Some(k)) => ServerTls::load(c, k).map(|t| Some(Arc::new(t))),
            _ => Err("listen.tls_mode: TLS needs listen.tls_cert and listen.tls_key".into()),
        }
    }

    /// Loads a PEM certificate chain and private key.
    pub fn load(cert_path: &str, key_path: &str) -> Result<ServerTls, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| format!("listen.tls_cert {cert_path}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("listen.tls_cert {cert_path}: {e}"))?;
        let first = certs.first().ok_or_else(|| format!("listen.tls_cert {cert_path}: no certificate in the file"))?;
        let end_point = end_point_hash(first.as_ref());
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| format!("listen.tls_key {key_path}: {e}"))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("listen.tls_cert/tls_key: {e}"))?;
        Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), end_point })
    }
}

/// tls-server-end-point data of a client-side TLS connection: the hash of
/// the server's certificate (none before the handshake).
pub fn server_end_point(conn: &rustls::ClientConnection) -> Option<Vec<u8>> {
    conn.peer_certificates().and_then(|c| c.first()).map(|c| end_point_hash(c.as_ref()))
}

/// RFC 5929 tls-server-end-point: the certificate hashed with its
/// signature's hash function, SHA-256 for MD5/SHA-1/SHA-256.
pub fn end_point_hash(der: &[u8]) -> Vec<u8> {
    // The outer signatureAlgorithm is the last AlgorithmIdentifier; look
    // for SHA-384/512 signature OIDs (RSA PKCS#1, RSA-PSS is rare here, ECDSA).
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    let tail = &der[der.len().saturating_sub(600)..];
    let has = |oids: [&[u8]; 2]| oids.iter().any(|o| tail.windows(o.len()).any(|w| w == *o));
    if has(SHA512) {
        sha2::Sha512::digest(der).to_vec()
    } else if has(SHA384) {
        sha2::Sha384::digest(der).to_vec()
    } else {
        sha2::Sha256::digest(der).to_vec()
    }
}

/// Server-facing TLS settings for one configuration.
pub struct ClientTls {
    pub mode: ServerTlsMode,
    pub connector: tokio_rustls::TlsConnector,
}

impl ClientTls {
    /// `ca`: PEM file of trusted roots, required for verify-full.
    pub fn new(mode: ServerTlsMode, ca: Option<&str>) -> Result<Option<Arc<ClientTls>>, String> {
        if mode == ServerTlsMode::Disable {
            return Ok(None);
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = if mode == ServerTlsMode::VerifyFull {
            let path = ca.ok_or("cluster.server_tls_mode = \"verify-full\" needs cluster.server_tls_ca")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("cluster.server_tls_ca {path}: {e}"))? {
                let cert = cert.map_err(|e| format!("cluster.server_tls_ca {path}: {e}"))?;
                roots.add(cert).map_err(|e| format!("cluster.server_tls_ca {path}: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            // prefer / require: encrypted, the server's identity not checked
            // (like libpq's sslmode=require).
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth()
        };
        Ok(Some(Arc::new(ClientTls { mode, connector: tokio_rustls::TlsConnector::from(Arc::new(config)) })))
    }

    /// The name a server certificate must carry: the host part of `addr`.
    pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))
    }
}

/// Accepts any server certificate (sslmode=require semantics); the
/// handshake signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects tokio-postgres (the monitor, auth_query) the way pool
/// connections do: with `cluster.server_tls_mode` when set. The
/// connection's driver runs in its own task.
pub async fn connect_pg(mut cfg: tokio_postgres::Config, tls: Option<Arc<ClientTls>>) -> Result<tokio_postgres::Client, String> {
    let Some(tls) = tls else {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        return Ok(client);
    };
    cfg.ssl_mode(if tls.mode == ServerTlsMode::Prefer {
        tokio_postgres::config::SslMode::Prefer
    } else {
        tokio_postgres::config::SslMode::Require
    });
    let (client, conn) = cfg.connect(MonitorTls(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// Server-facing TLS for tokio-postgres connections.
#[derive(Clone)]
pub struct MonitorTls(pub Arc<ClientTls>);

pub struct MonitorConnect {
    tls: Arc<ClientTls>,
    name: ServerName<'static>,
}

/// A TLS session as tokio-postgres wants it (no channel binding offered).
pub struct MonitorStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MonitorTls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MonitorStream<S>;
    type TlsConnect = MonitorConnect;
    type Error = String;

    fn make_tls_connect(&mut self, domain: &str) -> Result<MonitorConnect, String> {
        Ok(MonitorConnect { tls: self.0.clone(), name: ClientTls::server_name(domain)? })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for MonitorConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MonitorStream<S>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<MonitorStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.tls.connector.connect(self.name, stream).await.map(MonitorStream) })
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for MonitorStream<S> {
    /// The server certificate's hash, so the monitor's and auth_query's
    /// SCRAM logins are bound to the channel as the pools' are.
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        server_end_point(self.0.get_ref().1).map_or_else(tokio_postgres::tls::ChannelBinding::none, tokio_postgres::tls::ChannelBinding::tls_server_end_point)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for MonitorStream<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MonitorStream<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
