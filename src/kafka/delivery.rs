//! At-least-once delivery: which input offsets are safe to commit, and
//! which a snapshot may cover.
//!
//! Every output and dead letter is produced with its source (input topic,
//! partition, offset) packed into the delivery opaque, a plain `usize`: no
//! allocation per message. An input offset becomes committable only when
//! every message produced for it, and for every message before it in its
//! partition, has been acknowledged by the broker. Workers record a whole
//! batch at once; the producer's delivery thread acknowledges message by
//! message. Failed deliveries are handed back for a retry; a fatal producer
//! error is recorded so that the pipeline stops with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::kafka::first_contact::Refusal;
use crate::metrics::Metrics;
use crate::partition::Progress;
use crate::timestamp::{now_millis, Millis};

/// The input message a produced message was caused by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: Arc<str>,
    pub partition: i32,
    /// -1: no input message (a sweep of a partition that processed none).
    pub offset: i64,
}

/// Packs a [`Source`] into the `usize` a delivery carries back, with the
/// input topics numbered: 7 bits of topic, 16 of partition, 40 of offset
/// (+1). A source that does not fit (a 129th topic, an offset past 2^40)
/// is kept in a side table instead; the top bit says which.
#[derive(Debug, Default)]
pub struct SourceCodec {
    topics: RwLock<Vec<Arc<str>>>,
    overflow: Mutex<(usize, HashMap<usize, Source>)>,
}

const OVERFLOW: usize = 1 << 63;

impl SourceCodec {
    /// The opaque of a message no input caused (a changelog record sent in
    /// a worker's transaction): its acknowledgement counts for nothing.
    pub const NO_SOURCE: usize = OVERFLOW;
}
const OFFSET_BITS: u32 = 40;
const PARTITION_BITS: u32 = 16;

impl SourceCodec {
    /// The number of `topic`, registering it the first time.
    pub fn topic_index(&self, topic: &str) -> usize {
        if let Some(i) = self.topics.read().iter().position(|t| &**t == topic) {
            return i;
        }
        let mut topics = self.topics.write();
        match topics.iter().position(|t| &**t == topic) {
            Some(i) => i,
            None => {
                topics.push(Arc::from(topic));
                topics.len() - 1
            }
        }
    }

    pub fn topic(&self, index: usize) -> Option<Arc<str>> {
        self.topics.read().get(index).cloned()
    }

    /// The opaque of a message produced for `offset` of `partition` of the
    /// topic numbered `topic`.
    pub fn encode(&self, topic: usize, partition: i32, offset: i64) -> usize {
        let o = offset + 1;
        if topic < 128
            && (0..1 << PARTITION_BITS).contains(&partition)
            && (0..1i64 << OFFSET_BITS).contains(&o)
        {
            return (topic << (OFFSET_BITS + PARTITION_BITS))
                | ((partition as usize) << OFFSET_BITS)
                | o as usize;
        }
        let source = Source {
            topic: self.topic(topic).unwrap_or_else(|| Arc::from("")),
            partition,
            offset,
        };
        let mut overflow = self.overflow.lock();
        overflow.0 += 1;
        let id = overflow.0 & !OVERFLOW;
        overflow.1.insert(id, source);
        OVERFLOW | id
    }

    /// The source of a delivered message.
    pub fn decode(&self, opaque: usize) -> Option<Source> {
        if opaque & OVERFLOW != 0 {
            return self.overflow.lock().1.remove(&(opaque & !OVERFLOW));
        }
        let topic = self.topic(opaque >> (OFFSET_BITS + PARTITION_BITS))?;
        let partition = ((opaque >> OFFSET_BITS) & ((1 << PARTITION_BITS) - 1)) as i32;
        let offset = (opaque & ((1usize << OFFSET_BITS) - 1)) as i64 - 1;
        Some(Source {
            topic,
            partition,
            offset,
        })
    }
}

