//! ces-stream on Kafka: the `run` pipeline and what it is built from.

pub mod claim_signature;
pub mod committer;
pub mod delivery;
pub mod error;
pub mod first_contact;
pub mod members;
pub mod partitioner;
pub mod pipeline;
pub mod rebalance;
pub mod restore;
pub mod settings;
pub mod shared;
pub mod transaction;
pub mod transaction_seal;
pub mod worker;
