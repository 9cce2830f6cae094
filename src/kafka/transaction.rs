//! A worker's Kafka transactions (`[kafka] guarantee = "exactly_once"`),
//! kept as Kafka Streams' `StreamsProducer` keeps them (KIP-447).
//!
//! Each worker has a transactional producer of its own, its
//! `transactional.id` stable per group, instance and worker, so that a
//! restarted instance fences its previous incarnation and aborts what that
//! one left open. A transaction begins with the first message a worker
//! sends after a commit, and holds every output, dead letter, erasure
//! tombstone and changelog record of the worker's partitions until the
//! next commit, which adds their input offsets with the consumer group's
//! metadata (`send_offsets_to_transaction`): a member of an older
//! generation cannot commit, so a zombie's work is never visible. The
//! commit runs on the worker's committer thread (`committer`), which holds
//! this producer's lock until it ends.
//!
//! Errors are classified as librdkafka classifies them: retriable (the
//! same call again, until the deadline), abortable (abort; the worker
//! rewinds its partitions to the last committed state) and fatal (the
//! producer is dropped and a new one initialised, which also rewinds).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::kafka::delivery::{Delivery, SourceCodec};
use crate::kafka::error::PipelineError;
use crate::kafka::settings::KafkaSettings;
use crate::kafka::transaction_seal::{Unfinished, SEAL_KEY};
use crate::metrics::{Metrics, TRANSACTION_ABORT_CAUSES};

/// How long one transactional call may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past its own timeout a call that librdkafka may not bound
/// is waited for before the producer is given up (see [`bounded_call`]).
const STUCK_GRACE: Duration = Duration::from_secs(5);
/// How long an abort waits for the delivery reports of what it purged.
const PURGE_REPORTS_WAIT: Duration = Duration::from_secs(5);

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Aborted: the producer goes on; the worker rewinds.
    Aborted(String),
    /// The producer cannot go on (fenced, or a fatal error): it was dropped
    /// and a new one initialised; the worker rewinds.
    Fatal(String),
}

/// What a transaction's failure is counted as (`cause` of
/// `ces_transactions_aborted_total`, in [`TRANSACTION_ABORT_CAUSES`]
/// order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortCause {
    /// A send or the commit failed in a way that requires an abort.
    Error,
    /// The producer was fenced or failed fatally.
    Fatal,
    /// The partitions were lost with the group session.
    Lost,
}

impl AbortCause {
    pub fn name(self) -> &'static str {
        TRANSACTION_ABORT_CAUSES[self as usize]
    }
}

/// A worker's transactional producer and its open transaction.
pub struct Transactions {
    settings: Arc<KafkaSettings>,
    worker: usize,
    /// Builds the producer's context (acknowledgements and errors).
    context: Box<dyn Fn() -> Delivery + Send>,
    producer: Arc<ThreadedProducer<Delivery>>,
    /// When the open transaction began.
    open: Option<Instant>,
    /// A failure the worker has not rewound for yet: one can happen while
    /// the state store sends through this producer, out of the worker's
    /// sight.
    unhandled: Option<Failure>,
    /// The input offsets the open transaction's commit carries, once
    /// the commit is attempted.
    attempted: Vec<(String, i32, i64)>,
    /// The last transaction that ended without a confirmed commit, until
    /// the worker has sealed what it touched (`transaction_seal`).
    unfinished: Option<Unfinished>,
    metrics: Metrics,
}

impl Transactions {
    /// Creates worker `worker`'s producer and initialises its transactions
    /// (fencing an earlier producer with the same id), within `deadline`.
    pub fn start(
        settings: Arc<KafkaSettings>,
        worker: usize,
        context: Box<dyn Fn() -> Delivery + Send>,
        metrics: Metrics,
        deadline: Instant,
    ) -> Result<Transactions, PipelineError> {
        let producer = new_producer(&settings, worker, &context, deadline)?;
        Ok(Transactions {
            settings,
            worker,
            context,
            producer,
            open: None,
            unhandled: None,
            attempted: Vec::new(),
            unfinished: None,
            metrics,
        })
    }

