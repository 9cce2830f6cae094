//! The `kafka` snapshot store: a compacted changelog topic, the way Kafka
//! Streams keeps state, so that any instance of the group can restore any
//! partition it is assigned.
//!
//! The changelog (`<group_id>-state` by default) has as many partitions as
//! the input; partition N holds, keyed by customer id, the record of every
//! customer of input partition N, tombstones of the customers removed
//! (erased or forgotten), and checkpoint records (key `\0ces-checkpoint`)
//! holding the watermark, the clock and the input offsets of a snapshot.
//! Snapshots are incremental: the customers removed and changed since the
//! last one, then, once every one of those writes and every output of the
//! events the snapshot covers are acknowledged, its checkpoint.
//!
//! **What a restore uses.** A crash can cut a snapshot half-written:
//! records after the last checkpoint, newer than the offsets it resumes
//! from. A restore takes each customer's latest record *before* the last
//! checkpoint, the state exactly as of that checkpoint, and ignores
//! everything after it; the next snapshot rewrites those customers, so that
//! the stale records never count later. Compaction could remove the record
//! before the checkpoint once a newer one exists; the topic is created with
//! `min.compaction.lag.ms` (1 day by default) so that it cannot within a
//! day of the crash, and every record and tombstone says whether an earlier
//! record of its customer exists: a restore that finds one missing rebuilds
//! the partition from the log rather than restore a wrong state.
//!
//! **Generations.** A partition rebuilt from the log (no checkpoint, a
//! checkpoint of another model, a record lost) starts a new generation:
//! records carry it, and a restore ignores records of other generations;
//! the first snapshot of a generation writes every customer and deletes
//! the keys of the older ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};

use crate::customers::{flags, header_word, CustomerTable, Layout, Removed};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::RecordSink;
use crate::snapshot::format::{self, Encoder, Header};
use crate::snapshot::{Restored, SnapshotSettings};

/// The key of checkpoint records.
pub const CHECKPOINT_KEY: &[u8] = b"\0ces-checkpoint";
/// First byte of a customer record's value: then the generation (u64) and
/// the record's words (u32), little-endian.
const RECORD_TAG: u8 = b'C';
/// First byte of a checkpoint's value: then the generation (u64) and the
/// snapshot header (`format`, without records).
const CHECKPOINT_TAG: u8 = b'K';
/// Header of a tombstone: "1" when an earlier record of the customer exists.
pub const PERSISTED_HEADER: &str = "ces-persisted";
/// How long a restore may read one changelog partition.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a periodic snapshot's checkpoint waits for its records to be
/// acknowledged (on a thread of its own) before the snapshot is given up
/// and written again later.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the changelog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("changelog {topic} has {found} partitions, the input has {expected}: use another [snapshot] topic, or delete it (its state is rebuilt from the input)")]
    Partitions {
        topic: String,
        found: usize,
        expected: usize,
    },
    #[error("changelog {topic} does not exist")]
    Missing { topic: String },
    #[error("input topic {0} does not exist: the changelog needs its partition count")]
    MissingInput(String),
    #[error("the kafka snapshot store needs literal input topics, not a pattern ({0})")]
    Pattern(String),
    #[error(
        "changelog {topic} partition {partition}: not read to its end within {READ_TIMEOUT:?}"
    )]
    ReadTimeout { topic: String, partition: i32 },
    #[error("reading the changelog was cancelled (shutdown)")]
    Cancelled,
}

/// One message of a changelog partition, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Record {
        id: String,
        generation: u64,
        words: Vec<u32>,
    },
    Tombstone {
        id: String,
        /// An earlier record of the customer exists.
        persisted: bool,
    },
    Checkpoint {
        generation: u64,
        header: Header,
    },
}

impl Entry {
    /// Decodes a message; `None` for one that is not ours (logged).
    pub fn decode(key: &[u8], value: Option<&[u8]>, persisted: bool) -> Option<Entry> {
        if key == CHECKPOINT_KEY {
            let value = value?;
            if value.len() < 9 || value[0] != CHECKPOINT_TAG {
                tracing::warn!("changelog: a checkpoint of an unknown format is ignored");
                return None;
            }
            let generation = u64::from_le_bytes(value[1..9].try_into().ok()?);
            return match format::decode(&value[9..]) {
                Ok((header, _, _)) => Some(Entry::Checkpoint { generation, header }),
                Err(e) => {
                    tracing::warn!("changelog: a bad checkpoint is ignored: {e}");
                    None
                }
            };
        }
        let id = std::str::from_utf8(key).ok()?.to_string();
        match value {
            None => Some(Entry::Tombstone { id, persisted }),
            Some(v) if v.len() >= 9 && v[0] == RECORD_TAG && (v.len() - 9) % 4 == 0 => {
                let generation = u64::from_le_bytes(v[1..9].try_into().ok()?);
                let words = v[9..]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Some(Entry::Record {
                    id,
                    generation,
                    words,
                })
            }
            Some(_) => {
                tracing::warn!("changelog: a record of an unknown format is ignored");
                None
            }
        }
    }
}

