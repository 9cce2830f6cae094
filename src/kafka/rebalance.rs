//! Consumer-group rebalances, handled explicitly.
//!
//! librdkafka calls [`GroupContext::rebalance`] from inside the consumer's
//! poll, on the pipeline thread, so no event is being processed meanwhile.
//! On revoke: finish the partitions' in-flight work (every output and dead
//! letter acknowledged), commit their offsets, hand their state to the
//! state store, drop it. On assign: build (or restore) the partitions' state
//! before their first message, and start them where the state says.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use crate::kafka::delivery::{Delivery, OffsetTracker};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::{PartitionHooks, PartitionState, Partitions};

/// The consumer's context: owns what a rebalance must touch.
pub struct GroupContext {
    pub model: Arc<Model>,
    pub partitions: Partitions,
    pub producer: Arc<ThreadedProducer<Delivery>>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// Input (topic, partition) pairs currently assigned.
    pub assigned: Mutex<BTreeSet<(String, i32)>>,
    pub metrics: Metrics,
    /// How long a revoke may wait for acknowledgements.
    pub flush_timeout: Duration,
    pub hooks: Option<Arc<dyn PartitionHooks>>,
    /// `auto.offset.reset` is latest: a partition without state starts at
    /// the end of the log instead of rebuilding from its beginning.
    pub reset_to_end: bool,
    /// Set once the pipeline stops: an assignment that comes during the
    /// shutdown is taken without restoring anything.
    pub stop: Arc<AtomicBool>,
    /// When the shutdown must be over.
    pub deadline: Mutex<Option<Instant>>,
}

impl ClientContext for GroupContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // The end of a partition is news, not an error (see the pipeline).
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        tracing::warn!("consumer: {error}: {reason}");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::metrics::record_statistics(&self.metrics, "consumer", &statistics);
    }
}

