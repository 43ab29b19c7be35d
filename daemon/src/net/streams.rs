//! Raw streams with admission: the libp2p behaviour under every Convoy
//! protocol.
//!
//! Each stream a peer opens is negotiated against the protocols it may
//! open *now*: before the network loop has admitted it, only the
//! [`open`](Behaviour::new) ones (the hello); after, all of them. A stream
//! of any other protocol fails its negotiation, so nothing of it is read.
//! Every negotiated stream reaches the loop as an event, in order, and
//! none is dropped: `libp2p-stream`, which this replaces, hands inbound
//! streams over a channel of one and drops the next while the loop is
//! busy, which lost control requests whenever two arrived at once.
//!
//! Streams are opened through a cloneable [`Opener`], on a connection the
//! peer already has (the loop dials and admits first).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, StreamUpgradeError,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

/// Open requests waiting for the swarm.
const OPEN_QUEUE: usize = 4096;

/// Peers admitted by the network loop, read by every connection handler
/// when a stream arrives.
type Admitted = Arc<Mutex<HashSet<PeerId>>>;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No connection to the peer (it closed, or was never made).
    #[error("not connected")]
    NotConnected,
    /// The peer does not take this protocol from us (now).
    #[error("the peer does not take {0} from us")]
    Unsupported(StreamProtocol),
    /// The negotiation failed or timed out.
    #[error("{0}")]
    Io(std::io::Error),
    /// The swarm has stopped.
    #[error("the network has shut down")]
    Shutdown,
}

/// A stream a peer opened.
#[derive(Debug)]
pub struct Inbound {
    /// Who opened it.
    pub peer: PeerId,
    /// Its protocol.
    pub protocol: StreamProtocol,
    /// The stream.
    pub stream: Stream,
}

type OpenReply = oneshot::Sender<Result<Stream, OpenError>>;

#[derive(Debug)]
struct Open {
    peer: PeerId,
    protocol: StreamProtocol,
    reply: OpenReply,
}

/// Opens streams to connected peers; cloneable, usable from any task.
#[derive(Clone, Debug)]
pub struct Opener {
    opens: mpsc::Sender<Open>,
}

impl Opener {
    /// Opens a `protocol` stream to `peer` on a connection it has.
    pub async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, OpenError> {
        let (reply, answer) = oneshot::channel();
        let open = Open {
            peer,
            protocol,
            reply,
        };
        self.opens
            .send(open)
            .await
            .map_err(|_| OpenError::Shutdown)?;
        answer.await.map_err(|_| OpenError::Shutdown)?
    }
}

/// The behaviour: see the module.
pub struct Behaviour {
    open: Vec<StreamProtocol>,
    gated: Vec<StreamProtocol>,
    admitted: Admitted,
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    opens: mpsc::Receiver<Open>,
    opener: Opener,
    inbound: VecDeque<Inbound>,
}

impl Behaviour {
    /// Peers may open `open` at any time and `gated` once admitted.
    pub fn new(open: Vec<StreamProtocol>, gated: Vec<StreamProtocol>) -> Self {
        let (tx, opens) = mpsc::channel(OPEN_QUEUE);
        Self {
            open,
            gated,
            admitted: Default::default(),
            connections: HashMap::new(),
            opens,
            opener: Opener { opens: tx },
            inbound: VecDeque::new(),
        }
    }

    /// A handle that opens streams.
    pub fn opener(&self) -> Opener {
        self.opener.clone()
    }

    /// From now on `peer` may open every protocol.
    pub fn admit(&mut self, peer: PeerId) {
        self.admitted.lock().expect("admitted lock").insert(peer);
    }

    /// From now on `peer` may open only the open protocols again.
    pub fn forget(&mut self, peer: PeerId) {
        self.admitted.lock().expect("admitted lock").remove(&peer);
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            open: self.open.clone(),
            gated: self.gated.clone(),
            admitted: self.admitted.clone(),
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Inbound;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections
                    .entry(e.peer_id)
                    .or_default()
                    .push(e.connection_id);
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.retain(|id| *id != connection_id);
                    if c.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        (stream, protocol): THandlerOutEvent<Self>,
    ) {
        self.inbound.push_back(Inbound {
            peer,
            protocol,
            stream,
        });
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Inbound, THandlerInEvent<Self>>> {
        if let Some(inbound) = self.inbound.pop_front() {
            return Poll::Ready(ToSwarm::GenerateEvent(inbound));
        }
        while let Poll::Ready(Some(open)) = self.opens.poll_recv(cx) {
            let Some(&connection) = self.connections.get(&open.peer).and_then(|c| c.last()) else {
                let _ = open.reply.send(Err(OpenError::NotConnected));
                continue;
            };
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id: open.peer,
                handler: NotifyHandler::One(connection),
                event: (open.protocol, open.reply),
            });
        }
        Poll::Pending
    }
}

/// One connection's side of [`Behaviour`].
pub struct Handler {
    peer: PeerId,
    open: Vec<StreamProtocol>,
    gated: Vec<StreamProtocol>,
    admitted: Admitted,
    inbound: VecDeque<(Stream, StreamProtocol)>,
    outbound: VecDeque<(StreamProtocol, OpenReply)>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = (StreamProtocol, OpenReply);
    type ToBehaviour = (Stream, StreamProtocol);
    type InboundProtocol = Upgrade;
    type OutboundProtocol = Upgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = (StreamProtocol, OpenReply);

    fn listen_protocol(&self) -> SubstreamProtocol<Upgrade> {
        let mut protocols = self.open.clone();
        if self
            .admitted
            .lock()
            .expect("admitted lock")
            .contains(&self.peer)
        {
            protocols.extend(self.gated.iter().cloned());
        }
        SubstreamProtocol::new(Upgrade(protocols), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Upgrade, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        if let Some(inbound) = self.inbound.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(inbound));
        }
        if let Some((protocol, reply)) = self.outbound.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    Upgrade(vec![protocol.clone()]),
                    (protocol, reply),
                ),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, open: Self::FromBehaviour) {
        self.outbound.push_back(open);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => self.inbound.push_back((stream, protocol)),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info: (_, reply),
            }) => {
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, reply),
                error,
            }) => {
                let error = match error {
                    StreamUpgradeError::Timeout => {
                        OpenError::Io(std::io::ErrorKind::TimedOut.into())
                    }
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported(protocol),
                    StreamUpgradeError::Io(e) => OpenError::Io(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}

/// The protocols offered (inbound) or asked for (outbound); the stream
/// itself is the output, negotiated and untouched.
pub struct Upgrade(Vec<StreamProtocol>);

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}