    /// The producer everything of this worker goes through.
    pub fn producer(&self) -> &Arc<ThreadedProducer<Delivery>> {
        &self.producer
    }

    /// When the open transaction began, if one is open.
    pub fn opened_at(&self) -> Option<Instant> {
        self.open
    }

    /// Begins a transaction unless one is open.
    pub fn ensure_open(&mut self) -> Result<(), Failure> {
        if self.open.is_some() {
            return Ok(());
        }
        match self.producer.begin_transaction() {
            Ok(()) => {
                self.open = Some(Instant::now());
                self.attempted.clear();
                // What the last transaction touched is known by now (its
                // commit or abort waited for every report).
                self.producer.context().take_touched();
                Ok(())
            }
            Err(e) => Err(self.fail(e, AbortCause::Error)),
        }
    }

    /// Commits the open transaction with `offsets` (the next offset to
    /// process of each input partition it covers) in the group of `group`.
    /// On failure the transaction is aborted (or the producer replaced)
    /// before this returns.
    pub fn commit(
        &mut self,
        offsets: &TopicPartitionList,
        group: Arc<ConsumerGroupMetadata>,
    ) -> Result<(), Failure> {
        let Some(began) = self.open else {
            return Ok(());
        };
        if let Some(why) = self.producer.context().transaction_failed() {
            return Err(self.abort_with(why, AbortCause::Error));
        }
        let deadline = Instant::now() + self.settings.shutdown_timeout.max(CALL_TIMEOUT);
        let committing = Instant::now();
        self.attempted = offsets
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
                _ => None,
            })
            .collect();
        let mut stuck = false;
        let sent = if offsets.count() > 0 {
            retrying(deadline, || {
                let (producer, offsets, group) = (
                    Arc::clone(&self.producer),
                    offsets.clone(),
                    Arc::clone(&group),
                );
                let call =
                    move || producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT);
                bounded_call(CALL_TIMEOUT + STUCK_GRACE, call).unwrap_or_else(|| {
                    stuck = true;
                    Ok(())
                })
            })
        } else {
            Ok(())
        };
        if stuck {
            return Err(self.replace(format!(
                "sending the offsets to the transaction was still blocked {:?} after its timeout (the group coordinator away; librdkafka#5456): the producer is given up",
                STUCK_GRACE
            )));
        }
        let offsets_sent = began.elapsed();
        // commit_transaction flushes what is in flight first, and that
        // flush waits in steps of the ThreadedProducer's 100 ms poll (as
        // rust-rdkafka's own flush does): a commit took 100 ms where the
        // broker needed 3-5. Sent at once and watched here, the flush
        // inside has nothing left to wait for.
        let result = sent.and_then(|()| {
            send_in_flight(&self.producer, deadline);
            retrying(deadline, || self.producer.commit_transaction(CALL_TIMEOUT))
        });
        tracing::debug!(
            worker = self.worker,
            open_ms = began.elapsed().as_millis() as u64,
            commit_ms = committing.elapsed().as_millis() as u64,
            offsets_ms = (offsets_sent - (committing - began)).as_millis() as u64,
            "transaction committed"
        );
        match result {
            Ok(()) => {
                self.open = None;
                self.metrics.transactions_committed.inc();
                self.metrics
                    .transaction_seconds
                    .observe(began.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => Err(self.fail(e, AbortCause::Error)),
        }
    }

    /// Aborts the open transaction, if any (the partitions were lost, or
    /// the worker gives up on it).
    pub fn abort(&mut self, cause: AbortCause) -> Failure {
        if let Some(why) = self.producer.context().unusable() {
            return self.replace(why);
        }
        self.abort_with("aborted".into(), cause)
    }

    /// A send into the open transaction failed with `e` (not a full
    /// queue): the transaction is aborted, or the producer replaced.
    pub fn send_failed(&mut self, e: KafkaError) -> Failure {
        self.fail(e, AbortCause::Error)
    }

    /// Takes the last transaction that ended without a confirmed commit,
    /// if it touched any partition: the worker finds out how it ended and
    /// has [`Self::seal`] close what it touched when it was aborted.
    pub fn take_unfinished(&mut self) -> Option<Unfinished> {
        self.unfinished.take().filter(|u| !u.partitions.is_empty())
    }

    /// Writes one record to each of `partitions` in a transaction of its
    /// own and aborts it: the abort's markers close, as aborted, whatever
    /// an unfinished transaction of this producer left open there (see
    /// `transaction_seal`). On failure the transaction is aborted (or the
    /// producer replaced) as any other, and what it touched is unfinished
    /// in turn.
    pub fn seal(&mut self, partitions: &[(Box<str>, i32)]) -> Result<(), Failure> {
        self.ensure_open()?;
        for (topic, partition) in partitions {
            let record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, SourceCodec::NO_SOURCE)
                    .partition(*partition)
                    .key(SEAL_KEY);
            if let Err((e, _)) = self.producer.send(record) {
                return Err(self.fail(e, AbortCause::Error));
            }
        }
        let deadline = Instant::now() + self.settings.shutdown_timeout.max(CALL_TIMEOUT);
        send_in_flight(&self.producer, deadline);
        self.open = None;
        match retrying(deadline, || self.producer.abort_transaction(CALL_TIMEOUT)) {
            Ok(()) => {
                self.settle_purged();
                self.producer.context().take_touched();
                tracing::warn!(
                    worker = self.worker,
                    partitions = ?partitions,
                    "sealed the partitions an aborted transaction wrote to (an abort's marker closes what it may have left open)"
                );
                Ok(())
            }
            Err(e) => {
                self.open = Some(Instant::now());
                Err(self.fail(e, AbortCause::Error))
            }
        }
    }

    /// Takes the failure the worker has not rewound for, if any.
    pub fn take_unhandled(&mut self) -> Option<Failure> {
        self.unhandled.take()
    }

    /// Classifies a failed transactional call: aborts what can be aborted,
    /// replaces the producer when it cannot go on.
    fn fail(&mut self, e: KafkaError, cause: AbortCause) -> Failure {
        if is_fatal(&e) || self.producer.context().unusable().is_some() {
            return self.replace(e.to_string());
        }
        self.abort_with(e.to_string(), cause)
    }

    fn abort_with(&mut self, why: String, cause: AbortCause) -> Failure {
        if self.open.take().is_none() {
            return self.unhandled(Failure::Aborted(why));
        }
        let deadline = Instant::now() + self.settings.shutdown_timeout.max(CALL_TIMEOUT);
        match retrying(deadline, || self.producer.abort_transaction(CALL_TIMEOUT)) {
            Ok(()) => {
                self.settle_purged();
                self.note_unfinished();
                self.count_abort(cause);
                tracing::warn!(
                    worker = self.worker,
                    cause = cause.name(),
                    "transaction aborted: {why}"
                );
                self.unhandled(Failure::Aborted(why))
            }
            Err(e) => {
                self.note_unfinished();
                self.replace(format!("{why}; the abort failed too: {e}"))
            }
        }
    }

    /// Drops the producer and initialises a new one with the same
    /// transactional id (which aborts whatever the old one left open).
    fn replace(&mut self, why: String) -> Failure {
        if self.open.take().is_some() {
            self.note_unfinished();
        }
        self.count_abort(AbortCause::Fatal);
        tracing::error!(
            worker = self.worker,
            transactional_id = %self.settings.transactional_id(self.worker),
            "transactional producer unusable, replacing it: {why} (a producer fenced again and again means another live instance has the same kafka.instance_id)"
        );
        let deadline = Instant::now() + self.settings.shutdown_timeout.max(CALL_TIMEOUT);
        match new_producer(&self.settings, self.worker, &self.context, deadline) {
            Ok(p) => self.producer = p,
            Err(e) => tracing::error!(worker = self.worker, "cannot replace the producer: {e}"),
        }
        self.unhandled(Failure::Fatal(why))
    }

    /// The delivery reports of what an abort purged reach the producer's
    /// context a moment after the abort, through its polling thread: waits
    /// for them and forgets the failures they report, which would otherwise
    /// doom the next transaction (it did: aborts on `PurgeQueue`, one after
    /// the other, each followed by a rewind).
    fn settle_purged(&self) {
        let deadline = Instant::now() + PURGE_REPORTS_WAIT;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.producer.context().transaction_failed();
    }

    /// The transaction just ended without a confirmed commit: what it
    /// touched and the offsets its commit carried, for the worker.
    fn note_unfinished(&mut self) {
        let touched = self.producer.context().take_touched();
        let offsets = std::mem::take(&mut self.attempted);
        let unfinished = self.unfinished.get_or_insert_with(Unfinished::default);
        for p in touched {
            if !unfinished.partitions.contains(&p) {
                unfinished.partitions.push(p);
            }
        }
        // A seal's own transaction carries no offsets: the outcome of the
        // one it was sealing is still the question.
        if !offsets.is_empty() {
            unfinished.offsets = offsets;
        }
    }

    fn unhandled(&mut self, failure: Failure) -> Failure {
        self.unhandled = Some(failure.clone());
        failure
    }

    fn count_abort(&self, cause: AbortCause) {
        self.metrics.transactions_aborted[cause as usize].inc();
    }
}

