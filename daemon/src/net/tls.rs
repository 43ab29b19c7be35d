//! libp2p's TLS handshake (`/tls/1.0.0`, as the `libp2p-tls` crate speaks
//! it) with AES-GCM preferred over ChaCha20-Poly1305.
//!
//! `libp2p-tls` fixes its cipher suites with ChaCha20 first, and a TLS 1.3
//! server follows the client's order, so every libp2p TLS connection uses
//! ChaCha20, as noise does. On a CPU with AES instructions AES-GCM costs a
//! fraction of it: profiled (perf) in an uncapped 1 GiB pull here, the
//! cipher's share of each daemon's CPU fell from about a quarter to a
//! twentieth. This
//! upgrade builds the same certificates and checks them the same way
//! (with `libp2p-tls`'s own `certificate` module), offering the same three
//! suites in the order this CPU prefers, so it interoperates with any
//! libp2p TLS peer: a connection it dials uses AES-GCM; one dialled by a
//! stock peer uses the dialler's first choice.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::core::UpgradeInfo;
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use libp2p::PeerId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::{self, cipher_suite};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The protocol name libp2p's TLS handshake is negotiated under.
const PROTOCOL: &str = "/tls/1.0.0";
/// The ALPN token libp2p's TLS handshake requires.
const ALPN: &[u8] = b"libp2p";

/// Why a TLS upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The handshake failed (including a certificate that failed its checks).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The peer's certificate is not a libp2p certificate.
    #[error("TLS certificate: {0}")]
    Certificate(#[from] certificate::ParseError),
}

/// The TLS security upgrade: one certificate made from the identity key,
/// TLS 1.3 only, both sides authenticated.
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl Config {
    /// The upgrade for `identity`.
    pub fn new(identity: &Keypair) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mut provider = aws_lc_rs::default_provider();
        provider.cipher_suites = vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let provider = Arc::new(provider);
        let verifier = Arc::new(Libp2pVerifier);

        // One certificate for both roles. Not through `with_single_cert`:
        // its check of the certificate refuses libp2p's critical extension.
        let (cert, key) = certificate::generate(identity)?;
        let signing = provider.key_provider.load_private_key(key)?;
        let certified = Arc::new(SingleCertAndKey::from(CertifiedKey::new(
            vec![cert],
            signing,
        )));

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(certified.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(certified);
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The handshake's specification: no server name is sent (an
            // unspecified address turns SNI off); the dialled peer id is
            // checked by the swarm against the one the certificate gives.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The peer id the one certificate the verifier let through names.
fn peer_of(state: &rustls::CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => Ok(certificate::parse(cert)?.peer_id()),
        _ => Err(TlsError::Handshake(std::io::Error::other(
            "the peer presented no single certificate",
        ))),
    }
}

/// Checks what libp2p's handshake requires of a certificate, for either
/// side: exactly one, self-signed, with a libp2p extension that signs its
/// key with the peer's identity key; the handshake signed by that key.
#[derive(Debug)]
struct Libp2pVerifier;

impl Libp2pVerifier {
    fn check(
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity).map_err(|e| bad_certificate(&e))?;
        Ok(())
    }

    fn tls13_signature(
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)
            .map_err(|e| bad_certificate(&e))?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        // The ones a libp2p certificate's key may use, elliptic curves
        // first, as libp2p's own verifier lists them.
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

fn bad_certificate(e: &certificate::ParseError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(e.to_string()),
    ))))
}

/// The handshake-signature methods both verifier traits declare alike:
/// TLS 1.3's checked with the certificate's key, TLS 1.2's refused (it is
/// never configured, so never asked for).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Self::schemes()
        }
    };
}

