//! ces-stream: live customer engagement scores from a Kafka clickstream.
//!
//! The crate is a functional core with an imperative shell around it:
//!
//! - core, pure and deterministic: [`model`] (the validated scoring model),
//!   [`event`] (input parsing and reason codes), [`customers`] (compact
//!   per-customer state), [`engine`] (scoring, sweeps, signals) and
//!   [`output`] (output JSON);
//! - shell: [`config`] (the file), [`replay`] (files), [`synth`] (synthetic
//!   clickstreams), and the command line in `main.rs`.

pub mod config;
pub mod config_blocks;
pub mod config_secrets;
pub mod customers;
pub mod demo;
pub mod engine;
pub mod event;
pub mod generate;
pub mod http;
pub mod inspect;
pub mod kafka;
pub mod mapped;
pub mod metrics;
pub mod model;
pub mod output;
pub mod partition;
pub mod replay;
pub mod report;
pub mod service;
pub mod shutdown;
pub mod snapshot;
pub mod synth;
pub mod timestamp;