/// A customer's messages since the last checkpoint.
#[derive(Debug, Default)]
struct Ahead {
    /// The latest: a record (generation, words), or `None` for a tombstone.
    latest: Option<(u64, Vec<u32>)>,
    /// One of them says an earlier record of the customer exists.
    persisted: bool,
}

/// Folds a changelog partition, message by message, into its state as of
/// the last checkpoint (see the module documentation).
#[derive(Debug, Default)]
pub struct Fold {
    /// Every customer's latest record before the last checkpoint.
    committed: HashMap<String, (u64, Vec<u32>)>,
    /// Messages after the last checkpoint, per customer.
    ahead: HashMap<String, Ahead>,
    checkpoint: Option<(u64, Header)>,
}

/// A changelog partition as a restore sees it.
#[derive(Debug, Default, PartialEq)]
pub struct Recovered {
    /// The last checkpoint (generation, header), if it can be restored.
    pub checkpoint: Option<(u64, Header)>,
    /// The records of the checkpoint's generation as of it.
    pub records: Vec<(String, Vec<u32>)>,
    /// Customers with messages after the checkpoint: the next snapshot must
    /// rewrite them (a record if present then, else a tombstone).
    pub ahead: Vec<String>,
    /// Keys whose record the restored state does not use (other
    /// generations, or everything when nothing can be restored): the next
    /// snapshot deletes them unless it writes them.
    pub stale: Vec<String>,
    /// Customers whose committed record compaction removed: when not empty
    /// the checkpoint cannot be restored exactly (`checkpoint` is `None`).
    pub lost: Vec<String>,
}

impl Fold {
    pub fn push(&mut self, entry: Entry) {
        match entry {
            Entry::Record {
                id,
                generation,
                words,
            } => {
                let a = self.ahead.entry(id).or_default();
                a.persisted |= words
                    .first()
                    .is_some_and(|w| header_word::flags(*w) & flags::PERSISTED != 0);
                a.latest = Some((generation, words));
            }
            Entry::Tombstone { id, persisted } => {
                let a = self.ahead.entry(id).or_default();
                a.persisted |= persisted;
                a.latest = None;
            }
            Entry::Checkpoint { generation, header } => {
                for (id, a) in self.ahead.drain() {
                    match a.latest {
                        Some(r) => {
                            self.committed.insert(id, r);
                        }
                        None => {
                            self.committed.remove(&id);
                        }
                    }
                }
                self.checkpoint = Some((generation, header));
            }
        }
    }

    pub fn finish(self) -> Recovered {
        let Some((generation, header)) = self.checkpoint else {
            let mut stale: Vec<String> = self.committed.into_keys().collect();
            stale.extend(self.ahead.into_keys());
            return Recovered {
                stale,
                ..Recovered::default()
            };
        };
        let lost: Vec<String> = self
            .ahead
            .iter()
            .filter(|(id, a)| {
                a.persisted
                    && self
                        .committed
                        .get(*id)
                        .is_none_or(|(g, _)| *g != generation)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let ahead: Vec<String> = self.ahead.into_keys().collect();
        if !lost.is_empty() {
            let mut stale: Vec<String> = self.committed.into_keys().collect();
            stale.extend(ahead);
            return Recovered {
                stale,
                lost,
                ..Recovered::default()
            };
        }
        let mut records = Vec::with_capacity(self.committed.len());
        let mut stale = Vec::new();
        for (id, (g, words)) in self.committed {
            if g == generation {
                records.push((id, words));
            } else {
                stale.push(id);
            }
        }
        Recovered {
            checkpoint: Some((generation, header)),
            records,
            ahead,
            stale,
            lost: Vec::new(),
        }
    }
}

/// The changelog producer's context: which changelog partitions still wait
/// for acknowledgements. A checkpoint waits for its own partition's
/// records only; a producer-wide flush would wait for every partition's,
/// and, with snapshots always in progress somewhere, might never end.
#[derive(Default)]
struct Acks {
    /// Per partition: records sent and not acknowledged, and whether one
    /// of them failed since the last checkpoint.
    pending: Mutex<HashMap<i32, (u64, bool)>>,
    changed: parking_lot::Condvar,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, partition: usize) {
        let mut pending = self.pending.lock();
        let e = pending.entry(partition as i32).or_default();
        e.0 = e.0.saturating_sub(1);
        if let Err((err, _)) = result {
            tracing::warn!(partition, "a changelog record was not delivered: {err}");
            e.1 = true;
        }
        self.changed.notify_all();
    }
}

impl Acks {
    fn sent(&self, p: i32) {
        self.pending.lock().entry(p).or_default().0 += 1;
    }