/// Offsets of one input partition.
#[derive(Debug, Default)]
struct PartitionOffsets {
    /// Processed messages with outputs not yet acknowledged: (offset,
    /// outputs left, the input's Kafka timestamp), in offset order.
    pending: VecDeque<(i64, u32, Option<Millis>)>,
    /// One past the last processed offset.
    next: Option<i64>,
    /// The last offset the broker confirmed committed.
    committed: Option<i64>,
    /// The last offset handed to the consumer to commit.
    sent: Option<i64>,
}

impl PartitionOffsets {
    /// The offset to commit: the first one still waiting for an
    /// acknowledgement, else one past the last processed.
    fn safe(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(offset, _, _)) => Some(offset),
            None => self.next,
        }
    }
}

/// Committable offsets per input topic and partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(Arc<str>, i32), PartitionOffsets>,
    /// Outputs of partitions forgotten before they were acknowledged, by
    /// (topic, partition, offset): their acknowledgements still come, and
    /// must not count for the same offsets processed again after the
    /// partition comes back (a lost partition restored from an earlier
    /// snapshot), which they would complete early, or drive below zero.
    unacknowledged_before: HashMap<(Arc<str>, i32, i64), u32>,
    in_flight: u64,
    /// exactly_once: outputs are durable once their transaction commits,
    /// not once acknowledged.
    transactional: bool,
}

/// One processed input message of a batch with outputs: (offset, outputs,
/// Kafka timestamp).
pub type Produced = (i64, u32, Option<Millis>);

impl OffsetTracker {
    /// The offsets of one input partition, if tracked (looked up by `&str`
    /// without building the `Arc<str>` key: a handful of partitions).
    fn part(&self, topic: &str, partition: i32) -> Option<&PartitionOffsets> {
        self.parts
            .iter()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .map(|(_, o)| o)
    }

    fn part_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionOffsets> {
        self.parts
            .iter_mut()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .map(|(_, o)| o)
    }

    /// The tracker of exactly_once mode: what a snapshot may cover is what
    /// a committed transaction covers ([`OffsetTracker::mark_committed`]).
    pub fn transactional() -> OffsetTracker {
        OffsetTracker {
            transactional: true,
            ..OffsetTracker::default()
        }
    }

    /// The offset below which every output of a partition is durable:
    /// acknowledged (at_least_once), or committed in a transaction
    /// (exactly_once).
    pub fn durable(&self, topic: &str, partition: i32) -> Option<i64> {
        if !self.transactional {
            return self.safe(topic, partition);
        }
        self.part(topic, partition)
            .map(|o| o.committed.unwrap_or(0))
    }