fn pairs(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl GroupContext {
    /// `deadline`, or the shutdown's if earlier.
    fn bounded(&self, deadline: Instant) -> Instant {
        match *self.deadline.lock() {
            Some(d) => d.min(deadline),
            None => deadline,
        }
    }

    /// Resends failed deliveries and waits until nothing produced is
    /// waiting for an acknowledgement, or until `deadline`.
    pub fn drain(&self, deadline: Instant) -> bool {
        loop {
            crate::kafka::pipeline::resend(&self.producer, self.producer.context().take_retries());
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self.producer.flush(left.min(Duration::from_millis(500)));
            let done = self.tracker.lock().in_flight() == 0
                && self.producer.context().retries.lock().is_empty();
            if done {
                return true;
            }
            if Instant::now() >= deadline || self.producer.context().fatal().is_some() {
                return false;
            }
        }
    }

    /// Commits the safe offsets of `pairs` synchronously.
    pub fn commit(&self, consumer: &BaseConsumer<GroupContext>, pairs: &[(String, i32)]) {
        let mut tpl = TopicPartitionList::new();
        {
            let tracker = self.tracker.lock();
            for (topic, partition) in pairs {
                if let Some(offset) = tracker.safe(topic, *partition) {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                let mut tracker = self.tracker.lock();
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        tracker.mark_committed(&Arc::from(e.topic()), e.partition(), o);
                    }
                }
                tracing::debug!(?pairs, "offsets committed");
            }
            Err(e) => tracing::warn!("cannot commit offsets of {pairs:?}: {e}"),
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<GroupContext>, tpl: &mut TopicPartitionList) {
        let list = pairs(tpl);
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        if self.stop.load(Ordering::SeqCst) {
            // Leaving the group: nothing of these is restored or processed.
            tracing::info!(partitions = ?list, "partitions assigned during the shutdown: not taken");
            return;
        }
        tracing::info!(partitions = ?list, "partitions assigned");
        // The group's committed offsets say which outputs were already
        // published; they do not say where to resume, because the state
        // lives in memory (and in snapshots), not in Kafka.
        let timeout = self
            .bounded(Instant::now() + Duration::from_secs(30))
            .saturating_duration_since(Instant::now());
        let committed: Vec<((String, i32), i64)> = match consumer
            .committed_offsets(tpl.clone(), timeout)
        {
            Ok(c) => c
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::warn!("cannot read committed offsets: {e}; outputs of rebuilt events may be published again");
                Vec::new()
            }
        };
        let committed_of = |t: &str, p: i32| {
            committed
                .iter()
                .find(|((ct, cp), _)| ct == t && *cp == p)
                .map(|(_, o)| *o)
        };
        let mut assigned = self.assigned.lock();
        let numbers: BTreeSet<i32> = list.iter().map(|(_, p)| *p).collect();
        for p in numbers {
            if self.partitions.get(p).is_some() {
                continue;
            }
            let topics: Vec<String> = list
                .iter()
                .filter(|(_, q)| *q == p)
                .map(|(t, _)| t.clone())
                .collect();
            // A restored partition resumes after its snapshot; without one,
            // the state is rebuilt from the log (auto.offset.reset).
            let (mut state, offsets) = match &self.hooks {
                Some(h) => h.restore(p, &topics, &self.stop),
                None => (
                    PartitionState::new(Arc::clone(&self.model)),
                    vec![None; topics.len()],
                ),
            };
            for (topic, offset) in topics.iter().zip(offsets) {
                let start = match offset {
                    Some(o) => Offset::Offset(o),
                    None if self.reset_to_end => Offset::End,
                    None => Offset::Beginning,
                };
                let _ = tpl.set_partition_offset(topic, p, start);
                let from = match start {
                    Offset::Offset(o) => Some(o),
                    Offset::Beginning => Some(0),
                    _ => None,
                };
                if let Some(from) = from {
                    state.started_at.push((topic.clone(), from));
                }
                if let (Some(from), Some(c)) = (from, committed_of(topic, p)) {
                    if from < c {
                        state.silent_below.push((topic.clone(), c));
                    }
                }
                {
                    let mut tracker = self.tracker.lock();
                    tracker.assigned(topic, p, committed_of(topic, p));
                    if let Offset::Offset(o) = start {
                        tracker.restored(topic, p, o);
                    }
                }
                tracing::info!(topic = %topic, partition = p, start = ?start, committed = ?committed_of(topic, p), "partition starts");
            }
            self.partitions.insert(p, state);
        }
        assigned.extend(list);
        self.metrics.assigned_partitions.set(assigned.len() as i64);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<GroupContext>, tpl: &TopicPartitionList) {
        let list = pairs(tpl);
        tracing::info!(partitions = ?list, "partitions revoked");
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        self.release(consumer, &list);
    }

    /// Finishes, commits, hands over and drops the state of `list`.
    pub fn release(&self, consumer: &BaseConsumer<GroupContext>, list: &[(String, i32)]) {
        // Only what is still held (a close after a shutdown revokes again).
        let list: Vec<(String, i32)> = {
            let assigned = self.assigned.lock();
            list.iter()
                .filter(|p| assigned.contains(*p))
                .cloned()
                .collect()
        };
        if list.is_empty() {
            return;
        }
        let list = &list[..];
        let started = Instant::now();
        let deadline = self.bounded(started + self.flush_timeout);
        if !self.drain(deadline) {
            tracing::warn!(
                "outputs still unacknowledged after {:?}: their events will be processed again by the next owner",
                self.flush_timeout
            );
        }
        self.commit(consumer, list);
        let mut assigned = self.assigned.lock();
        for pair in list {
            assigned.remove(pair);
        }
        let numbers: BTreeSet<i32> = list.iter().map(|(_, p)| *p).collect();
        for p in numbers {
            if assigned.iter().any(|(_, q)| *q == p) {
                continue; // another topic of this partition number stays
            }
            // The state covers every processed event; it may be saved only
            // if all their outputs are acknowledged, else a restore would
            // skip events whose signals were never delivered.
            let (next, acknowledged) = {
                let tracker = self.tracker.lock();
                let topics: Vec<&(String, i32)> = list.iter().filter(|(_, q)| *q == p).collect();
                let next: Vec<(String, Option<i64>)> = topics
                    .iter()
                    .map(|(t, q)| (t.clone(), tracker.next(t, *q)))
                    .collect();
                let acked = topics
                    .iter()
                    .all(|(t, q)| tracker.safe(t, *q) == tracker.next(t, *q));
                (next, acked)
            };
            if let Some(state) = self.partitions.remove(p) {
                if let Some(h) = &self.hooks {
                    if acknowledged {
                        h.release(p, &mut state.lock(), &next, deadline);
                    } else {
                        tracing::warn!(partition = p, "outputs unacknowledged: no snapshot on release; the next owner restores the previous one");
                    }
                }
            }
        }
        {
            let mut tracker = self.tracker.lock();
            for (t, p) in list {
                tracker.forget(t, *p);
            }
        }
        self.metrics.assigned_partitions.set(assigned.len() as i64);
        tracing::info!(
            partitions = ?list,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partitions released"
        );
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!("cannot assign {:?}: {e}", pairs(tpl));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!("cannot unassign {:?}: {e}", pairs(tpl));
                }
            }
            other => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::error!("rebalance error: {other:?}");
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::warn!("offset commit failed for {:?}: {e}", pairs(offsets));
        }
    }
}