    fn unsent(&self, p: i32) {
        let mut pending = self.pending.lock();
        let e = pending.entry(p).or_default();
        e.0 = e.0.saturating_sub(1);
    }

    /// Waits until every record of `p` sent so far is acknowledged; fails
    /// when one was not delivered (and clears that).
    fn wait(&self, p: i32, deadline: Instant) -> Result<(), KafkaError> {
        let mut pending = self.pending.lock();
        loop {
            let e = pending.entry(p).or_default();
            if e.1 {
                e.1 = false;
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::InvalidMessage,
                ));
            }
            if e.0 == 0 {
                return Ok(());
            }
            if self.changed.wait_until(&mut pending, deadline).timed_out() {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
        }
    }
}

/// A client context that does not report the end of a partition (the
/// restore asks for it) as an error.
struct QuietAboutPartitionEnds;

impl ClientContext for QuietAboutPartitionEnds {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!("changelog reader: {error}: {reason}");
        }
    }
}

impl ConsumerContext for QuietAboutPartitionEnds {}

/// The snapshots of one partition in flight: a periodic snapshot's
/// checkpoint is written by another thread once its outputs are
/// acknowledged, and must never land after a newer snapshot's records.
#[derive(Debug, Default)]
struct Writer {
    /// The generation records and checkpoints of the partition carry.
    generation: u64,
    /// The ticket of the snapshot whose checkpoint is awaited, if any.
    awaited: Option<u64>,
    /// Never reset, not even by a restore: a ticket is never issued twice.
    next_ticket: u64,
}

impl Writer {
    /// The partition starts over from a restore (or a rebuild) in
    /// `generation`: no checkpoint is awaited any more. The ticket count
    /// goes on: a periodic snapshot taken before the restore (the
    /// partition was lost with its checkpoint waiting for the broker) may
    /// still finish waiting afterwards, and its checkpoint, with the old
    /// offsets, must not pass for a new snapshot's. With the count reset,
    /// the new snapshots' tickets came round to the old one's number: the
    /// old checkpoint landed after newer records, and the next restore
    /// counted their events twice (346 of 400 customers, in the broker
    /// stop-and-kill test).
    fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.awaited = None;
    }

    /// Registers a snapshot whose checkpoint comes later.
    fn issue_ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.awaited = Some(self.next_ticket);
        self.next_ticket
    }
}

/// A compacted changelog topic.
pub struct ChangelogStore {
    pub topic: String,
    /// Input topics, sorted: the order of a checkpoint's offsets.
    pub topics: Vec<String>,
    client: ClientConfig,
    producer: ThreadedProducer<Acks>,
    /// Per partition; the lock is held while a checkpoint is written.
    writers: Mutex<HashMap<i32, Arc<Mutex<Writer>>>>,
    /// exactly_once: per partition, the transaction its records go in (its
    /// worker's): no acknowledgement is awaited, the commit makes them
    /// durable together with the outputs of the events they cover.
    sinks: Mutex<HashMap<i32, Arc<dyn RecordSink>>>,
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

/// How to reach the changelog's cluster: the input's (the shell builds it
/// from `[kafka]`).
#[derive(Debug, Clone)]
pub struct Connection {
    /// Bootstrap servers and the options of every client.
    pub client: ClientConfig,
    /// Options of producers only.
    pub producer_options: Vec<(String, String)>,
    /// The input topics (the changelog has as many partitions as they).
    pub input_topics: Vec<String>,
}

/// A proof that a periodic snapshot may write its checkpoint, unless a
/// newer snapshot of the partition came first.
#[derive(Debug)]
pub struct Ticket {
    partition: i32,
    id: u64,
}

impl ChangelogStore {
    /// Connects, and creates the changelog (compacted, as many partitions
    /// as the input) with the admin API if it does not exist.
    pub fn open(
        kafka: &Connection,
        snapshot: &SnapshotSettings,
        topic: &str,
    ) -> Result<ChangelogStore, ChangelogError> {
        let store = ChangelogStore::connect(kafka, topic)?;
        store.ensure_topic(snapshot)?;
        Ok(store)
    }

    /// Connects to an existing changelog, for reading (`inspect`).
    pub fn open_existing(
        kafka: &Connection,
        topic: &str,
    ) -> Result<ChangelogStore, ChangelogError> {
        let store = ChangelogStore::connect(kafka, topic)?;
        if store.partition_count(topic)?.is_none() {
            return Err(ChangelogError::Missing {
                topic: topic.to_string(),
            });
        }
        Ok(store)
    }