    /// The committed offset of a partition, if any.
    pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.part(topic, partition).and_then(|o| o.committed)
    }

    /// Records a batch of `topic`'s `partition`: the messages with outputs
    /// (in offset order, none acknowledged yet) and the last offset
    /// processed. Must be called before the outputs are sent.
    pub fn batch(&mut self, topic: &Arc<str>, partition: i32, produced: &[Produced], last: i64) {
        let p = self
            .parts
            .entry((Arc::clone(topic), partition))
            .or_default();
        for &(offset, n, ts) in produced {
            match p.pending.back_mut() {
                Some((o, left, _)) if *o == offset => *left += n,
                _ => p.pending.push_back((offset, n, ts)),
            }
            self.in_flight += u64::from(n);
        }
        p.next = Some(p.next.map_or(last + 1, |n| n.max(last + 1)));
    }

    /// Records that the message at `offset` was processed and produced
    /// `outputs` messages (a batch of one).
    pub fn processed(&mut self, topic: &Arc<str>, partition: i32, offset: i64, outputs: u32) {
        let produced = [(offset, outputs, None)];
        let n = usize::from(outputs > 0);
        self.batch(topic, partition, &produced[..n], offset);
    }

    /// Records `outputs` more messages produced for `offset`, not later than
    /// any offset already recorded (a sweep's outputs count toward the last
    /// processed offset, so that no snapshot or commit covers its state
    /// before they are acknowledged).
    pub fn add_outputs(&mut self, topic: &Arc<str>, partition: i32, offset: i64, outputs: u32) {
        if outputs == 0 {
            return;
        }
        let p = self
            .parts
            .entry((Arc::clone(topic), partition))
            .or_default();
        match p.pending.back_mut() {
            Some((o, n, _)) if *o == offset => *n += outputs,
            _ => p.pending.push_back((offset, outputs, None)),
        }
        self.in_flight += u64::from(outputs);
    }

    /// Starts tracking a newly assigned partition whose group offset is
    /// `committed`: commits never go back below it, even while the state is
    /// rebuilt from earlier offsets.
    pub fn assigned(&mut self, topic: &str, partition: i32, committed: Option<i64>) {
        let p = self.parts.entry((Arc::from(topic), partition)).or_default();
        p.committed = committed;
    }

    /// A partition restored from a snapshot resumes at `offset`: every
    /// output of the events before it was acknowledged, so it can be
    /// committed at once (lag reads 0 when nothing is left to process).
    pub fn restored(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.parts.entry((Arc::from(topic), partition)).or_default();
        p.next = Some(p.next.map_or(offset, |n| n.max(offset)));
    }

    /// Where the outputs of a sweep of `partition` count: the last
    /// processed offset of one of its topics, if any.
    pub fn sweep_source(&self, partition: i32) -> Option<(Arc<str>, i64)> {
        self.parts
            .iter()
            .filter(|((_, p), _)| *p == partition)
            .filter_map(|((t, _), o)| o.next.map(|n| (Arc::clone(t), n - 1)))
            .min_by(|a, b| a.0.cmp(&b.0))
    }

    /// Records one acknowledged message produced for `offset`; returns the
    /// input's Kafka timestamp when it was the last output of that input.
    pub fn acknowledged(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
    ) -> Option<Millis> {
        // Empty but for a moment after a partition was lost: the common
        // path pays one test, not a hash.
        if !self.unacknowledged_before.is_empty() {
            let earlier = (Arc::clone(topic), partition, offset);
            if let Some(left) = self.unacknowledged_before.get_mut(&earlier) {
                // Counted against the earlier assignment first: an offset
                // processed again completes only once every output of both
                // assignments is acknowledged, never earlier.
                *left -= 1;
                if *left == 0 {
                    self.unacknowledged_before.remove(&earlier);
                }
                return None;
            }
        }
        let p = self.parts.get_mut(&(Arc::clone(topic), partition))?;
        let i = p.pending.binary_search_by_key(&offset, |e| e.0).ok()?;
        if p.pending[i].1 == 0 {
            // Already complete: an acknowledgement this tracker did not
            // count on must not wrap the count around.
            return None;
        }
        p.pending[i].1 -= 1;
        self.in_flight = self.in_flight.saturating_sub(1);
        let done = (p.pending[i].1 == 0).then_some(p.pending[i].2).flatten();
        while p.pending.front().is_some_and(|e| e.1 == 0) {
            p.pending.pop_front();
        }
        done
    }

    /// Offsets that moved past the last commit: (topic, partition, offset);
    /// unless `again`, not those already sent to commit.
    pub fn committable(&self, again: bool) -> Vec<(Arc<str>, i32, i64)> {
        self.parts
            .iter()
            .filter_map(|((t, p), o)| {
                let safe = o.safe().filter(|&s| s >= 0)?;
                (o.committed < Some(safe) && (again || o.sent != Some(safe)))
                    .then(|| (Arc::clone(t), *p, safe))
            })
            .collect()
    }

    /// An offset handed to the consumer to commit.
    pub fn mark_sent(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.part_mut(topic, partition) {
            p.sent = Some(offset);
        }
    }

    /// The offset safe to commit for one partition, if anything was processed.
    pub fn safe(&self, topic: &str, partition: i32) -> Option<i64> {
        self.part(topic, partition).and_then(PartitionOffsets::safe)
    }

    /// One past the last processed offset of a partition.
    pub fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        self.part(topic, partition).and_then(|o| o.next)
    }

    /// Processed positions of every topic of a partition number.
    pub fn positions(&self, partition: i32) -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> = self
            .parts
            .iter()
            .filter(|((_, p), _)| *p == partition)
            .filter_map(|((t, _), o)| o.next.map(|n| (t.to_string(), n)))
            .collect();
        v.sort();
        v
    }

    /// The broker confirmed a commit.
    pub fn mark_committed(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.part_mut(topic, partition) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// Forgets a revoked or lost partition; at_least_once, the
    /// acknowledgements of its outputs still on their way are set aside
    /// ([`OffsetTracker::acknowledged`]).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        let Some(key) = self
            .parts
            .keys()
            .find(|(t, p)| &**t == topic && *p == partition)
            .cloned()
        else {
            return;
        };
        let Some(forgotten) = self.parts.remove(&key) else {
            return;
        };
        for (offset, left, _) in forgotten.pending {
            self.in_flight = self.in_flight.saturating_sub(u64::from(left));
            // exactly_once: what a lost partition's transaction still had in
            // flight is aborted, and fails instead of being acknowledged.
            if left > 0 && !self.transactional {
                *self
                    .unacknowledged_before
                    .entry((Arc::clone(&key.0), partition, offset))
                    .or_default() += left;
            }
        }
    }

    /// Produced messages not yet acknowledged, over all partitions.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// The tracker as the snapshot store sees it.
