//! What crosses Convoy's wire and what operators hand in, with no RocksDB
//! and no libp2p so that it builds small for fuzzing:
//!
//! - [`wire`]: every frame and message of the four libp2p protocols;
//! - [`pipeline`]: the coordinator's pipelines file;
//! - [`plan`]: the roll-out vocabulary (strategy, waves, amounts);
//! - [`api`]: the operator API's request bodies.
#![deny(missing_docs)]

pub mod api;
pub mod pipeline;
pub mod plan;
pub mod wire;