    fn connect(kafka: &Connection, topic: &str) -> Result<ChangelogStore, ChangelogError> {
        let mut topics = Vec::new();
        for t in &kafka.input_topics {
            if t.starts_with('^') {
                return Err(ChangelogError::Pattern(t.clone()));
            }
            topics.push(t.clone());
        }
        topics.sort();
        let client = kafka.client.clone();
        let mut pc = client.clone();
        pc.set("enable.idempotence", "true").set("linger.ms", "5");
        for (k, v) in &kafka.producer_options {
            pc.set(k, v);
        }
        let producer: ThreadedProducer<Acks> = pc
            .create_with_context(Acks::default())
            .map_err(kafka_err(topic))?;
        Ok(ChangelogStore {
            topic: topic.to_string(),
            topics,
            client,
            producer,
            writers: Mutex::new(HashMap::new()),
            sinks: Mutex::new(HashMap::new()),
        })
    }

    /// exactly_once: partition `p`'s records go through `sink` from now on.
    pub fn attach(&self, p: i32, sink: Arc<dyn RecordSink>) {
        self.sinks.lock().insert(p, sink);
    }

    /// `p` left this instance: its sink goes.
    pub fn detach(&self, p: i32) {
        self.sinks.lock().remove(&p);
    }

    /// Whether `p`'s records go in a transaction.
    pub fn transactional(&self, p: i32) -> bool {
        self.sinks.lock().contains_key(&p)
    }

    fn sink(&self, p: i32) -> Option<Arc<dyn RecordSink>> {
        self.sinks.lock().get(&p).cloned()
    }

    /// Turns a restore into a rebuild from the log (exactly_once: its
    /// checkpoint is past the group's committed offsets): a new
    /// generation, and every key it held deleted by the next snapshot.
    pub fn discard(&self, p: i32, loaded: Loaded) -> Loaded {
        let mut delete = loaded.delete;
        delete.extend(loaded.rewrite);
        if let Some(r) = &loaded.restored {
            let table = r.engine.customers();
            delete.extend((0..table.len() as u32).map(|slot| table.id(slot).to_string()));
        }
        self.rebuild(p, delete)
    }

    /// Partitions of the changelog.
    pub fn partitions(&self) -> Vec<i32> {
        match self.partition_count(&self.topic) {
            Ok(Some(n)) => (0..n as i32).collect(),
            _ => Vec::new(),
        }
    }

    /// The partitions of `topic`, `None` if it does not exist. Asked with
    /// a consumer that never lets the broker create the topic.
    fn partition_count(&self, topic: &str) -> Result<Option<usize>, ChangelogError> {
        let mut config = self.client.clone();
        config.set("allow.auto.create.topics", "false");
        let consumer: BaseConsumer = config.create().map_err(kafka_err(topic))?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(kafka_err(topic))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    }