impl Progress for Mutex<OffsetTracker> {
    fn positions(&self, partition: i32) -> Vec<(String, i64)> {
        self.lock().positions(partition)
    }

    fn acknowledged(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lock().durable(topic, partition)
    }
}

/// A produced message whose delivery failed, to be sent again.
#[derive(Debug)]
pub struct Retry {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
    pub opaque: usize,
}

/// The producer's context: acknowledgements, retries and fatal errors.
pub struct Delivery {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub codec: Arc<SourceCodec>,
    pub retries: Mutex<Vec<Retry>>,
    pub fatal: Mutex<Option<String>>,
    pub metrics: Metrics,
    /// A worker's transactional producer (exactly_once): a failed delivery
    /// is not sent again but dooms the open transaction, and a fatal
    /// producer error replaces the producer instead of stopping the
    /// pipeline.
    transactional: bool,
    /// Why the open transaction must be aborted (a delivery failed).
    doomed: Mutex<Option<String>>,
    /// Transactional: every partition a delivery report named since
    /// [`Self::take_touched`], acknowledged or not (what an unfinished
    /// transaction may have written; see `transaction_seal`).
    touched: Mutex<Vec<(Box<str>, i32)>>,
    /// Why the producer cannot go on (librdkafka's fatal error).
    unusable: Mutex<Option<String>>,
    /// The first authentication or TLS failure (see `first_contact`).
    pub refusal: Refusal,
}

impl Delivery {
    pub fn new(
        tracker: Arc<Mutex<OffsetTracker>>,
        codec: Arc<SourceCodec>,
        metrics: Metrics,
    ) -> Delivery {
        Delivery {
            tracker,
            codec,
            retries: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            metrics,
            transactional: false,
            doomed: Mutex::new(None),
            touched: Mutex::new(Vec::new()),
            unusable: Mutex::new(None),
            refusal: Refusal::default(),
        }
    }

    /// The context of a worker's transactional producer.
    pub fn transactional(
        tracker: Arc<Mutex<OffsetTracker>>,
        codec: Arc<SourceCodec>,
        metrics: Metrics,
    ) -> Delivery {
        Delivery {
            transactional: true,
            ..Delivery::new(tracker, codec, metrics)
        }
    }

    /// Why the open transaction must be aborted, once: a delivery in it
    /// failed. Taken, so that the next transaction starts clean.
    pub fn transaction_failed(&self) -> Option<String> {
        self.doomed.lock().take()
    }

