//! The Convoy daemon library: `convoyd`'s two roles and what they share.
//!
//! By role, as the vocabulary goes (see DESIGN.md):
//!
//! - [`coordinator`]: origin of releases, tracker of the fleet, roll-outs,
//!   promotions and the operator API.
//! - [`target`]: a fleet member staging what it is ordered, delivering it
//!   and answering its load balancer's health checks.
//!
//! What both roles stand on, each folder's doc naming what it may use:
//!
//! - [`net`]: the libp2p network, the peer protocols, chunk serving and
//!   receiving, rate caps, the operator's client.
//! - [`store`]: where a daemon (and the `convoy` CLI) keeps chunks,
//!   manifests and release names, in RocksDB or in memory.
//! - [`transfer`]: the decisions of swarm, push and pull distribution as
//!   sans-I/O state machines, and a fleet simulator that drives them.
//! - [`protocol`] and [`pipeline`]: the wire's and the pipelines file's
//!   types (the `convoy-protocol` crate).
//! - [`durable`], [`fleet_key`], [`units`]: power-cut-safe file steps, the
//!   fleet key, sizes and instants as people write them; [`manual`]: shell
//!   completions and man pages of the command lines.
//!
//! The roles depend on the shared folders, never on each other; `net`
//! and `store` know no role; `transfer` does no I/O.
//!
//! ```
//! use convoy_daemon::store::{MemoryStore, Store};
//! use convoy_chunker::Manifest;
//!
//! let store = MemoryStore::new();
//! let id = store.put_release(&Manifest::new("web", "1.0", vec![])?)?;
//! assert_eq!(store.resolve("web", "1.0")?, Some(id));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod coordinator;
pub mod durable;
pub mod fleet_key;
pub mod manual;
pub mod net;
pub use convoy_protocol::pipeline;
pub use convoy_protocol::wire as protocol;
pub mod store;
pub mod target;
pub mod transfer;
pub mod units;