impl ServerCertVerifier for Libp2pVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for Libp2pVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    type Socket = Compat<tokio::net::TcpStream>;

    async fn sockets() -> (Socket, Socket) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialled, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (dialled.unwrap().compat(), accepted.unwrap().0.compat())
    }

    fn suite(stream: &TlsStream<Socket>) -> CipherSuite {
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .expect("a finished handshake")
            .suite()
    }

    /// Dials with `client` and accepts with `server`; returns the peer id
    /// each learnt and the suite they chose.
    async fn handshake<A, B>(client: A, server: B) -> (PeerId, PeerId, CipherSuite)
    where
        A: OutboundConnectionUpgrade<Socket, Output = (PeerId, TlsStream<Socket>)>
            + UpgradeInfo<Info = &'static str>,
        B: InboundConnectionUpgrade<Socket, Output = (PeerId, TlsStream<Socket>)>
            + UpgradeInfo<Info = &'static str>,
        A::Error: std::fmt::Debug,
        B::Error: std::fmt::Debug,
    {
        let (dialled, accepted) = sockets().await;
        let (out, inb) = tokio::join!(
            client.upgrade_outbound(dialled, PROTOCOL),
            server.upgrade_inbound(accepted, PROTOCOL)
        );
        let ((server_id, out), (client_id, inb)) = (out.unwrap(), inb.unwrap());
        assert_eq!(suite(&out), suite(&inb));
        (server_id, client_id, suite(&out))
    }

    #[tokio::test]
    async fn two_daemons_agree_on_aes_gcm_and_learn_each_others_ids() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (server, client, suite) =
            handshake(Config::new(&a).unwrap(), Config::new(&b).unwrap()).await;
        assert_eq!(server, b.public().to_peer_id());
        assert_eq!(client, a.public().to_peer_id());
        assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    /// Any libp2p TLS peer is a peer: the dialler's first choice wins.
    #[tokio::test]
    async fn a_stock_libp2p_tls_peer_is_understood_both_ways() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let stock = libp2p::tls::Config::new(&b).unwrap();
        let (server, _, suite) = handshake(Config::new(&a).unwrap(), stock.clone()).await;
        assert_eq!(server, b.public().to_peer_id());
        assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
        let (server, client, suite) = handshake(stock, Config::new(&a).unwrap()).await;
        assert_eq!(server, a.public().to_peer_id());
        assert_eq!(client, b.public().to_peer_id());
        assert_eq!(suite, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }

    /// A client that presents `chain` for `identity`'s key.
    fn presenting(
        identity: &Keypair,
        chain: impl FnOnce(CertificateDer<'static>) -> Vec<CertificateDer<'static>>,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let (cert, key) = certificate::generate(identity).unwrap();
        let signing = provider.key_provider.load_private_key(key).unwrap();
        let certified = SingleCertAndKey::from(CertifiedKey::new(chain(cert), signing));
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libp2pVerifier))
            .with_client_cert_resolver(Arc::new(certified));
        client.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(client)
    }

    #[tokio::test]
    async fn a_peer_without_one_valid_libp2p_certificate_is_refused() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let bad: [Box<dyn FnOnce(CertificateDer<'static>) -> Vec<CertificateDer<'static>>>; 2] = [
            Box::new(|c| vec![c.clone(), c]),
            Box::new(|_| vec![CertificateDer::from(vec![0x30, 3, 1, 2, 3])]),
        ];
        for chain in bad {
            let client = presenting(&b, chain);
            let (dialled, accepted) = sockets().await;
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let (out, inb) = tokio::join!(
                futures_rustls::TlsConnector::from(client).connect(name, dialled),
                Config::new(&a).unwrap().upgrade_inbound(accepted, PROTOCOL)
            );
            assert!(inb.is_err(), "the server accepted a bad certificate");
            // The client learns of it at its first read at the latest.
            if let Ok(mut s) = out {
                let mut byte = [0u8; 1];
                assert!(futures::AsyncReadExt::read(&mut s, &mut byte)
                    .await
                    .map_or(true, |n| n == 0));
            }
        }
    }
}