    /// The partitions reports named since the last call (transactional).
    pub fn take_touched(&self) -> Vec<(Box<str>, i32)> {
        std::mem::take(&mut *self.touched.lock())
    }

    /// Notes the partition of a report (a handful per transaction: a
    /// linear search allocates nothing).
    fn touch(&self, topic: &str, partition: i32) {
        if !self.transactional || partition < 0 {
            return;
        }
        let mut touched = self.touched.lock();
        if !touched
            .iter()
            .any(|(t, p)| *p == partition && &**t == topic)
        {
            touched.push((topic.into(), partition));
        }
    }

    /// Why the producer cannot go on (librdkafka reported a fatal error).
    pub fn unusable(&self) -> Option<String> {
        self.unusable.lock().clone()
    }

    /// Takes the failed deliveries to send again.
    pub fn take_retries(&self) -> Vec<Retry> {
        std::mem::take(&mut *self.retries.lock())
    }

    /// The fatal error that must stop the pipeline, if one happened.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().clone()
    }

    fn set_fatal(&self, why: String) {
        let mut f = self.fatal.lock();
        if f.is_none() {
            tracing::error!("fatal producer error: {why}");
            *f = Some(why);
        }
    }
}

/// Errors that no retry can fix: the pipeline must stop rather than stall
/// or lose the message.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    is_about_the_message(code)
        || matches!(
            code,
            C::Fatal | C::OutOfOrderSequenceNumber | C::InvalidProducerEpoch | C::ProducerFenced
        )
}

/// Permanent errors about the message itself (no retry, no new producer
/// and no abort can deliver it): the pipeline stops on them in either
/// mode, rather than process the same event forever.
pub(crate) fn is_about_the_message(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::UnsupportedForMessageFormat
    )
}

impl ClientContext for Delivery {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            if self.transactional {
                tracing::error!("transactional producer: {error}: {reason}");
                *self.unusable.lock() = Some(format!("{error}: {reason}"));
            } else {
                self.set_fatal(format!("{error}: {reason}"));
            }
        } else {
            self.refusal.note(&error, reason);
            tracing::warn!("producer: {error}: {reason}");
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::metrics::record_statistics(&self.metrics, "producer", &statistics);
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        match result {
            Ok(msg) | Err((_, msg)) => self.touch(msg.topic(), msg.partition()),
        }
        match result {
            Ok(_) => {
                let Some(source) = self.codec.decode(opaque) else {
                    return;
                };
                let done = self.tracker.lock().acknowledged(
                    &source.topic,
                    source.partition,
                    source.offset,
                );
                if let Some(ts) = done {
                    let latency = (now_millis() - ts).max(0) as f64 / 1000.0;
                    self.metrics.end_to_end_seconds.observe(latency);
                }
            }
            Err((e, msg)) => {
                let code = e.rdkafka_error_code();
                self.metrics
                    .delivery_errors
                    .with_label_values(&[code.map_or("unknown", error_name)])
                    .inc();
                if self.transactional && !code.is_some_and(is_about_the_message) {
                    // The transaction cannot commit: the worker aborts it and
                    // processes its events again; nothing is resent here.
                    let mut doomed = self.doomed.lock();
                    if doomed.is_none() {
                        *doomed = Some(format!("delivery to {} failed: {e}", msg.topic()));
                    }
                    return;
                }
                if code.is_some_and(is_permanent) {
                    let source = self.codec.decode(opaque);
                    self.set_fatal(format!(
                        "cannot deliver to {} (caused by {:?}): {e}",
                        msg.topic(),
                        source
                    ));
                    return;
                }
                tracing::warn!("delivery to {} failed, retrying: {e}", msg.topic());
                self.retries.lock().push(Retry {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers: msg.headers().map(|h| h.detach()),
                    opaque,
                });
            }
        }
    }
}

