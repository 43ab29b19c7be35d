//! A short-lived fleet member that talks to the coordinator: what the
//! `convoy` CLI's publish, stage and fleet commands use, as an operator.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::net::{self, NetConfig, NetError, NetEvent, NetHandle, RequestError};
use crate::protocol::{ChunkRequest, ChunkResponse, ControlRequest, ControlResponse};

/// Splits `/ip4/.../tcp/N/p2p/PEER` into the peer id and the address.
pub fn parse_peer_addr(text: &str) -> Result<(PeerId, Multiaddr), String> {
    let mut addr: Multiaddr = text
        .parse()
        .map_err(|e| format!("{text:?} is not a multiaddr: {e}"))?;
    match addr.pop() {
        Some(Protocol::P2p(peer)) => Ok((peer, addr)),
        _ => Err(format!(
            "{text:?} does not end in /p2p/PEER_ID; use the address convoyd coordinator prints"
        )),
    }
}

/// A connection to the coordinator.
pub struct Client {
    net: NetHandle,
    coordinator: PeerId,
}

impl Client {
    /// Bytes this session's connections have carried each way.
    pub fn wire_bytes(&self) -> crate::net::WireBytes {
        self.net.wire_bytes()
    }

    /// Starts a network with a fresh identity that listens nowhere, and
    /// knows where the coordinator is; then proves to it that this session
    /// acts for `operator` (see [`crate::coordinator::operators`]: the coordinator acts
    /// on operator requests from sessions of allow-listed keys only). Call
    /// from within a tokio runtime.
    pub async fn connect(
        addr: &str,
        fleet_key: [u8; 32],
        operator: Keypair,
    ) -> Result<Self, String> {
        let (coordinator, addr) = parse_peer_addr(addr)?;
        let session = Keypair::generate_ed25519();
        let proof = crate::protocol::operator_proof_bytes(
            &session.public().to_peer_id().to_bytes(),
            &coordinator.to_bytes(),
        );
        let signature = operator
            .sign(&proof)
            .map_err(|e| format!("cannot sign with the operator key: {e}"))?;
        let (net, mut events) = net::start(NetConfig {
            keypair: session,
            listen: Vec::new(),
            fleet_key,
            request_timeout: Duration::from_secs(120),
            admission_timeout: net::ADMISSION_TIMEOUT,
            security: net::Security::default(),
        })
        .map_err(|e: NetError| e.to_string())?;
        net.add_addresses(coordinator, vec![addr]).await;
        // A client serves nobody: deny whatever arrives.
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    NetEvent::Chunk { reply, .. } => reply.send(ChunkResponse::Denied).await,
                    NetEvent::Control { reply, .. } => reply.send(ControlResponse::Denied).await,
                    _ => {}
                }
            }
        });
        let client = Self { net, coordinator };
        let prove = ControlRequest::Operator {
            public_key: operator.public().encode_protobuf(),
            signature,
        };
        match client.control(prove).await {
            Ok(ControlResponse::Ok) => Ok(client),
            Ok(ControlResponse::Denied) => Err(
                "the coordinator denied the request: this operator key is not in its operators file"
                    .into(),
            ),
            Ok(other) => Err(format!("the coordinator refused the operator key: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a control request to the coordinator.
    pub async fn control(&self, req: ControlRequest) -> Result<ControlResponse, RequestError> {
        self.net.control(self.coordinator, req).await
    }

    /// Sends a chunk request to the coordinator.
    pub async fn chunk(&self, req: ChunkRequest) -> Result<ChunkResponse, RequestError> {
        self.net.chunk(self.coordinator, req).await
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.net.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_address_needs_the_peer_id() {
        let id = Keypair::generate_ed25519().public().to_peer_id();
        let (p, a) = parse_peer_addr(&format!("/ip4/127.0.0.1/tcp/7400/p2p/{id}")).unwrap();
        assert_eq!(p, id);
        assert_eq!(a.to_string(), "/ip4/127.0.0.1/tcp/7400");
        let e = parse_peer_addr("/ip4/127.0.0.1/tcp/7400").unwrap_err();
        assert!(e.contains("/p2p/"), "{e}");
    }
}