    /// Runs `f` with a runtime of its own on a thread of its own: the
    /// admin API is async, and the store may be opened from inside the
    /// service's runtime, where blocking on a future is not allowed.
    fn on_admin_thread<T: Send>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send,
    ) -> Result<T, ChangelogError> {
        let failed = |e: String| ChangelogError::Kafka {
            topic: self.topic.clone(),
            source: KafkaError::AdminOpCreation(e),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| f(&rt))
                    .map_err(|e| e.to_string())
            })
            .join()
            .map_err(|_| "the admin thread panicked".to_string())?
        })
        .map_err(failed)
    }

    fn ensure_topic(&self, snapshot: &SnapshotSettings) -> Result<(), ChangelogError> {
        let input = &self.topics[0];
        let expected = self
            .partition_count(input)?
            .ok_or_else(|| ChangelogError::MissingInput(input.clone()))?;
        if let Some(found) = self.partition_count(&self.topic)? {
            if found != expected {
                return Err(ChangelogError::Partitions {
                    topic: self.topic.clone(),
                    found,
                    expected,
                });
            }
            self.check_compacted();
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> =
            self.client.create().map_err(kafka_err(&self.topic))?;
        let replication = match snapshot.replication_factor {
            Some(r) => TopicReplication::Fixed(r),
            None => TopicReplication::Fixed(-1), // the broker's default
        };
        let mut new = NewTopic::new(&self.topic, expected as i32, replication)
            .set("cleanup.policy", "compact");
        for (k, v) in &snapshot.topic_config {
            new = new.set(k, v);
        }
        let results = self
            .on_admin_thread(|rt| {
                rt.block_on(admin.create_topics(
                    [&new],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                ))
            })?
            .map_err(kafka_err(&self.topic))?;
        for r in results {
            match r {
                Ok(_) => {}
                // Another instance created it meanwhile.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(ChangelogError::Kafka {
                        topic: self.topic.clone(),
                        source: KafkaError::AdminOp(code),
                    })
                }
            }
        }
        tracing::info!(
            topic = %self.topic,
            partitions = expected,
            replication = ?snapshot.replication_factor,
            "changelog topic created (compacted)"
        );
        // Wait until the topic is visible.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.partition_count(&self.topic)?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Warns when an existing changelog is not compacted: it would work,
    /// but keep every snapshot forever.
    fn check_compacted(&self) {
        let policy = (|| {
            let admin: AdminClient<DefaultClientContext> = self.client.create().ok()?;
            let results = self
                .on_admin_thread(|rt| {
                    rt.block_on(admin.describe_configs(
                        [&ResourceSpecifier::Topic(&self.topic)],
                        &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
                    ))
                })
                .ok()?
                .ok()?;
            let resource = results.into_iter().next()?.ok()?;
            resource.get("cleanup.policy").and_then(|e| e.value.clone())
        })();
        match policy {
            Some(p) if p.contains("compact") => {}
            Some(p) => tracing::error!(
                topic = %self.topic,
                cleanup_policy = %p,
                "the changelog topic is not compacted: it keeps every snapshot and grows without bound; set cleanup.policy=compact on it"
            ),
            None => tracing::warn!(
                topic = %self.topic,
                "cannot read the changelog topic's cleanup.policy: make sure it is compacted"
            ),
        }
    }

    fn writer(&self, p: i32) -> Arc<Mutex<Writer>> {
        Arc::clone(self.writers.lock().entry(p).or_default())
    }

    /// The generation partition `p`'s writes carry.
    fn generation(&self, p: i32) -> u64 {
        self.writer(p).lock().generation
    }

    /// Registers a periodic snapshot of `p` whose checkpoint comes later.
    pub fn ticket(&self, p: i32) -> Ticket {
        let id = self.writer(p).lock().issue_ticket();
        Ticket { partition: p, id }
    }

    /// Cancels the checkpoint of a periodic snapshot not written yet (a
    /// release snapshot comes now). Waits, up to `deadline`, for one being
    /// written. `Some(true)` when one was cancelled: its records were
    /// written without a checkpoint, so the changes they hold must be
    /// written again; `None` when one is still being written.
    pub fn cancel_awaited(&self, p: i32, deadline: Instant) -> Option<bool> {
        let w = self.writer(p);
        let mut w = w.try_lock_until(deadline)?;
        Some(w.awaited.take().is_some())
    }

    /// Writes tombstones for removed customers to changelog partition `p`.
    pub fn write_tombstones(&self, p: i32, removed: &[Removed]) -> Result<(), KafkaError> {
        for r in removed {
            self.send(p, r.id.as_bytes(), None, Some(r.persisted))?;
        }
        Ok(())
    }

    /// Writes customer records (id, words) to changelog partition `p`.
    pub fn write_records<'a>(
        &self,
        p: i32,
        records: impl Iterator<Item = (&'a str, &'a [u32])>,
    ) -> Result<usize, KafkaError> {
        let generation = self.generation(p);
        let mut n = 0;
        let mut value = Vec::new();
        for (id, words) in records {
            value.clear();
            value.push(RECORD_TAG);
            value.extend_from_slice(&generation.to_le_bytes());
            for w in words {
                value.extend_from_slice(&w.to_le_bytes());
            }
            self.send(p, id.as_bytes(), Some(&value), None)?;
            n += 1;
        }
        Ok(n)
    }

    /// Sends one record to partition `p`: a customer's record or a
    /// checkpoint (`value`), or a tombstone (`persisted`: whether an
    /// earlier record of the customer exists).
    fn send(
        &self,
        p: i32,
        key: &[u8],
        value: Option<&[u8]>,
        persisted: Option<bool>,
    ) -> Result<(), KafkaError> {
        let flag: &[u8] = if persisted == Some(true) { b"1" } else { b"0" };
        if let Some(sink) = self.sink(p) {
            let headers: &[(&str, &[u8])] = match persisted {
                Some(_) => &[(PERSISTED_HEADER, flag)],
                None => &[],
            };
            return sink.send(&self.topic, p, key, value, headers).map_err(|e| {
                tracing::warn!(
                    partition = p,
                    "changelog record not sent in the transaction: {e}"
                );
                KafkaError::MessageProduction(RDKafkaErrorCode::State)
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, p as usize)
                .partition(p)
                .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        if persisted.is_some() {
            record = record.headers(OwnedHeaders::new().insert(KafkaHeader {
                key: PERSISTED_HEADER,
                value: Some(flag),
            }));
        }
        let acks = self.producer.context();
        acks.sent(p);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((e, _)) => {
                    acks.unsent(p);
                    return Err(e);
                }
            }
        }
    }

    /// Writes the checkpoint of a snapshot taken while processing was
    /// paused (a release), after every record sent before it, within
    /// `timeout`.
    pub fn write_checkpoint(&self, header: &Header, timeout: Duration) -> Result<u64, KafkaError> {
        let w = self.writer(header.partition);
        let w = w.lock();
        self.checkpoint_locked(header, w.generation, timeout)
    }

    /// Writes the checkpoint of a periodic snapshot unless a newer
    /// snapshot was written meanwhile (`Ok(None)`).
    ///
    /// The acknowledgements are awaited without the partition's writer
    /// lock: the worker takes that lock for its next snapshot's ticket, and
    /// must not stop with it while the broker is away (it did, for the
    /// whole timeout, and the consumer's polling thread behind it).
    pub fn commit_ticket(
        &self,
        ticket: Ticket,
        header: &Header,
    ) -> Result<Option<u64>, KafkaError> {
        let p = ticket.partition;
        let deadline = Instant::now() + CHECKPOINT_TIMEOUT;
        let acks = self.producer.context();
        let transactional = self.transactional(p);
        // Every record of the snapshot (all sent before this call)
        // acknowledged before the checkpoint; in a transaction, its commit
        // makes them durable together.
        if !transactional {
            acks.wait(p, deadline)?;
        }
        let writer = self.writer(p);
        let bytes = {
            let w = writer.lock();
            if w.awaited != Some(ticket.id) {
                // A newer snapshot started: its own checkpoint comes.
                return Ok(None);
            }
            self.send_checkpoint(header, w.generation)?
        };
        if !transactional {
            acks.wait(p, deadline)?;
        }
        let mut w = writer.lock();
        if w.awaited == Some(ticket.id) {
            w.awaited = None;
        }
        Ok(Some(bytes))
    }

    /// Writes a checkpoint; the caller holds the partition's writer lock.
    fn checkpoint_locked(
        &self,
        header: &Header,
        generation: u64,
        timeout: Duration,
    ) -> Result<u64, KafkaError> {
        let deadline = Instant::now() + timeout;
        let p = header.partition;
        let acks = self.producer.context();
        // Every record of the snapshot acknowledged before the checkpoint
        // (in a transaction, its commit makes them durable together).
        let transactional = self.transactional(p);
        if !transactional {
            acks.wait(p, deadline)?;
        }
        let bytes = self.send_checkpoint(header, generation)?;
        if !transactional {
            acks.wait(p, deadline)?;
        }
        Ok(bytes)
    }

    /// Sends the checkpoint record of `header` (its partition's writer lock
    /// held, so that it follows the snapshot's records); its size.
    fn send_checkpoint(&self, header: &Header, generation: u64) -> Result<u64, KafkaError> {
        let mut h = header.clone();
        h.customers = 0;
        h.ids_len = 0;
        let encoded = Encoder::new(Vec::new(), &h)
            .and_then(|e| e.finish(&[]))
            .map_err(|e| {
                tracing::error!("cannot encode a checkpoint: {e}");
                KafkaError::MessageProduction(RDKafkaErrorCode::InvalidMessage)
            })?;
        let mut value = Vec::with_capacity(9 + encoded.len());
        value.push(CHECKPOINT_TAG);
        value.extend_from_slice(&generation.to_le_bytes());
        value.extend_from_slice(&encoded);
        self.send(header.partition, CHECKPOINT_KEY, Some(&value), None)?;
        Ok(value.len() as u64)
    }

    /// Reads changelog partition `p` to its end, unless `cancel` is set.
    pub fn read(&self, p: i32, cancel: &AtomicBool) -> Result<Recovered, ChangelogError> {
        let mut config = self.client.clone();
        config
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false")
            .set("fetch.wait.max.ms", "10");
        let consumer: BaseConsumer<QuietAboutPartitionEnds> = config
            .create_with_context(QuietAboutPartitionEnds)
            .map_err(kafka_err(&self.topic))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
            .map_err(kafka_err(&self.topic))?;
        consumer.assign(&tpl).map_err(kafka_err(&self.topic))?;
        let mut fold = Fold::default();
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(ChangelogError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(ChangelogError::ReadTimeout {
                    topic: self.topic.clone(),
                    partition: p,
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
                    let Some(key) = m.key() else { continue };
                    let persisted = m.headers().is_some_and(|h| {
                        h.iter()
                            .any(|h| h.key == PERSISTED_HEADER && h.value == Some(b"1"))
                    });
                    if let Some(entry) = Entry::decode(key, m.payload(), persisted) {
                        fold.push(entry);
                    }
                }
            }
        }
        Ok(fold.finish())
    }

    /// What partition `p` restores from: its state as of the last
    /// checkpoint, if that was made with this model and is complete; and
    /// what the next snapshot must clean up either way. Sets the
    /// generation the partition's writes carry from now on.
    pub fn load(&self, p: i32, model: &Arc<Model>, metrics: &Metrics) -> Loaded {
        self.load_until(p, model, metrics, &AtomicBool::new(false))
    }

    /// As [`ChangelogStore::load`], giving up when `cancel` is set.
    pub fn load_until(
        &self,
        p: i32,
        model: &Arc<Model>,
        metrics: &Metrics,
        cancel: &AtomicBool,
    ) -> Loaded {
        let recovered = match self.read(p, cancel) {
            Ok(r) => r,
            Err(ChangelogError::Cancelled) => return self.rebuild(p, Vec::new()),
            Err(e) => {
                metrics
                    .snapshot_failures
                    .with_label_values(&["corrupt"])
                    .inc();
                tracing::error!("cannot read the changelog: {e}; rebuilding from the log");
                return self.rebuild(p, Vec::new());
            }
        };
        if !recovered.lost.is_empty() {
            metrics
                .snapshot_failures
                .with_label_values(&["compacted"])
                .inc();
            tracing::error!(
                partition = p,
                customers = recovered.lost.len(),
                example = %recovered.lost[0],
                "the changelog lost records of its last checkpoint to compaction: rebuilding the partition from the log (raise the topic's min.compaction.lag.ms)"
            );
        }
        let Some((generation, header)) = recovered.checkpoint else {
            return self.rebuild(p, recovered.stale);
        };
        if header.fingerprint != super::fingerprint(model) {
            metrics
                .snapshot_failures
                .with_label_values(&["incompatible"])
                .inc();
            tracing::warn!(
                partition = p,
                "changelog state made with another scoring model or version: rebuilding from the log"
            );
            let mut stale = recovered.stale;
            stale.extend(recovered.records.into_iter().map(|(id, _)| id));
            stale.extend(recovered.ahead);
            return self.rebuild(p, stale);
        }
        let layout = Layout::for_model(model);
        let table = match CustomerTable::from_records(
            layout,
            recovered
                .records
                .iter()
                .map(|(id, w)| (id.as_str(), w.as_slice())),
        ) {
            Ok(t) => t,
            Err(e) => {
                metrics
                    .snapshot_failures
                    .with_label_values(&["corrupt"])
                    .inc();
                tracing::error!(
                    partition = p,
                    "unusable changelog records: {e}; rebuilding from the log"
                );
                let mut stale = recovered.stale;
                stale.extend(recovered.records.into_iter().map(|(id, _)| id));
                stale.extend(recovered.ahead);
                return self.rebuild(p, stale);
            }
        };
        self.writer(p).lock().restart(generation);
        if !recovered.ahead.is_empty() {
            tracing::info!(
                partition = p,
                customers = recovered.ahead.len(),
                "records written after the last checkpoint (a snapshot cut short) are ignored; the next snapshot rewrites them"
            );
        }
        Loaded {
            restored: Some(Restored {
                engine: Engine::from_parts(Arc::clone(model), table, header.watermark),
                path: std::path::PathBuf::from(format!("{}[{p}]", self.topic)),
                header,
            }),
            rewrite: recovered.ahead,
            delete: recovered.stale,
        }
    }

    /// A partition rebuilt from the log: a new generation.
    fn rebuild(&self, p: i32, delete: Vec<String>) -> Loaded {
        let generation = rand::random::<u64>();
        self.writer(p).lock().restart(generation);
        Loaded {
            restored: None,
            rewrite: Vec::new(),
            delete,
        }
    }
}