/// Sends failed deliveries again, once each; those the producer cannot
/// take now (full queue) are kept for the next round.
pub fn resend(producer: &ThreadedProducer<Delivery>, retries: Vec<Retry>) {
    let mut left = Vec::new();
    for r in retries {
        let mut record = BaseRecord::with_opaque_to(&r.topic, r.opaque);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(p) = &r.payload {
            record = record.payload(&p[..]);
        }
        if let Some(h) = &r.headers {
            record = record.headers(h.clone());
        }
        if let Err((e, _)) = producer.send(record) {
            tracing::debug!("retry of a delivery to {} deferred: {e}", r.topic);
            left.push(r);
        }
    }
    if !left.is_empty() {
        producer.context().retries.lock().extend(left);
    }
}

/// Resends failed deliveries and waits until nothing produced is waiting
/// for an acknowledgement, or until `deadline`. True when all are in.
pub fn drain(producer: &ThreadedProducer<Delivery>, deadline: std::time::Instant) -> bool {
    loop {
        resend(producer, producer.context().take_retries());
        // Sends what lingers at once. rust-rdkafka's `flush` with a timeout
        // waits in steps of 100 ms for acknowledgements that the producer's
        // own polling thread takes first: every revoke paid 100 ms for it.
        let _ = producer.flush(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
        let done = producer.context().tracker.lock().in_flight() == 0
            && producer.context().retries.lock().is_empty();
        if done {
            return true;
        }
        if std::time::Instant::now() >= deadline || producer.context().fatal().is_some() {
            return false;
        }
    }
}

/// A short, bounded label for an error code.
fn error_name(code: RDKafkaErrorCode) -> &'static str {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageTimedOut => "timed_out",
        C::QueueFull => "queue_full",
        C::BrokerTransportFailure | C::AllBrokersDown | C::NetworkException => "transport",
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => "unknown_topic",
        C::NotLeaderForPartition | C::LeaderNotAvailable => "leader",
        C::RequestTimedOut => "request_timed_out",
        c if is_permanent(c) => "permanent",
        _ => "other",
    }
}

/// Header names ces-stream writes.
pub mod headers {
    pub const KIND: &str = "ces-kind";
    pub const REASON: &str = "ces-reason";
    pub const DETAIL: &str = "ces-detail";
    pub const SOURCE_TOPIC: &str = "ces-source-topic";
    pub const SOURCE_PARTITION: &str = "ces-source-partition";
    pub const SOURCE_OFFSET: &str = "ces-source-offset";
    pub const TRUNCATED: &str = "ces-truncated";
}

