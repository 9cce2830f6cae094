//! Consumer-group rebalances, handled explicitly.
//!
//! librdkafka calls [`GroupContext::rebalance`] from inside the consumer's
//! poll, on the consumer's own thread. On revoke: take the partitions back
//! from their workers (no batch of them runs any more), finish their
//! in-flight work (every output and dead letter acknowledged), commit their
//! offsets, hand their state to the state store, drop it. On assign: build
//! or restore the partitions' state (several at once), start them where the
//! state says, split each partition's messages into a queue of its own and
//! hand the partition to a worker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, RebalanceProtocol,
};
use rdkafka::producer::ThreadedProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use crate::engine::Engine;
use crate::kafka::delivery::{drain, Delivery, OffsetTracker, SourceCodec};
use crate::kafka::error::PipelineError;
use crate::kafka::restore;
use crate::kafka::worker::{Feed, Pool, Revocation, Unit};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::{PartitionHooks, PartitionState, Partitions};

/// How often offsets already sent are sent again (in case that commit
/// failed: its answer, the commit callback, does not reach a BaseConsumer
/// here). Offsets that moved are sent every `commit_interval`; the same
/// ones again each interval piled up ~45 commits during a 10 s outage of
/// the coordinator, all failing at once on its return.
const COMMIT_AGAIN: Duration = Duration::from_secs(5);

/// exactly_once: how long a revocation waits for the workers to hand the
/// partitions back (librdkafka's default max.poll.interval.ms, the group's
/// own patience with a member busy in a rebalance).
const EXACTLY_ONCE_HAND_BACK: Duration = Duration::from_secs(300);

/// A partition restored on assignment: its number, topics, state, and the
/// offset each topic resumes from.
type Restore = (i32, Vec<String>, PartitionState, Vec<Option<i64>>);

/// The consumer's context: owns what a rebalance must touch.
pub struct GroupContext {
    pub model: Arc<Model>,
    pub partitions: Partitions,
    pub producer: Arc<ThreadedProducer<Delivery>>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub codec: Arc<SourceCodec>,
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
    /// The workers that get the partitions.
    pub(crate) pool: Arc<Mutex<Pool<GroupContext>>>,
    /// The consumer itself, to split partition queues off it.
    pub consumer: OnceLock<Weak<BaseConsumer<GroupContext>>>,
    /// New states keep the customers they remove (the changelog store).
    pub track_removals: bool,
    /// When offsets already sent were last sent again ([`COMMIT_AGAIN`]).
    pub commit_sent: Mutex<Option<Instant>>,
    /// exactly_once: offsets are committed in the workers' transactions,
    /// never by the consumer.
    pub exactly_once: bool,
    pub sweep_every: Duration,
    /// exactly_once: the group's metadata as of the last rebalance this
    /// member went through (set after each assignment and revocation,
    /// cleared when the partitions are lost). Not the consumer's current
    /// metadata: after a lost session librdkafka resets its member and
    /// generation while it rejoins, and offsets sent with that reset
    /// metadata pass the group's generation check: a zombie's transaction,
    /// committed so, published 46 outputs twice.
    pub member: Mutex<Option<Arc<ConsumerGroupMetadata>>>,
}

