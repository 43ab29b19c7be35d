//! The Convoy daemon library.
//!
//! - [`store`]: where a daemon (and the `convoy` CLI) keeps chunks,
//!   manifests and release names, in RocksDB or in memory.
//! - [`transfer`]: the decisions of swarm, push and pull distribution as
//!   sans-I/O state machines, and a fleet simulator that drives them.
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

pub mod api;
pub mod client;
pub mod coordinator;
pub mod deliver;
pub mod deployments;
pub mod durable;
pub mod fleet_key;
pub mod health;
pub mod net;
pub mod operators;
pub mod patching;
pub use convoy_protocol::pipeline;
pub use convoy_protocol::wire as protocol;
pub mod rate;
pub mod rollout;
pub mod serve;
pub mod store;
pub mod target;
pub mod transfer;
pub mod units;