/// Copies the headers of a message, if any, so that more can be added.
pub fn copy_headers<M: Message>(msg: &M) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            out = out.insert(rdkafka::message::Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wait_for_every_earlier_acknowledgement() {
        let t: Arc<str> = Arc::from("in");
        let mut tr = OffsetTracker::default();
        tr.batch(&t, 0, &[(10, 2, Some(5)), (12, 1, Some(7))], 12);
        assert_eq!(tr.safe("in", 0), Some(10));
        assert_eq!(tr.in_flight(), 3);
        assert_eq!(tr.acknowledged(&t, 0, 12), Some(7));
        assert_eq!(tr.safe("in", 0), Some(10), "12 is done but 10 is not");
        assert_eq!(tr.acknowledged(&t, 0, 10), None, "one of two");
        assert_eq!(tr.safe("in", 0), Some(10));
        assert_eq!(tr.acknowledged(&t, 0, 10), Some(5));
        assert_eq!(tr.safe("in", 0), Some(13));
        assert_eq!(tr.in_flight(), 0);
        assert_eq!(tr.committable(false), vec![(Arc::clone(&t), 0, 13)]);
        tr.mark_committed("in", 0, 13);
        assert!(tr.committable(false).is_empty());
        tr.processed(&t, 0, 13, 0);
        assert_eq!(tr.committable(false), vec![(Arc::clone(&t), 0, 14)]);
        // Sent to commit: not again each interval (a coordinator that is
        // away would answer them all at once), only when asked to.
        tr.mark_sent("in", 0, 14);
        assert!(tr.committable(false).is_empty());
        assert_eq!(tr.committable(true), vec![(Arc::clone(&t), 0, 14)]);
        tr.processed(&t, 0, 14, 0);
        assert_eq!(tr.committable(false), vec![(Arc::clone(&t), 0, 15)]);
    }

    #[test]
    fn partitions_are_independent_and_can_be_forgotten() {
        let t: Arc<str> = Arc::from("in");
        let mut tr = OffsetTracker::default();
        tr.processed(&t, 0, 5, 1);
        tr.processed(&t, 1, 7, 0);
        assert_eq!(tr.safe("in", 0), Some(5));
        assert_eq!(tr.safe("in", 1), Some(8));
        tr.forget("in", 0);
        assert_eq!(tr.safe("in", 0), None);
        assert_eq!(tr.in_flight(), 0);
        // A late acknowledgement for a forgotten partition is ignored.
        tr.acknowledged(&t, 0, 5);
        assert_eq!(tr.safe("in", 0), None);
    }

    /// A lost partition comes back, restored from an earlier snapshot, and
    /// processes the same offsets again while the first assignment's
    /// outputs are still being acknowledged (the broker was away): those
    /// late acknowledgements never complete an offset of the second
    /// assignment early, and never drive a count below zero (which killed
    /// the producer's polling thread, and with it every later commit).
    #[test]
    fn late_acknowledgements_of_a_forgotten_assignment_do_not_count_for_the_next() {
        let t: Arc<str> = Arc::from("in");
        let mut tr = OffsetTracker::default();
        tr.batch(&t, 0, &[(5, 2, None), (6, 1, None)], 6);
        assert_eq!(tr.acknowledged(&t, 0, 6), None);
        tr.forget("in", 0);
        assert_eq!(tr.in_flight(), 0);

        tr.assigned("in", 0, Some(5));
        tr.restored("in", 0, 5);
        tr.batch(&t, 0, &[(5, 2, Some(50)), (6, 1, Some(60))], 6);
        assert_eq!(tr.safe("in", 0), Some(5));
        // The second assignment's output of 6 first: 6 is done.
        assert_eq!(tr.acknowledged(&t, 0, 6), Some(60));
        // Two late ones of the first assignment's 5, then a third
        // acknowledgement for 6 that nobody counts on: nothing moves.
        assert_eq!(tr.acknowledged(&t, 0, 5), None);
        assert_eq!(tr.acknowledged(&t, 0, 5), None);
        assert_eq!(tr.acknowledged(&t, 0, 6), None);
        assert_eq!(tr.safe("in", 0), Some(5), "5's own outputs are not in yet");
        assert_eq!(tr.in_flight(), 2);
        assert_eq!(tr.acknowledged(&t, 0, 5), None);
        assert_eq!(tr.acknowledged(&t, 0, 5), Some(50));
        assert_eq!(tr.safe("in", 0), Some(7));
        assert_eq!(tr.in_flight(), 0);
        assert!(tr.unacknowledged_before.is_empty());
    }

    #[test]
    fn sources_round_trip_through_the_opaque() {
        let codec = SourceCodec::default();
        let a = codec.topic_index("clicks");
        let b = codec.topic_index("segment");
        assert_eq!(codec.topic_index("clicks"), a);
        for (topic, partition, offset) in [
            (a, 0, 0),
            (a, 3, -1),
            (b, 65_535, (1 << 40) - 2),
            (b, 65_536, 7),
            (a, 2, 1 << 41),
        ] {
            let opaque = codec.encode(topic, partition, offset);
            assert_eq!(
                codec.decode(opaque),
                Some(Source {
                    topic: codec.topic(topic).unwrap(),
                    partition,
                    offset
                })
            );
        }
    }
}
