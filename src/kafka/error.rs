//! Why the Kafka pipeline stops: one error type for the subsystem.

use rdkafka::error::KafkaError;

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create the Kafka {client}: {source}")]
    Client {
        client: &'static str,
        source: KafkaError,
    },
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("topic {topic:?} ({role}) does not exist on {brokers}: create it first")]
    MissingTopic {
        topic: String,
        role: &'static str,
        brokers: String,
    },
    #[error("the brokers at {brokers} refused the {client}: {reason}")]
    Refused {
        brokers: String,
        client: &'static str,
        reason: String,
    },
    #[error("cannot reach the brokers at {brokers}: {source}")]
    Unreachable { brokers: String, source: KafkaError },
    #[error("input topics are not co-partitioned ({counts}): each customer's partition must have the same number in every input topic")]
    NotCoPartitioned { counts: String },
    #[error("producer failed: {0}")]
    Producer(String),
    #[error("partition {partition}: {source}")]
    Engine {
        partition: i32,
        source: crate::engine::EngineError,
    },
    #[error("a worker did not hand back partitions {partitions:?} within {waited:?} (exactly_once cannot give the group a partition whose offsets a worker may still commit)")]
    HandBack {
        partitions: Vec<i32>,
        waited: std::time::Duration,
    },
    #[error("the pipeline thread stopped unexpectedly")]
    Panicked,
}