impl ClientContext for GroupContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // The end of a partition is news, not an error (see the workers).
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

    /// The committable offsets of `pairs` (all of them when `None`); with
    /// `again`, also those equal to the last ones sent.
    fn committable(&self, only: Option<&[(String, i32)]>, again: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let tracker = self.tracker.lock();
        for (topic, partition, offset) in tracker.committable(again) {
            if only.is_none_or(|l| l.iter().any(|(t, p)| **t == *topic && *p == partition)) {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
            }
        }
        tpl
    }

    /// Commits, without waiting, the offsets that moved since the last
    /// commit sent; every [`COMMIT_AGAIN`] also those sent before.
    pub fn commit_async(&self, consumer: &BaseConsumer<GroupContext>) {
        if self.exactly_once {
            return;
        }
        let mut last = self.commit_sent.lock();
        let again = last.is_none_or(|at| at.elapsed() >= COMMIT_AGAIN);
        let tpl = self.committable(None, again);
        if tpl.count() > 0 {
            match consumer.commit(&tpl, CommitMode::Async) {
                Ok(()) => {
                    self.sent(&tpl);
                    if again {
                        *last = Some(Instant::now());
                    }
                }
                Err(e) => tracing::warn!("cannot commit offsets: {e}"),
            }
        }
    }

    /// Offsets handed to the consumer to commit.
    fn sent(&self, tpl: &TopicPartitionList) {
        let mut tracker = self.tracker.lock();
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                tracker.mark_sent(e.topic(), e.partition(), o);
            }
        }
    }

    /// Commits the safe offsets of `pairs` synchronously.
    pub fn commit(&self, consumer: &BaseConsumer<GroupContext>, pairs: &[(String, i32)]) {
        if self.exactly_once {
            return;
        }
        let tpl = self.committable(Some(pairs), true);
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.confirmed(&tpl);
                tracing::debug!(?pairs, "offsets committed");
            }
            Err(e) => tracing::warn!("cannot commit offsets of {pairs:?}: {e}"),
        }
    }

    /// The broker confirmed these offsets.
    fn confirmed(&self, tpl: &TopicPartitionList) {
        let mut tracker = self.tracker.lock();
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                tracker.mark_committed(e.topic(), e.partition(), o);
            }
        }
    }

    fn on_assign(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        tpl: &mut TopicPartitionList,
    ) -> Vec<i32> {
        let list = pairs(tpl);
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        if self.stop.load(Ordering::SeqCst) {
            // Leaving the group: nothing of these is restored or processed.
            tracing::info!(partitions = ?list, "partitions assigned during the shutdown: not taken");
            return Vec::new();
        }
        tracing::info!(partitions = ?list, "partitions assigned");
        // The group's committed offsets say which outputs were already
        // published; they do not say where to resume, because the state
        // lives in memory (and in snapshots), not in Kafka.
        let Some(committed) = self.committed_offsets(consumer, tpl) else {
            tracing::info!(partitions = ?list, "partitions assigned during the shutdown: not taken");
            return Vec::new();
        };
        let committed_of = |t: &str, p: i32| {
            committed
                .iter()
                .find(|((ct, cp), _)| ct == t && *cp == p)
                .map(|(_, o)| *o)
        };
        // The partition numbers new here, with their topics.
        let mut new: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for (t, p) in &list {
            if self.partitions.get(*p).is_none() {
                new.entry(*p).or_default().push(t.clone());
            }
        }
        // Restores read snapshots (a changelog partition each): several
        // at once.
        let restored: Vec<Restore> = std::thread::scope(|s| {
            let handles: Vec<_> = new
                .iter()
                .map(|(p, topics)| {
                    s.spawn(move || {
                        let committed: Vec<Option<i64>> =
                            topics.iter().map(|t| committed_of(t, *p)).collect();
                        let (state, offsets) = restore::restore(
                            self.hooks.as_ref(),
                            || self.new_state(),
                            *p,
                            topics,
                            &committed,
                            &self.stop,
                        );
                        (*p, topics.clone(), state, offsets)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut started = Vec::new();
        for (p, topics, mut state, offsets) in restored {
            let committed: Vec<Option<i64>> = topics.iter().map(|t| committed_of(t, p)).collect();
            let starts = restore::start(
                &mut state,
                p,
                &topics,
                offsets,
                &committed,
                self.reset_to_end,
                &self.tracker,
            );
            for (topic, start) in topics.iter().zip(starts) {
                let _ = tpl.set_partition_offset(topic, p, start);
            }
            self.partitions.insert(p, state);
            started.push(p);
        }
        let mut assigned = self.assigned.lock();
        assigned.extend(list);
        self.metrics.assigned_partitions.set(assigned.len() as i64);
        started
    }

    /// The group's committed offsets of `tpl`, as the broker has them.
    ///
    /// at_least_once: asked for up to 30 s; past that, a partition without
    /// an answer (or with a transaction still deciding it) restores
    /// without one, and outputs of rebuilt events may be published again.
    /// exactly_once: asked for until every one is known, since a guess
    /// either way publishes twice or loses outputs (the coordinator is
    /// loading after a broker restart, say); `None` if the pipeline stops
    /// meanwhile.
    fn committed_offsets(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        tpl: &TopicPartitionList,
    ) -> Option<Vec<((String, i32), i64)>> {
        let started = Instant::now();
        let deadline = self.bounded(started + Duration::from_secs(30));
        let mut said = None::<Instant>;
        loop {
            if self.exactly_once && self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let timeout = if self.exactly_once {
                Duration::from_secs(10)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let answer = consumer.committed_offsets(tpl.clone(), timeout);
            let gave_up = !self.exactly_once && Instant::now() >= deadline;
            let why = match answer {
                Ok(c) => {
                    let pending = c.elements().iter().any(|e| e.error().is_err());
                    if !pending || gave_up {
                        if pending {
                            tracing::warn!("some committed offsets are still unknown (a transaction in progress): outputs of rebuilt events may be published again");
                        }
                        return Some(
                            c.elements()
                                .iter()
                                .filter_map(|e| match (e.error(), e.offset()) {
                                    (Ok(()), Offset::Offset(o)) => {
                                        Some(((e.topic().to_string(), e.partition()), o))
                                    }
                                    _ => None,
                                })
                                .collect(),
                        );
                    }
                    "a transaction still deciding them".to_string()
                }
                Err(e) if gave_up => {
                    tracing::warn!("cannot read committed offsets: {e}; outputs of rebuilt events may be published again");
                    return Some(Vec::new());
                }
                Err(e) => e.to_string(),
            };
            if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                said = Some(Instant::now());
                tracing::warn!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the group's committed offsets are not known yet ({why}): the assigned partitions wait for them{}",
                    crate::kafka::transaction_seal::hanging_hint(started.elapsed())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new, empty partition state (no state store).
    fn new_state(&self) -> PartitionState {
        let mut engine = Engine::new(Arc::clone(&self.model));
        if self.track_removals {
            engine.customers_mut().track_removals();
        }
        PartitionState::from_engine(engine)
    }

    /// Splits the queues of partitions just assigned off the consumer's
    /// queue and hands the partitions to the workers.
    fn hand_out(&self, started: &[i32]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let assigned = self.assigned.lock().clone();
        let pool = self.pool.lock();
        for &p in started {
            let Some(state) = self.partitions.get(p) else {
                continue;
            };
            let feeds: Vec<Feed<GroupContext>> = assigned
                .iter()
                .filter(|(_, q)| *q == p)
                .filter_map(|(topic, _)| {
                    let queue = consumer.split_partition_queue(topic, p)?;
                    Some(Feed {
                        topic: Arc::from(topic.as_str()),
                        topic_index: self.codec.topic_index(topic),
                        queue,
                        consumed: self.metrics.events_consumed.with_label_values(&[topic]),
                    })
                })
                .collect();
            pool.assign(Unit::new(p, feeds, state, self.sweep_every));
        }
    }

    /// The member's metadata of the generation this rebalance belongs to.
    fn remember_member(&self, consumer: &BaseConsumer<GroupContext>) {
        *self.member.lock() = consumer.group_metadata().map(Arc::new);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<GroupContext>, tpl: &TopicPartitionList) {
        let list = pairs(tpl);
        if consumer.assignment_lost() {
            // The group's session expired (the coordinator was unreachable
            // for session.timeout.ms): the partitions may have an owner
            // already. A commit can only fail now, and a snapshot could
            // land among the next owner's (the changelog store), so the
            // state is dropped as it is, as Kafka Streams closes lost tasks
            // "dirty": whoever owns the partitions next restores the last
            // snapshot and replays from there.
            tracing::warn!(partitions = ?list, "partitions lost (the group session expired): dropped without a commit or a snapshot");
            self.metrics.rebalances.with_label_values(&["lost"]).inc();
            self.release_as(consumer, &list, Revocation::Lost);
        } else {
            tracing::info!(partitions = ?list, "partitions revoked");
            self.metrics.rebalances.with_label_values(&["revoke"]).inc();
            self.release_as(consumer, &list, Revocation::Clean);
        }
    }

    /// Takes back, finishes, commits, hands over and drops the state of
    /// `list`.
    pub fn release(&self, consumer: &BaseConsumer<GroupContext>, list: &[(String, i32)]) {
        self.release_as(consumer, list, Revocation::Clean);
    }

    fn release_as(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        list: &[(String, i32)],
        how: Revocation,
    ) {
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
        let numbers: BTreeSet<i32> = list.iter().map(|(_, p)| *p).collect();
        // exactly_once: each worker writes the release snapshots of its
        // partitions into its transaction and commits it (or aborts it when
        // they were lost) before it answers.
        let ps: Vec<i32> = numbers.iter().copied().collect();
        // exactly_once: a worker blocked in a transactional call (the broker
        // away) answers late, but it must answer before the partitions go:
        // a worker still holding one after the group gave it to another
        // would commit that partition's offsets from the other owner's
        // progress in its own transaction, without the outputs (they were
        // lost on the next rewind). The group waits for its members up to
        // max.poll.interval.ms, so may the handover.
        let wait = if self.exactly_once {
            self.bounded(started + EXACTLY_ONCE_HAND_BACK)
        } else {
            deadline
        };
        let answered =
            self.pool
                .lock()
                .revoke(&ps, how, wait.saturating_duration_since(Instant::now()));
        if !answered && self.exactly_once && !self.stop.load(Ordering::SeqCst) {
            tracing::error!(partitions = ?ps, "a worker did not hand back its partitions: stopping");
            self.pool.lock().fail(PipelineError::HandBack {
                partitions: ps.clone(),
                waited: started.elapsed(),
            });
        }
        if how == Revocation::Clean && !self.exactly_once {
            if !drain(&self.producer, deadline) {
                tracing::warn!(
                    "outputs still unacknowledged after {:?}: their events will be processed again by the next owner",
                    self.flush_timeout
                );
            }
            self.commit(consumer, list);
        }
        let mut assigned = self.assigned.lock();
        for pair in list {
            assigned.remove(pair);
        }
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
                    h.forget(p);
                    if how == Revocation::Lost || self.exactly_once {
                        // Lost: dropped dirty (see on_revoke). exactly_once:
                        // the worker wrote it in its last transaction.
                    } else if acknowledged {
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
                self.remember_member(consumer);
                let started = self.on_assign(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match result {
                    // Queues split before the first fetch of a partition.
                    Ok(()) => self.hand_out(&started),
                    Err(e) => tracing::error!("cannot assign {:?}: {e}", pairs(tpl)),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    // Before the workers hear of it: none commits again
                    // until the next assignment.
                    *self.member.lock() = None;
                } else {
                    self.remember_member(consumer);
                }
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
        match result {
            // An offset counts as committed once the broker says so.
            Ok(()) => self.confirmed(offsets),
            Err(e) => tracing::warn!("offset commit failed for {:?}: {e}", pairs(offsets)),
        }
    }
}
