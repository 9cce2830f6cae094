//! The `kafka` snapshot store: a compacted changelog topic, the way Kafka
//! Streams keeps state, so that any instance of the group can restore any
//! partition it is assigned.
//!
//! The changelog (`<group_id>-state` by default) has as many partitions as
//! the input; partition N holds, keyed by customer id, the record of every
//! customer of input partition N, and checkpoint records (key
//! `\0ces-checkpoint`) holding the watermark, the clock and the input
//! offsets a snapshot covers. Snapshots are incremental: only customers
//! changed since the last one are written, then the checkpoint.
//!
//! A crash can cut a snapshot half-written: customer records newer than the
//! last checkpoint. Every record therefore carries, per input topic, the
//! offset of the last event applied to that customer (in the record's extra
//! words); after a restore, an event at or below it is skipped, so nothing
//! is counted twice and nothing is missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::customers::{CustomerTable, Layout};
use crate::engine::Engine;
use crate::kafka::settings::KafkaSettings;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::snapshot::format::{self, Encoder, Header};
use crate::snapshot::Restored;

/// The key of checkpoint records.
pub const CHECKPOINT_KEY: &[u8] = b"\0ces-checkpoint";
/// First byte of a customer record's value.
const RECORD_TAG: u8 = b'C';

/// Why the changelog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("changelog {topic} has {found} partitions, the input has {expected}")]
    Partitions {
        topic: String,
        found: usize,
        expected: usize,
    },
    #[error("the kafka snapshot store needs literal input topics, not a pattern ({0})")]
    Pattern(String),
}

/// What a changelog partition holds: its latest checkpoint and the latest
/// record of every customer.
pub type ChangelogContents = (Option<Header>, HashMap<String, Vec<u32>>);

/// A compacted changelog topic.
pub struct ChangelogStore {
    pub topic: String,
    /// Input topics in the order of the records' applied-offset words.
    pub topics: Vec<String>,
    client: ClientConfig,
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl std::fmt::Debug for ChangelogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogStore")
            .field("topic", &self.topic)
            .finish()
    }
}

fn kafka_err(topic: &str) -> impl FnOnce(KafkaError) -> ChangelogError + '_ {
    move |source| ChangelogError::Kafka {
        topic: topic.to_string(),
        source,
    }
}

impl ChangelogStore {
    /// Connects, and creates the changelog (compacted, as many partitions
    /// as the input) if it does not exist.
    pub fn open(kafka: &KafkaSettings, topic: &str) -> Result<ChangelogStore, ChangelogError> {
        let mut topics = Vec::new();
        for t in &kafka.input_topics {
            if t.starts_with('^') {
                return Err(ChangelogError::Pattern(t.clone()));
            }
            topics.push(t.clone());
        }
        topics.sort();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &kafka.options {
            client.set(k, v);
        }
        let mut pc = client.clone();
        pc.set("enable.idempotence", "true").set("linger.ms", "5");
        for (k, v) in &kafka.producer_options {
            pc.set(k, v);
        }
        let producer: ThreadedProducer<DefaultProducerContext> =
            pc.create().map_err(kafka_err(topic))?;
        let store = ChangelogStore {
            topic: topic.to_string(),
            topics,
            client,
            producer,
        };
        store.ensure_topic()?;
        Ok(store)
    }

    /// Extra record words: one i64 per input topic.
    pub fn extra_words(&self) -> usize {
        2 * self.topics.len()
    }

    /// Partitions of the changelog.
    pub fn partitions(&self) -> Vec<i32> {
        match self.partition_count(&self.topic) {
            Ok(Some(n)) => (0..n as i32).collect(),
            _ => Vec::new(),
        }
    }

    fn partition_count(&self, topic: &str) -> Result<Option<usize>, ChangelogError> {
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(kafka_err(topic))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    }

