//! At-least-once delivery: which input offsets are safe to commit.
//!
//! Every output and dead letter is produced with its source (input topic,
//! partition, offset) as the delivery opaque. An input offset becomes
//! committable only when every message produced for it, and for every
//! message before it in its partition, has been acknowledged by the broker.
//! Failed deliveries are handed back for a retry; a fatal producer error
//! is recorded so that the pipeline stops with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::metrics::Metrics;
use crate::timestamp::{now_millis, Millis};

/// The input message a produced message was caused by.
#[derive(Debug, Clone)]
pub struct Source {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The input message's Kafka timestamp, for the end-to-end latency.
    pub timestamp: Option<Millis>,
}

/// Offsets of one input partition.
#[derive(Debug, Default)]
struct PartitionOffsets {
    /// Processed messages with outputs not yet acknowledged: (offset, count),
    /// in offset order.
    pending: VecDeque<(i64, u32)>,
    /// One past the last processed offset.
    next: Option<i64>,
    /// The last offset committed (one past the last message covered).
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// The offset to commit: the first one still waiting for an
    /// acknowledgement, else one past the last processed.
    fn safe(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(offset, _)) => Some(offset),
            None => self.next,
        }
    }
}

/// Committable offsets per input topic and partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<(Arc<str>, i32), PartitionOffsets>,
    in_flight: u64,
}

impl OffsetTracker {
    /// Records that the message at `offset` was processed and produced
    /// `outputs` messages, none acknowledged yet. Must be called before the
    /// outputs are sent.
    pub fn processed(&mut self, topic: &Arc<str>, partition: i32, offset: i64, outputs: u32) {
        self.add_outputs(topic, partition, offset, outputs);
        let p = self
            .parts
            .entry((Arc::clone(topic), partition))
            .or_default();
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
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
            Some((o, n)) if *o == offset => *n += outputs,
            _ => p.pending.push_back((offset, outputs)),
        }
        self.in_flight += u64::from(outputs);
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

    /// Starts tracking a newly assigned partition whose group offset is
    /// `committed`: commits never go back below it, even while the state is
    /// rebuilt from earlier offsets.
    pub fn assigned(&mut self, topic: &str, partition: i32, committed: Option<i64>) {
        let p = self.parts.entry((Arc::from(topic), partition)).or_default();
        p.committed = committed;
    }

    /// Records one acknowledged message produced for `offset`.
    pub fn acknowledged(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        let Some(p) = self.parts.get_mut(&(Arc::clone(topic), partition)) else {
            return; // the partition was revoked meanwhile
        };
        if let Ok(i) = p.pending.binary_search_by_key(&offset, |&(o, _)| o) {
            p.pending[i].1 -= 1;
            self.in_flight = self.in_flight.saturating_sub(1);
            while p.pending.front().is_some_and(|&(_, n)| n == 0) {
                p.pending.pop_front();
            }
        }
    }

    /// Offsets that moved past the last commit: (topic, partition, offset).
    pub fn committable(&self) -> Vec<(Arc<str>, i32, i64)> {
        self.parts
            .iter()
            .filter_map(|((t, p), o)| {
                let safe = o.safe().filter(|&s| s >= 0)?;
                (o.committed < Some(safe)).then(|| (Arc::clone(t), *p, safe))
            })
            .collect()
    }

    /// The offset safe to commit for one partition, if anything was processed.
    pub fn safe(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .iter()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .and_then(|(_, o)| o.safe())
    }

    /// One past the last processed offset of a partition.
    pub fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .iter()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .and_then(|(_, o)| o.next)
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

    pub fn mark_committed(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(Arc::clone(topic), partition)) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// Forgets a revoked partition.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        let before: u64 = self.pending_of(topic, partition);
        self.parts
            .retain(|(t, p), _| !(&**t == topic && *p == partition));
        self.in_flight = self.in_flight.saturating_sub(before);
    }

    fn pending_of(&self, topic: &str, partition: i32) -> u64 {
        self.parts
            .iter()
            .filter(|((t, p), _)| &**t == topic && *p == partition)
            .flat_map(|(_, o)| o.pending.iter().map(|&(_, n)| u64::from(n)))
            .sum()
    }

    /// Produced messages not yet acknowledged, over all partitions.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// A produced message whose delivery failed, to be sent again.
#[derive(Debug)]
pub struct Retry {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
    pub source: Box<Source>,
}

/// The producer's context: acknowledgements, retries and fatal errors.
pub struct Delivery {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub retries: Mutex<Vec<Retry>>,
    pub fatal: Mutex<Option<String>>,
    pub metrics: Metrics,
}

impl Delivery {
    pub fn new(tracker: Arc<Mutex<OffsetTracker>>, metrics: Metrics) -> Delivery {
        Delivery {
            tracker,
            retries: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            metrics,
        }
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
    matches!(
        code,
        C::Fatal
            | C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::UnsupportedForMessageFormat
            | C::OutOfOrderSequenceNumber
            | C::InvalidProducerEpoch
            | C::ProducerFenced
    )
}

impl ClientContext for Delivery {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.set_fatal(format!("{error}: {reason}"));
        } else {
            tracing::warn!("producer: {error}: {reason}");
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::metrics::record_statistics(&self.metrics, "producer", &statistics);
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = Box<Source>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Box<Source>) {
        match result {
            Ok(_) => {
                if let Some(ts) = source.timestamp {
                    let latency = (now_millis() - ts).max(0) as f64 / 1000.0;
                    self.metrics.end_to_end_seconds.observe(latency);
                }
                self.tracker
                    .lock()
                    .acknowledged(&source.topic, source.partition, source.offset);
            }
            Err((e, msg)) => {
                let code = e.rdkafka_error_code();
                self.metrics
                    .delivery_errors
                    .with_label_values(&[code.map_or("unknown", |c| error_name(c))])
                    .inc();
                if code.is_some_and(is_permanent) {
                    self.set_fatal(format!(
                        "cannot deliver to {} (caused by {} partition {} offset {}): {e}",
                        msg.topic(),
                        source.topic,
                        source.partition,
                        source.offset
                    ));
                    return;
                }
                tracing::warn!("delivery to {} failed, retrying: {e}", msg.topic());
                self.retries.lock().push(Retry {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers: msg.headers().map(|h| h.detach()),
                    source,
                });
            }
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
        tr.processed(&t, 0, 10, 2);
        tr.processed(&t, 0, 11, 0);
        tr.processed(&t, 0, 12, 1);
        assert_eq!(tr.safe("in", 0), Some(10));
        assert_eq!(tr.in_flight(), 3);
        tr.acknowledged(&t, 0, 12);
        assert_eq!(tr.safe("in", 0), Some(10), "12 is done but 10 is not");
        tr.acknowledged(&t, 0, 10);
        assert_eq!(tr.safe("in", 0), Some(10));
        tr.acknowledged(&t, 0, 10);
        assert_eq!(tr.safe("in", 0), Some(13));
        assert_eq!(tr.in_flight(), 0);
        assert_eq!(tr.committable(), vec![(Arc::clone(&t), 0, 13)]);
        tr.mark_committed(&t, 0, 13);
        assert!(tr.committable().is_empty());
        tr.processed(&t, 0, 13, 0);
        assert_eq!(tr.committable(), vec![(Arc::clone(&t), 0, 14)]);
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
}
