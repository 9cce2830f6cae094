//! ces-stream on Kafka: the `run` pipeline and what it is built from.

pub mod settings;
