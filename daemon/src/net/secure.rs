//! A TCP connection's security handshake: TLS ([`super::tls`]) or noise,
//! both accepted, the configured one offered first when dialling.

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncWrite, FutureExt, TryFutureExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::core::UpgradeInfo;
use libp2p::identity::Keypair;
use libp2p::{noise, PeerId};

use super::tls;

/// The security handshake of a TCP connection (QUIC has its own TLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// libp2p's TLS 1.3 with AES-GCM first ([`tls`]): on a CPU with AES
    /// instructions a fraction of noise's cost per byte.
    #[default]
    Tls,
    /// libp2p's noise (ChaCha20-Poly1305), which every libp2p peer speaks.
    Noise,
}

impl Security {
    /// The name flags and reports spell it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Noise => "noise",
        }
    }
}

/// Both handshakes, `first` proposed first by a dialler; a listener
/// takes whichever the dialler proposes.
#[derive(Clone)]
pub struct Handshakes {
    first: Security,
    tls: tls::Config,
    noise: noise::Config,
}

impl Handshakes {
    /// Both handshakes for `identity`.
    pub fn new(
        identity: &Keypair,
        first: Security,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self {
            first,
            tls: tls::Config::new(identity)?,
            noise: noise::Config::new(identity)?,
        })
    }
}

const TLS: &str = "/tls/1.0.0";
const NOISE: &str = "/noise";

impl UpgradeInfo for Handshakes {
    type Info = &'static str;
    type InfoIter = [&'static str; 2];

    fn protocol_info(&self) -> Self::InfoIter {
        match self.first {
            Security::Tls => [TLS, NOISE],
            Security::Noise => [NOISE, TLS],
        }
    }
}

/// Either handshake's stream.
pub type Secured<C> = Either<futures_rustls::TlsStream<C>, noise::Output<C>>;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// TLS failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Noise failed.
    #[error("noise handshake: {0}")]
    Noise(#[from] noise::Error),
}

impl<C> InboundConnectionUpgrade<C> for Handshakes
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = HandshakeError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        if info == TLS {
            self.tls
                .upgrade_inbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .err_into()
                .boxed()
        } else {
            self.noise
                .upgrade_inbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .err_into()
                .boxed()
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for Handshakes
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = HandshakeError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        if info == TLS {
            self.tls
                .upgrade_outbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .err_into()
                .boxed()
        } else {
            self.noise
                .upgrade_outbound(socket, info)
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .err_into()
                .boxed()
        }
    }
}