/// What a restore from the changelog gives.
#[derive(Debug)]
pub struct Loaded {
    /// The state as of the last checkpoint; `None`: rebuild from the log.
    pub restored: Option<Restored>,
    /// Customers the next snapshot must write again, as they are then
    /// (records after the checkpoint must not count later).
    pub rewrite: Vec<String>,
    /// Keys the next snapshot must delete unless it writes them.
    pub delete: Vec<String>,
}

impl Loaded {
    /// Prepares `engine` so that its next snapshot cleans the changelog up:
    /// tracks removals, deletes stale keys, rewrites the customers ahead.
    pub fn prepare(&self, engine: &mut Engine) {
        let table = engine.customers_mut();
        table.track_removals();
        for id in self.delete.iter().chain(&self.rewrite) {
            if table.find(id).is_some() {
                table.mark_dirty(id);
            } else {
                table.note_removed(Removed {
                    id: id.as_str().into(),
                    persisted: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_from_before_a_restore_is_never_awaited_after_it() {
        let mut w = Writer::default();
        for _ in 0..5 {
            w.issue_ticket();
        }
        let before = w.issue_ticket();
        assert_eq!(w.awaited, Some(before));
        w.restart(42);
        assert_eq!((w.awaited, w.generation), (None, 42));
        for _ in 0..100 {
            let after = w.issue_ticket();
            assert_ne!(after, before);
            assert_ne!(w.awaited, Some(before));
        }
    }

    fn header(offset: i64) -> Header {
        Header {
            partition: 0,
            fingerprint: 1,
            created_at: 0,
            watermark: Some(offset * 10),
            clock: 0,
            stride: 2,
            offsets: vec![("in".into(), offset)],
            customers: 0,
            ids_len: 0,
        }
    }

    fn record(id: &str, g: u64, value: u32, persisted: bool) -> Entry {
        let flags = if persisted {
            header_word::flag_bit(flags::PERSISTED)
        } else {
            0
        };
        Entry::Record {
            id: id.into(),
            generation: g,
            words: vec![flags | id.len() as u32, value],
        }
    }

    fn checkpoint(g: u64, offset: i64) -> Entry {
        Entry::Checkpoint {
            generation: g,
            header: header(offset),
        }
    }

    fn fold(entries: Vec<Entry>) -> Recovered {
        let mut f = Fold::default();
        for e in entries {
            f.push(e);
        }
        let mut r = f.finish();
        r.records.sort();
        r.ahead.sort();
        r.stale.sort();
        r
    }

    fn value(r: &Recovered, id: &str) -> Option<u32> {
        r.records.iter().find(|(i, _)| i == id).map(|(_, w)| w[1])
    }

    #[test]
    fn records_after_the_last_checkpoint_are_ignored() {
        let r = fold(vec![
            record("a", 7, 1, false),
            record("b", 7, 1, false),
            checkpoint(7, 10),
            record("a", 7, 2, true), // a snapshot cut short by a crash
            record("c", 7, 2, false),
        ]);
        assert_eq!(r.checkpoint, Some((7, header(10))));
        assert_eq!(value(&r, "a"), Some(1));
        assert_eq!(value(&r, "b"), Some(1));
        assert_eq!(value(&r, "c"), None);
        assert_eq!(r.ahead, ["a", "c"]);
        assert!(r.lost.is_empty() && r.stale.is_empty());
    }

    #[test]
    fn tombstones_before_the_checkpoint_remove_and_after_it_do_not() {
        let r = fold(vec![
            record("a", 7, 1, false),
            record("b", 7, 1, false),
            Entry::Tombstone {
                id: "a".into(),
                persisted: true,
            },
            checkpoint(7, 10),
            Entry::Tombstone {
                id: "b".into(),
                persisted: true,
            },
        ]);
        assert_eq!(value(&r, "a"), None);
        assert_eq!(value(&r, "b"), Some(1));
        assert_eq!(r.ahead, ["b"]);
    }

    #[test]
    fn later_checkpoints_commit_what_came_before_them() {
        let r = fold(vec![
            record("a", 7, 1, false),
            checkpoint(7, 10),
            record("a", 7, 2, true),
            checkpoint(7, 20),
            record("a", 7, 3, true),
        ]);
        assert_eq!(r.checkpoint.as_ref().map(|c| c.1.offsets[0].1), Some(20));
        assert_eq!(value(&r, "a"), Some(2));
    }

    #[test]
    fn a_record_lost_to_compaction_is_detected() {
        // Compaction removed a's record before the checkpoint, because a
        // newer one (after it) exists; that one says an earlier existed.
        let r = fold(vec![
            record("b", 7, 1, false),
            checkpoint(7, 10),
            record("a", 7, 2, true),
        ]);
        assert_eq!(r.checkpoint, None);
        assert_eq!(r.lost, ["a"]);
        assert_eq!(r.stale, ["a", "b"]);
        // A customer new since the checkpoint is not a loss.
        let r = fold(vec![
            record("b", 7, 1, false),
            checkpoint(7, 10),
            record("a", 7, 2, false),
            Entry::Tombstone {
                id: "c".into(),
                persisted: false,
            },
        ]);
        assert!(r.lost.is_empty());
        assert!(r.checkpoint.is_some());
    }

    #[test]
    fn other_generations_do_not_count() {
        let r = fold(vec![
            record("old", 3, 1, false),
            record("both", 3, 1, false),
            checkpoint(3, 10),
            record("both", 9, 5, false),
            record("new", 9, 5, false),
            checkpoint(9, 4),
        ]);
        assert_eq!(r.checkpoint.as_ref().map(|c| c.0), Some(9));
        assert_eq!(value(&r, "both"), Some(5));
        assert_eq!(value(&r, "new"), Some(5));
        assert_eq!(value(&r, "old"), None);
        assert_eq!(r.stale, ["old"]);
    }

    #[test]
    fn without_a_checkpoint_everything_is_stale() {
        let r = fold(vec![record("a", 1, 1, false), record("b", 1, 1, true)]);
        assert_eq!(r.checkpoint, None);
        assert_eq!(r.stale, ["a", "b"]);
        assert!(r.records.is_empty());
    }

    #[test]
    fn messages_decode_back() {
        let e = Entry::decode(b"c-1", None, true);
        assert_eq!(
            e,
            Some(Entry::Tombstone {
                id: "c-1".into(),
                persisted: true
            })
        );
        let mut v = vec![RECORD_TAG];
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            Entry::decode(b"c-1", Some(&v), false),
            Some(Entry::Record {
                id: "c-1".into(),
                generation: 5,
                words: vec![7]
            })
        );
        assert_eq!(Entry::decode(b"c-1", Some(b"junk"), false), None);
    }
}