/// A new transactional producer for `worker`, its transactions initialised.
fn new_producer(
    settings: &KafkaSettings,
    worker: usize,
    context: &(dyn Fn() -> Delivery + Send),
    deadline: Instant,
) -> Result<Arc<ThreadedProducer<Delivery>>, PipelineError> {
    let producer: ThreadedProducer<Delivery> = settings
        .transactional_producer_config(worker)
        .create_with_context(context())
        .map_err(|source| PipelineError::Client {
            client: "transactional producer",
            source,
        })?;
    retrying(deadline, || producer.init_transactions(CALL_TIMEOUT)).map_err(|e| {
        PipelineError::Producer(format!(
            "cannot initialise transactions ({}): {e}",
            settings.transactional_id(worker)
        ))
    })?;
    Ok(Arc::new(producer))
}

/// Runs a transactional call on a thread of its own and waits for it at
/// most `limit`; `None` when it is still blocked then (the thread is left
/// to end when the call does). librdkafka's `send_offsets_to_transaction`
/// can block past its own timeout while the group coordinator is away
/// (confluentinc/librdkafka#5456): a worker stayed blocked in it for
/// minutes after the node that coordinated both its group and its
/// transactions was killed, and its partitions never committed again.
fn bounded_call(
    limit: Duration,
    call: impl FnOnce() -> KafkaResult<()> + Send + 'static,
) -> Option<KafkaResult<()>> {
    let (done, answer) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("transactional-call".into())
        .spawn(move || {
            let _ = done.send(call());
        })
        .ok()?;
    answer.recv_timeout(limit).ok()
}

/// Sends what lingers in `producer` at once and waits, until `deadline`,
/// for every message to be acknowledged (or failed).
fn send_in_flight(producer: &ThreadedProducer<Delivery>, deadline: Instant) {
    let _ = producer.flush(Duration::ZERO);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs a transactional call again while it fails with a retriable error
/// and `deadline` is ahead.
fn retrying(deadline: Instant, mut call: impl FnMut() -> KafkaResult<()>) -> KafkaResult<()> {
    loop {
        match call() {
            Err(e) if is_retriable(&e) && Instant::now() < deadline => {
                tracing::debug!("transactional call failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}