    fn ensure_topic(&self) -> Result<(), ChangelogError> {
        let input = &self.topics[0];
        let expected = self.partition_count(input)?.unwrap_or(0);
        if let Some(found) = self.partition_count(&self.topic)? {
            if expected > 0 && found != expected {
                return Err(ChangelogError::Partitions {
                    topic: self.topic.clone(),
                    found,
                    expected,
                });
            }
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> =
            self.client.create().map_err(kafka_err(&self.topic))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ChangelogError::Kafka {
                topic: self.topic.clone(),
                source: KafkaError::AdminOpCreation(e.to_string()),
            })?;
        let new = NewTopic::new(
            &self.topic,
            expected.max(1) as i32,
            TopicReplication::Fixed(-1),
        )
        .set("cleanup.policy", "compact");
        let created = runtime.block_on(admin.create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ));
        let failed = match created {
            Ok(results) => results.into_iter().any(|r| r.is_err()),
            Err(_) => true,
        };
        if failed {
            // Brokers that refuse "broker default" replication: ask for 1.
            let new = NewTopic::new(
                &self.topic,
                expected.max(1) as i32,
                TopicReplication::Fixed(1),
            )
            .set("cleanup.policy", "compact");
            let results = runtime
                .block_on(admin.create_topics([&new], &AdminOptions::new()))
                .map_err(kafka_err(&self.topic))?;
            for r in results {
                if let Err((_, code)) = r {
                    if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                        return Err(ChangelogError::Kafka {
                            topic: self.topic.clone(),
                            source: KafkaError::AdminOp(code),
                        });
                    }
                }
            }
        }
        tracing::info!(topic = %self.topic, partitions = expected, "changelog topic created");
        // Wait until the topic is visible.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.partition_count(&self.topic)?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Writes customer records (id, words) to changelog partition `p`.
    pub fn write_records<'a>(
        &self,
        p: i32,
        records: impl Iterator<Item = (&'a str, &'a [u32])>,
    ) -> Result<usize, KafkaError> {
        let mut n = 0;
        let mut value = Vec::new();
        for (id, words) in records {
            value.clear();
            value.push(RECORD_TAG);
            for w in words {
                value.extend_from_slice(&w.to_le_bytes());
            }
            self.send(p, id.as_bytes(), &value)?;
            n += 1;
        }
        Ok(n)
    }

    fn send(&self, p: i32, key: &[u8], value: &[u8]) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(&self.topic)
            .partition(p)
            .key(key)
            .payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits until every record sent so far is acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Writes the checkpoint that makes a snapshot current, and waits for it.
    pub fn write_checkpoint(&self, header: &Header) -> Result<u64, KafkaError> {
        let mut h = header.clone();
        h.customers = 0;
        h.ids_len = 0;
        let bytes = Encoder::new(Vec::new(), &h)
            .and_then(|e| e.finish(&[]))
            .map_err(|e| {
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::InvalidMessage)
                    .tap_log(&e)
            })?;
        self.send(header.partition, CHECKPOINT_KEY, &bytes)?;
        self.flush(Duration::from_secs(60))?;
        Ok(bytes.len() as u64)
    }

    /// Reads changelog partition `p` to its end: the latest checkpoint and
    /// every customer's latest record.
    pub fn read(&self, p: i32) -> Result<ChangelogContents, ChangelogError> {
        let mut config = self.client.clone();
        config
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10");
        let consumer: BaseConsumer = config.create().map_err(kafka_err(&self.topic))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
            .map_err(kafka_err(&self.topic))?;
        consumer.assign(&tpl).map_err(kafka_err(&self.topic))?;
        let mut checkpoint = None;
        let mut records: HashMap<String, Vec<u32>> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if Instant::now() > deadline {
                return Err(ChangelogError::Kafka {
                    topic: self.topic.clone(),
                    source: KafkaError::PartitionEOF(p),
                });
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    tracing::warn!("reading changelog {} partition {p}: {e}", self.topic);
                    continue;
                }
                Some(Ok(m)) => {
                    let (Some(key), Some(value)) = (m.key(), m.payload()) else {
                        continue;
                    };
                    if key == CHECKPOINT_KEY {
                        match format::decode(value) {
                            Ok((h, _, _)) => checkpoint = Some(h),
                            Err(e) => tracing::warn!(
                                "bad checkpoint in {} partition {p}: {e}",
                                self.topic
                            ),
                        }
                    } else if value.first() == Some(&RECORD_TAG) && (value.len() - 1) % 4 == 0 {
                        let words = value[1..]
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect();
                        if let Ok(id) = std::str::from_utf8(key) {
                            records.insert(id.to_string(), words);
                        }
                    }
                }
            }
        }
        Ok((checkpoint, records))
    }

    /// The state of partition `p` from the changelog, if it has a
    /// checkpoint made with this model.
    pub fn load(&self, p: i32, model: &Arc<Model>, metrics: &Metrics) -> Option<Restored> {
        let (checkpoint, records) = match self.read(p) {
            Ok(r) => r,
            Err(e) => {
                metrics
                    .snapshot_failures
                    .with_label_values(&["corrupt"])
                    .inc();
                tracing::error!("cannot read the changelog: {e}");
                return None;
            }
        };
        let header = checkpoint?;
        let expected = super::fingerprint(model);
        if header.fingerprint != expected {
            tracing::warn!(
                partition = p,
                "changelog state made with another scoring model: rebuilding from the log"
            );
            return None;
        }
        let layout = Layout::for_model(model).with_extra(self.extra_words());
        let table = match CustomerTable::from_records(
            layout,
            records.iter().map(|(id, w)| (id.as_str(), w.as_slice())),
        ) {
            Ok(t) => t,
            Err(e) => {
                metrics
                    .snapshot_failures
                    .with_label_values(&["corrupt"])
                    .inc();
                tracing::error!(partition = p, "unusable changelog records: {e}");
                return None;
            }
        };
        Some(Restored {
            engine: Engine::from_parts(Arc::clone(model), table, header.watermark),
            path: std::path::PathBuf::from(format!("{}[{p}]", self.topic)),
            header,
        })
    }
}

/// Logs an error while mapping it away.
trait TapLog {
    fn tap_log(self, e: &dyn std::fmt::Display) -> Self;
}

impl TapLog for KafkaError {
    fn tap_log(self, e: &dyn std::fmt::Display) -> Self {
        tracing::error!("cannot encode a checkpoint: {e}");
        self
    }
}
