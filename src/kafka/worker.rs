//! The partition as the unit of work: a small pool of worker threads, each
//! owning the partitions handed to it outright.
//!
//! When a partition is assigned, its messages are split off the consumer's
//! queue into a queue of their own (`split_partition_queue`, as vector's
//! Kafka source and Kafka Streams' stream threads do) and the partition,
//! with that queue and its state, goes to the least loaded worker. A worker
//! takes a batch of messages from each of its partitions in turn: the
//! partition's state is locked once per batch, never per message; the batch
//! is parsed and scored in one go, its outputs encoded into reused buffers,
//! its offsets recorded with one tracker update, then its outputs sent.
//! Between batches the worker runs what would otherwise stall consumption:
//! a part of a sweep, a step of a snapshot, a gauge scan of a partition.
//! The consumer's own thread only serves callbacks (rebalances, statistics)
//! and commits; see `pipeline` and `rebalance`. In exactly_once mode each
//! worker commits its own transaction, on a thread of its own while it
//! goes on scoring (`committer`), holding the outputs meanwhile.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prometheus::IntCounter;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{ConsumerContext, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::Offset;

use crate::customers::Slot;
use crate::engine::{Outcome, Signal, SignalKind};
use crate::event::{self, ParseContext, Parsed};
use crate::kafka::committer::{Committer, Ended, Offsets};
use crate::kafka::delivery::{
    copy_headers, headers, is_about_the_message, is_permanent, Delivery, OffsetTracker, Produced,
    SourceCodec,
};
use crate::kafka::error::PipelineError;
use crate::kafka::restore;
use crate::kafka::settings::KafkaSettings;
use crate::kafka::shared::Shared;
use crate::kafka::transaction::{AbortCause, Failure, Transactions};
use crate::metrics::SCORE_RANGES;
use crate::model::{Clock, Model};
use crate::output::Encoder;
use crate::partition::{PartitionHooks, PartitionState, Progress, RecordSink, SharedPartition};
use crate::timestamp::{now_millis, Millis};

/// Messages taken from a partition before the worker turns to the next.
const BATCH: usize = 512;
/// Customers a sweep evaluates between two batches.
const SWEEP_PART: usize = 50_000;
/// How often a worker recounts a partition's published scores by range.
const SCAN_EVERY: Duration = Duration::from_secs(10);
/// How long an idle worker sleeps when no queue wakes it.
const IDLE: Duration = Duration::from_millis(50);
/// How many messages ahead a customer's state is prefetched.
const PREFETCH_DISTANCE: usize = 8;
/// exactly_once: how many bytes of outputs a worker holds while its
/// transaction commits before it stops scoring until the commit ends (a
/// commit takes milliseconds; one that takes seconds must not grow the
/// outputs held without bound).
const HELD_MAX_BYTES: usize = 4 << 20;

/// What every worker shares.
pub(crate) struct Context {
    pub kafka: Arc<KafkaSettings>,
    pub clock: Clock,
    pub shared: Shared,
    pub producer: Arc<ThreadedProducer<Delivery>>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub codec: Arc<SourceCodec>,
    pub hooks: Option<Arc<dyn PartitionHooks>>,
    /// Set to stop every worker (shutdown, or a worker failed).
    pub stop: Arc<AtomicBool>,
    /// Why a worker stopped the pipeline.
    pub failed: Mutex<Option<PipelineError>>,
    /// The consumer, as far as workers need it (exactly_once: the group's
    /// metadata for commits, seeks for rewinds); set once it exists.
    pub group: OnceLock<Arc<dyn GroupHandle>>,
    /// `auto.offset.reset` is latest: a partition rebuilt without saved
    /// state starts at the end of its log.
    pub reset_to_end: bool,
}

/// What a worker needs of the consumer in exactly_once mode.
pub(crate) trait GroupHandle: Send + Sync {
    /// The group's metadata (member, generation) as of the last
    /// rebalance this member went through, `None` once its partitions are
    /// lost: a transaction commits its offsets with it, so that a member
    /// of an older generation cannot.
    fn group_metadata(&self) -> Option<Arc<ConsumerGroupMetadata>>;
    /// Moves the consumer's position of an assigned partition.
    fn seek(&self, topic: &str, partition: i32, offset: Offset) -> Result<(), String>;
    /// The group's committed offsets of `topics`' `partition`, as the
    /// broker has them (a transaction whose commit answer was lost may
    /// have committed all the same).
    fn committed(&self, topics: &[String], partition: i32) -> Result<Vec<Option<i64>>, String>;
}

/// How a worker gives partitions back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revocation {
    /// Revoked, or this member stops: in exactly_once mode the worker
    /// writes their release snapshots and commits its transaction first.
    Clean,
    /// Lost with the group session: in exactly_once mode the worker aborts
    /// its transaction.
    Lost,
}

/// Why a worker's step did not finish.
enum Halt {
    /// The pipeline must stop.
    Stop(PipelineError),
    /// exactly_once: the open transaction failed; the worker's partitions
    /// go back to their last committed state.
    Rewind(Failure),
}

impl From<PipelineError> for Halt {
    fn from(e: PipelineError) -> Halt {
        Halt::Stop(e)
    }
}

impl Context {
    fn progress(&self) -> Arc<dyn Progress> {
        Arc::clone(&self.tracker) as Arc<dyn Progress>
    }
}

/// One input topic's queue of a partition.
pub(crate) struct Feed<C: ConsumerContext + 'static> {
    pub topic: Arc<str>,
    pub topic_index: usize,
    pub queue: PartitionQueue<C>,
    pub consumed: IntCounter,
}

/// A partition number handed to a worker: its queues (one per input
/// topic) and its state.
pub(crate) struct Unit<C: ConsumerContext + 'static> {
    pub partition: i32,
    pub feeds: Vec<Feed<C>>,
    pub state: SharedPartition,
    /// A wall-clock sweep in progress: (next slot, sweep time).
    sweep: Option<(Slot, Millis)>,
    next_sweep: Instant,
    next_scan: Instant,
}

impl<C: ConsumerContext + 'static> Unit<C> {
    pub fn new(
        partition: i32,
        feeds: Vec<Feed<C>>,
        state: SharedPartition,
        sweep_every: Duration,
    ) -> Unit<C> {
        Unit {
            partition,
            feeds,
            state,
            sweep: None,
            next_sweep: Instant::now() + sweep_every,
            next_scan: Instant::now(),
        }
    }
}

/// What the consumer's thread asks of a worker.
pub(crate) enum Command<C: ConsumerContext + 'static> {
    Assign(Unit<C>),
    /// Give the partitions back (their state stays in the registry);
    /// answer when no batch of them runs any more.
    Revoke(Vec<i32>, Revocation, mpsc::SyncSender<()>),
    /// A message that came through the consumer's own queue (fetched before
    /// its partition's queue was split off).
    Message(OwnedMessage),
}

/// Wakes an idle worker when one of its queues receives messages.
#[derive(Default)]
pub(crate) struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.pending.lock() = true;
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let mut pending = self.pending.lock();
        if !*pending {
            self.cv.wait_for(&mut pending, timeout);
        }
        *pending = false;
    }
}

struct Handle<C: ConsumerContext + 'static> {
    commands: mpsc::Sender<Command<C>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

/// The workers, and which one owns which partition.
pub(crate) struct Pool<C: ConsumerContext + 'static> {
    workers: Vec<Handle<C>>,
    owners: Mutex<HashMap<i32, usize>>,
    pub ctx: Arc<Context>,
}

impl<C: ConsumerContext + 'static> Pool<C> {
    /// Starts `n` workers (at least one); in exactly_once mode each with
    /// its transactional producer, initialised before this returns.
    pub fn start(n: usize, ctx: Arc<Context>) -> Result<Pool<C>, PipelineError> {
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let txn = if ctx.kafka.exactly_once() {
                let (tracker, codec, metrics) = (
                    Arc::clone(&ctx.tracker),
                    Arc::clone(&ctx.codec),
                    ctx.shared.metrics.clone(),
                );
                let context = Box::new(move || {
                    Delivery::transactional(
                        Arc::clone(&tracker),
                        Arc::clone(&codec),
                        metrics.clone(),
                    )
                });
                let deadline = Instant::now() + Duration::from_secs(60);
                Some(Arc::new(Mutex::new(Transactions::start(
                    Arc::clone(&ctx.kafka),
                    i,
                    context,
                    ctx.shared.metrics.clone(),
                    deadline,
                )?)))
            } else {
                None
            };
            let (commands, rx) = mpsc::channel();
            let wake = Arc::new(Wake::default());
            let txn = match txn {
                Some(txn) => {
                    let woken = Arc::clone(&wake);
                    let committer =
                        Committer::start(i, Arc::clone(&txn), Box::new(move || woken.notify()))
                            .map_err(|e| {
                                PipelineError::Producer(format!(
                                    "cannot start the committer thread of worker {i}: {e}"
                                ))
                            })?;
                    Some((txn, committer))
                }
                None => None,
            };
            let worker = Worker::new(i, Arc::clone(&ctx), rx, Arc::clone(&wake), txn);
            let thread = std::thread::Builder::new()
                .name(format!("ces-worker-{i}"))
                .spawn(move || worker.run())
                .expect("a worker thread starts");
            workers.push(Handle {
                commands,
                wake,
                thread: Some(thread),
            });
        }
        Ok(Pool {
            workers,
            owners: Mutex::new(HashMap::new()),
            ctx,
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Hands a partition to the worker with the fewest.
    pub fn assign(&self, mut unit: Unit<C>) {
        let mut owners = self.owners.lock();
        let mut load = vec![0usize; self.workers.len()];
        for &w in owners.values() {
            load[w] += 1;
        }
        let w = (0..load.len()).min_by_key(|&i| (load[i], i)).unwrap_or(0);
        let wake = Arc::clone(&self.workers[w].wake);
        for feed in &mut unit.feeds {
            let wake = Arc::clone(&wake);
            feed.queue.set_nonempty_callback(move || wake.notify());
        }
        owners.insert(unit.partition, w);
        let _ = self.workers[w].commands.send(Command::Assign(unit));
        self.workers[w].wake.notify();
    }

    /// Takes partitions back from their workers; waits (up to `timeout`)
    /// until no batch of them runs (and, in exactly_once mode, until each
    /// worker has committed or aborted its transaction). False when a
    /// worker did not answer in time: it may still hold them.
    pub fn revoke(&self, partitions: &[i32], how: Revocation, timeout: Duration) -> bool {
        let mut per_worker: HashMap<usize, Vec<i32>> = HashMap::new();
        {
            let mut owners = self.owners.lock();
            for p in partitions {
                if let Some(w) = owners.remove(p) {
                    per_worker.entry(w).or_default().push(*p);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut waits = Vec::new();
        for (w, ps) in per_worker {
            let (done, wait) = mpsc::sync_channel(1);
            if self.workers[w]
                .commands
                .send(Command::Revoke(ps, how, done))
                .is_ok()
            {
                self.workers[w].wake.notify();
                waits.push(wait);
            }
        }
        let mut answered = true;
        for wait in waits {
            answered &= wait
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok();
        }
        answered
    }

    /// Stops the pipeline with `error` (seen by the consumer's thread).
    pub fn fail(&self, error: PipelineError) {
        let mut failed = self.ctx.failed.lock();
        if failed.is_none() {
            *failed = Some(error);
        }
    }

    /// A message of `partition` that came through the consumer's queue.
    pub fn forward(&self, message: OwnedMessage) {
        let w = self.owners.lock().get(&message.partition()).copied();
        if let Some(w) = w {
            let _ = self.workers[w].commands.send(Command::Message(message));
            self.workers[w].wake.notify();
        }
    }

    /// Stops every worker and waits for them.
    pub fn stop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        for h in &self.workers {
            h.wake.notify();
        }
        for h in &mut self.workers {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
        self.owners.lock().clear();
    }
}

impl<C: ConsumerContext + 'static> Drop for Pool<C> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a produced message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Output,
    DeadLetter,
}

/// One message waiting to be sent; its bytes live in [`Outbox::bytes`].
struct Out {
    dest: Dest,
    key: Range<usize>,
    /// `None`: a tombstone.
    payload: Option<Range<usize>>,
    /// The `ces-kind` of an output, or a dead letter's own headers.
    headers: Result<usize, OwnedHeaders>,
    opaque: usize,
}

/// What a batch counted, added to the metrics once per batch: the
/// counters are shared by every worker, and an atomic add per message on a
/// cache line the other workers also write was a fifth of a worker's own
/// time outside parsing and scoring (perf annotate).
#[derive(Default)]
struct Counts {
    accepted: u64,
    erasures: u64,
    outputs: [u64; SignalKind::NAMES.len()],
    ignored: [u64; event::IgnoreReason::ALL.len()],
    rejected: [u64; event::InvalidReason::ALL.len()],
}

impl Counts {
    /// Adds the counts to the metrics and starts again from zero.
    fn publish(&mut self, metrics: &crate::metrics::Metrics) {
        let c = std::mem::take(self);
        if c.accepted > 0 {
            metrics.events_accepted.inc_by(c.accepted);
        }
        if c.erasures > 0 {
            metrics.erasures.inc_by(c.erasures);
        }
        for (m, n) in metrics.outputs_by_kind.iter().zip(c.outputs) {
            if n > 0 {
                m.inc_by(n);
            }
        }
        for (m, n) in metrics.ignored_by_reason.iter().zip(c.ignored) {
            if n > 0 {
                m.inc_by(n);
            }
        }
        for (m, n) in metrics.rejected_by_reason.iter().zip(c.rejected) {
            if n > 0 {
                m.inc_by(n);
            }
        }
    }
}

/// The outputs of a batch, encoded into buffers reused batch after batch.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    out: Vec<Out>,
    counts: Counts,
    /// Per feed of the unit: its messages with outputs, and the last
    /// offset taken.
    produced: Vec<(Vec<Produced>, Option<i64>)>,
}

impl Outbox {
    /// Moves `other`'s messages to the end of this outbox (their bytes
    /// with them); `other`'s counts and offsets stay.
    fn append(&mut self, other: &mut Outbox) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        let shift = |r: Range<usize>| r.start + base..r.end + base;
        self.out.extend(other.out.drain(..).map(|out| Out {
            key: shift(out.key),
            payload: out.payload.map(shift),
            ..out
        }));
        other.bytes.clear();
    }

    fn clear(&mut self, feeds: usize) {
        self.bytes.clear();
        self.out.clear();
        self.produced.resize_with(feeds, Default::default);
        for p in &mut self.produced {
            p.0.clear();
            p.1 = None;
        }
    }

    fn push_bytes(&mut self, b: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        start..self.bytes.len()
    }
}

/// A worker thread's state.
struct Worker<C: ConsumerContext + 'static> {
    /// Its number in the pool (part of its transactional id).
    index: usize,
    ctx: Arc<Context>,
    commands: mpsc::Receiver<Command<C>>,
    wake: Arc<Wake>,
    units: Vec<Unit<C>>,
    encoder: Encoder,
    outbox: Outbox,
    /// A `ces-kind` header per output kind, built once.
    kind_headers: Vec<OwnedHeaders>,
    sweep_every: Duration,
    /// exactly_once: the worker's transactions, and the sink that puts its
    /// partitions' changelog records in them.
    txn: Option<Arc<Mutex<Transactions>>>,
    sink: Option<Arc<dyn RecordSink>>,
    /// exactly_once: runs the commits, while the worker goes on.
    committer: Option<Committer>,
    /// exactly_once: outputs of the batches taken while a commit runs,
    /// sent into the next transaction once it has ended.
    held: Outbox,
    /// Commands taken while a rewind settled the worker's partitions, to
    /// be handled next.
    deferred: VecDeque<Command<C>>,
    /// exactly_once: when the worker last committed.
    last_commit: Instant,
}

impl<C: ConsumerContext + 'static> Worker<C> {
    fn new(
        index: usize,
        ctx: Arc<Context>,
        commands: mpsc::Receiver<Command<C>>,
        wake: Arc<Wake>,
        txn: Option<(Arc<Mutex<Transactions>>, Committer)>,
    ) -> Worker<C> {
        let (txn, committer) = match txn {
            Some((txn, committer)) => (Some(txn), Some(committer)),
            None => (None, None),
        };
        let model = Arc::clone(&ctx.shared.model);
        let kind_headers = SignalKind::NAMES
            .iter()
            .map(|k| {
                OwnedHeaders::new().insert(Header {
                    key: headers::KIND,
                    value: Some(*k),
                })
            })
            .collect();
        let sink = txn.as_ref().map(|txn| {
            Arc::new(TransactionSink {
                txn: Arc::clone(txn),
            }) as Arc<dyn RecordSink>
        });
        Worker {
            index,
            encoder: Encoder::new(&model),
            sweep_every: Duration::from_millis(model.signals.sweep_interval.max(1) as u64),
            ctx,
            commands,
            wake,
            units: Vec::new(),
            outbox: Outbox::default(),
            kind_headers,
            txn,
            sink,
            committer,
            held: Outbox::default(),
            deferred: VecDeque::new(),
            last_commit: Instant::now(),
        }
    }

    fn run(mut self) {
        if let Err(e) = self.work() {
            tracing::error!("worker stopped: {e}");
            *self.ctx.failed.lock() = Some(e);
            self.ctx.stop.store(true, Ordering::SeqCst);
        }
    }

    fn work(&mut self) -> Result<(), PipelineError> {
        while !self.ctx.stop.load(Ordering::SeqCst) {
            match self.turn() {
                Ok(()) => {}
                Err(Halt::Rewind(why)) => self.rewind(&why),
                Err(Halt::Stop(e)) => return Err(e),
            }
        }
        // Stopping: the partitions' last state and the open transaction
        // (exactly_once; at_least_once hands them to the consumer's
        // thread).
        if let Err(Halt::Stop(e)) = self.hand_back(&self.partitions(), Revocation::Clean) {
            return Err(e);
        }
        Ok(())
    }

    /// One turn of the loop: commands, a batch of each partition, what
    /// runs between batches, a commit when due; then a wait when idle.
    fn turn(&mut self) -> Result<(), Halt> {
        self.commands()?;
        let mut busy = false;
        for i in 0..self.units.len() {
            busy |= self.batch(i)?;
            self.between_batches(i)?;
        }
        self.commit_when_due()?;
        if !busy {
            self.wake.wait(self.idle_wait());
        }
        Ok(())
    }

    /// How long an idle worker waits for messages: no longer than until
    /// its open transaction is due to commit.
    fn idle_wait(&self) -> Duration {
        // The committer wakes the worker when its commit ends (and holds
        // the transactions' lock until then).
        if self.commit_in_flight() {
            return IDLE;
        }
        let opened = self.txn.as_ref().and_then(|t| t.lock().opened_at());
        match opened {
            Some(at) => (at + self.ctx.kafka.commit_interval)
                .saturating_duration_since(Instant::now())
                .min(IDLE),
            None => IDLE,
        }
    }

    /// exactly_once: whether a commit runs (outputs are held meanwhile).
    fn commit_in_flight(&self) -> bool {
        self.committer.as_ref().is_some_and(Committer::in_flight)
    }

    fn partitions(&self) -> Vec<i32> {
        self.units.iter().map(|u| u.partition).collect()
    }

    fn commands(&mut self) -> Result<(), Halt> {
        while let Some(cmd) = self
            .deferred
            .pop_front()
            .or_else(|| self.commands.try_recv().ok())
        {
            match cmd {
                Command::Assign(unit) => {
                    if let (Some(hooks), Some(sink)) = (&self.ctx.hooks, &self.sink) {
                        hooks.attach(unit.partition, Arc::clone(sink));
                    }
                    self.units.push(unit);
                }
                Command::Revoke(ps, how, done) => {
                    let result = self.hand_back(&ps, how);
                    self.units.retain(|u| !ps.contains(&u.partition));
                    let _ = done.send(());
                    // A failed transaction is rewound for even when no
                    // partition is left to rewind: the rewind takes the
                    // failure and seals what the transaction touched. Left
                    // pending, the failure was taken later for one of the
                    // next partitions' transaction, which the rewind did
                    // not abort: their first batch went out twice in it.
                    result?;
                }
                Command::Message(m) => {
                    let Some(i) = self.units.iter().position(|u| u.partition == m.partition())
                    else {
                        continue;
                    };
                    let Some(f) = self.units[i]
                        .feeds
                        .iter()
                        .position(|f| *f.topic == *m.topic())
                    else {
                        continue;
                    };
                    self.outbox.clear(self.units[i].feeds.len());
                    let state = Arc::clone(&self.units[i].state);
                    let mut st = state.lock();
                    let feed = &self.units[i].feeds[f];
                    feed.consumed.inc();
                    let wall = now_millis();
                    let parsed = parse_message(&self.ctx.shared.model, &m, wall.max(st.clock));
                    process(
                        &self.ctx,
                        &self.encoder,
                        &mut self.outbox,
                        feed,
                        f,
                        &mut st,
                        &m,
                        parsed,
                        wall,
                    )?;
                    drop(st);
                    self.outbox.counts.publish(&self.ctx.shared.metrics);
                    self.flush(i)?;
                }
            }
        }
        Ok(())
    }

    /// Takes a batch from each queue of unit `i`; true when there was one.
    ///
    /// In stages, as `replay` does, so that waiting for memory overlaps
    /// instead of adding up: take the batch's messages, parse them all,
    /// then score them in order while the state of the customer a few
    /// events ahead is prefetched. With 100k customers a partition's table
    /// does not fit in the cache, and the lookup of an event's customer was
    /// a sixth of a worker's time before the prefetch.
    fn batch(&mut self, i: usize) -> Result<bool, Halt> {
        let feeds = self.units[i].feeds.len();
        self.outbox.clear(feeds);
        let started = Instant::now();
        let state = Arc::clone(&self.units[i].state);
        let mut eof = false;
        let unit = &self.units[i];
        let mut messages = Vec::with_capacity(BATCH);
        for (f, feed) in unit.feeds.iter().enumerate() {
            let before = messages.len();
            while messages.len() < BATCH {
                // Polling a queue does not block (zero timeout).
                match feed.queue.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(m)) => messages.push((f, m)),
                    Some(Err(KafkaError::PartitionEOF(_))) => eof = true,
                    Some(Err(e)) => tracing::warn!("consumer error: {e}"),
                }
            }
            if messages.len() > before {
                feed.consumed.inc_by((messages.len() - before) as u64);
            }
        }
        let taken = messages.len();
        if taken > 0 {
            let mut st = state.lock();
            // One reading of the wall clock per batch (a batch takes about
            // a millisecond).
            let wall = now_millis();
            let model = &*self.ctx.shared.model;
            let ahead = wall.max(st.clock);
            let mut parsed: Vec<Option<Parsed<'_>>> = messages
                .iter()
                .map(|(_, m)| Some(parse_message(model, m, ahead)))
                .collect();
            let (ctx, encoder, outbox) = (&self.ctx, &self.encoder, &mut self.outbox);
            for (j, (f, m)) in messages.iter().enumerate() {
                // In two stages, as `replay` does: the index lines two
                // distances ahead, the record a distance ahead.
                if let Some(Some(Parsed::Event(next))) = parsed.get(j + 2 * PREFETCH_DISTANCE) {
                    st.engine.prefetch_index(&next.customer_id);
                }
                if let Some(Some(Parsed::Event(next))) = parsed.get(j + PREFETCH_DISTANCE) {
                    st.engine.prefetch(&next.customer_id);
                }
                let Some(this) = parsed[j].take() else {
                    continue;
                };
                let feed = &unit.feeds[*f];
                process(ctx, encoder, outbox, feed, *f, &mut st, m, this, wall)?;
            }
        }
        drop(messages);
        if taken > 0 {
            self.outbox.counts.publish(&self.ctx.shared.metrics);
            self.flush(i)?;
            self.ctx
                .shared
                .metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if eof {
            self.caught_up(i);
        }
        Ok(taken > 0)
    }

    /// The state is current: said at INFO the first time after an
    /// assignment, at DEBUG after that.
    fn caught_up(&self, i: usize) {
        let unit = &self.units[i];
        let p = unit.partition;
        let mut positions = self.ctx.tracker.lock().positions(p);
        let mut st = unit.state.lock();
        if positions.is_empty() {
            positions = st.started_at.clone(); // nothing new since the assignment
        }
        let customers = st.engine.customers().len();
        if st.reached_end {
            tracing::debug!(
                partition = p,
                customers,
                ?positions,
                "partition caught up with the end of its log"
            );
        } else {
            st.reached_end = true;
            tracing::info!(
                partition = p,
                customers,
                ?positions,
                "partition caught up with the end of its log"
            );
        }
    }

    /// Records the batch's offsets (one tracker update), then sends its
    /// outputs, waiting while the producer's queue is full.
    fn flush(&mut self, i: usize) -> Result<(), Halt> {
        let unit = &self.units[i];
        {
            let mut tracker = self.ctx.tracker.lock();
            for (f, (produced, last)) in self.outbox.produced.iter().enumerate() {
                if let Some(last) = last {
                    tracker.batch(&unit.feeds[f].topic, unit.partition, produced, *last);
                }
            }
        }
        self.send_outbox()
    }

    /// Sends the outbox's messages; exactly_once, while a commit runs,
    /// holds them for the next transaction instead.
    fn send_outbox(&mut self) -> Result<(), Halt> {
        if self.outbox.out.is_empty() {
            return Ok(());
        }
        if self.commit_in_flight() {
            self.held.append(&mut self.outbox);
            if self.held.bytes.len() >= HELD_MAX_BYTES {
                return self.finish_commit(true);
            }
            return Ok(());
        }
        let outbox = std::mem::take(&mut self.outbox);
        let result = self.send_all(&outbox);
        self.outbox = outbox;
        result
    }

    /// Sends `outbox`'s messages; exactly_once, into the worker's
    /// transaction, begun if need be.
    fn send_all(&self, outbox: &Outbox) -> Result<(), Halt> {
        let producer = match &self.txn {
            Some(txn) => {
                let mut txn = txn.lock();
                txn.ensure_open().map_err(Halt::Rewind)?;
                Arc::clone(txn.producer())
            }
            None => Arc::clone(&self.ctx.producer),
        };
        outbox
            .out
            .iter()
            .try_for_each(|out| self.send(&producer, &outbox.bytes, out))
    }

    fn send(
        &self,
        producer: &ThreadedProducer<Delivery>,
        bytes: &[u8],
        out: &Out,
    ) -> Result<(), Halt> {
        let kafka = &self.ctx.kafka;
        let topic = match out.dest {
            Dest::Output => &kafka.output_topic,
            Dest::DeadLetter => &kafka.dead_letter_topic,
        };
        let headers = match &out.headers {
            Ok(kind) => self.kind_headers[*kind].clone(),
            Err(h) => h.clone(),
        };
        let mut record = BaseRecord::with_opaque_to(topic, out.opaque)
            .key(&bytes[out.key.clone()])
            .headers(headers);
        if let Some(p) = &out.payload {
            record = record.payload(&bytes[p.clone()]);
        }
        let mut waited = false;
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: wait for acknowledgements to make room.
                    if !waited {
                        tracing::debug!("producer queue full: waiting");
                        waited = true;
                    }
                    // A stop does not end the wait: the broker still takes
                    // what is queued, and shutdown_timeout bounds the rest.
                    if let Some(why) = producer.context().fatal() {
                        return Err(PipelineError::Producer(why).into());
                    }
                    if let (Some(txn), Some(_)) = (&self.txn, producer.context().unusable()) {
                        return Err(Halt::Rewind(txn.lock().abort(AbortCause::Fatal)));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    back,
                )) if out.dest == Dest::DeadLetter
                    && out.payload.as_ref().is_some_and(|p| p.len() > 1024) =>
                {
                    // A dead letter too large for the producer: keep its
                    // head and say so, rather than stopping the stream.
                    let len = out.payload.as_ref().map_or(0, |p| p.len());
                    let keep = (len / 2).min(64 * 1024);
                    let mut headers = match &out.headers {
                        Ok(kind) => self.kind_headers[*kind].clone(),
                        Err(h) => h.clone(),
                    };
                    headers = headers.insert(Header {
                        key: headers::TRUNCATED,
                        value: Some(&len.to_string()),
                    });
                    let smaller = Out {
                        dest: Dest::DeadLetter,
                        key: out.key.clone(),
                        payload: out.payload.as_ref().map(|p| p.start..p.start + keep),
                        headers: Err(headers),
                        opaque: back.delivery_opaque,
                    };
                    return self.send(producer, bytes, &smaller);
                }
                Err((e, _))
                    if self.txn.is_some()
                        && !e.rdkafka_error_code().is_some_and(is_about_the_message) =>
                {
                    let txn = self.txn.as_ref().expect("checked");
                    return Err(Halt::Rewind(txn.lock().send_failed(e)));
                }
                Err((e, _)) => {
                    let permanent = e.rdkafka_error_code().is_some_and(is_permanent);
                    return Err(PipelineError::Producer(format!(
                        "cannot produce to {topic}{}: {e}",
                        if permanent { "" } else { " (unexpected)" }
                    ))
                    .into());
                }
            }
        }
    }

    /// Work on unit `i` that must not hold up its batches: a part of a
    /// wall-clock sweep, a step of a snapshot, a gauge scan.
    fn between_batches(&mut self, i: usize) -> Result<(), Halt> {
        let now = Instant::now();
        self.finish_commit(false)?;
        if self.ctx.clock == Clock::Wall {
            self.sweep_step(i, now)?;
        }
        // A snapshot step waits while a commit runs: its records belong
        // in the next transaction, which does not exist yet.
        if !self.commit_in_flight() {
            let unit = &self.units[i];
            if let Some(hooks) = &self.ctx.hooks {
                hooks.tick(unit.partition, &mut unit.state.lock(), &self.ctx.progress());
            }
            // A snapshot step may have sent into the transaction, and failed.
            self.unhandled_failure()?;
        }
        let unit = &self.units[i];
        if now >= unit.next_scan {
            let mut st = unit.state.lock();
            scan_gauges(&mut st, &self.ctx.shared);
            drop(st);
            self.units[i].next_scan = now + SCAN_EVERY;
        }
        Ok(())
    }

    /// exactly_once: a failure of the transaction that happened out of the
    /// worker's sight (in the state store's sends) is rewound for now.
    fn unhandled_failure(&self) -> Result<(), Halt> {
        match self.txn.as_ref().and_then(|t| t.lock().take_unhandled()) {
            Some(why) => Err(Halt::Rewind(why)),
            None => Ok(()),
        }
    }

    /// exactly_once: commits the open transaction once it has been open for
    /// `commit_interval`.
    ///
    /// Events that produce no output open no transaction; their offsets
    /// still need one to be committed in: once the interval has passed
    /// since the last commit, a transaction is opened for them alone.
    ///
    /// The commit runs on the committer's thread; the worker goes on (see
    /// `committer`).
    fn commit_when_due(&mut self) -> Result<(), Halt> {
        if self.txn.is_none() {
            return Ok(());
        }
        self.finish_commit(false)?;
        let Some(txn) = self.txn.as_ref().filter(|_| !self.commit_in_flight()) else {
            return Ok(());
        };
        let interval = self.ctx.kafka.commit_interval;
        let opened = txn.lock().opened_at();
        let due = match opened {
            Some(at) => at.elapsed() >= interval,
            None => self.last_commit.elapsed() >= interval && !self.moved_offsets().is_empty(),
        };
        if due {
            self.begin_commit()?;
        }
        Ok(())
    }

    /// exactly_once: once the commit in flight has ended (`wait`: waits
    /// for it to end), marks its offsets committed and sends the outputs
    /// held meanwhile, which open the next transaction; a commit that
    /// failed rewinds (what was held goes: its events are processed
    /// again).
    fn finish_commit(&mut self, wait: bool) -> Result<(), Halt> {
        let Some(committer) = &mut self.committer else {
            return Ok(());
        };
        let ended = if wait {
            committer.wait()
        } else {
            committer.poll()
        };
        match ended {
            None => Ok(()),
            Some(Ended::Committed(offsets)) => {
                self.mark_committed(offsets);
                if self.held.out.is_empty() {
                    return Ok(());
                }
                let held = std::mem::take(&mut self.held);
                let result = self.send_all(&held);
                self.held = held;
                self.held.clear(0);
                result
            }
            Some(Ended::Failed(failure)) => {
                self.held.clear(0);
                Err(Halt::Rewind(failure))
            }
            Some(Ended::ThreadGone) => Err(Halt::Stop(PipelineError::Panicked)),
        }
    }

    /// exactly_once, before the partitions go back to their last committed
    /// state: waits for the commit in flight (it may commit) and drops the
    /// outputs held meanwhile, whose events are processed again.
    fn abandon_held(&mut self) {
        if let Some(Ended::Committed(offsets)) = self.committer.as_mut().and_then(Committer::wait) {
            self.mark_committed(offsets);
        }
        self.held.clear(0);
    }

    /// The broker confirmed a commit of `offsets`.
    fn mark_committed(&mut self, offsets: Offsets) {
        self.last_commit = Instant::now();
        let mut tracker = self.ctx.tracker.lock();
        for (topic, p, next) in offsets {
            tracker.mark_committed(&topic, p, next);
        }
    }

    /// The next offset of every input partition of the worker that moved
    /// past its committed one: what a commit now would carry. Never back
    /// below the committed offset (a partition still rebuilding its state
    /// is behind it).
    fn moved_offsets(&self) -> Offsets {
        let tracker = self.ctx.tracker.lock();
        let mut moved = Vec::new();
        for unit in &self.units {
            for feed in &unit.feeds {
                let (topic, p) = (&*feed.topic, unit.partition);
                if let Some(next) = tracker.next(topic, p) {
                    if tracker.committed(topic, p).is_none_or(|c| next > c) {
                        moved.push((Arc::clone(&feed.topic), p, next));
                    }
                }
            }
        }
        moved
    }

    /// exactly_once: commits the open transaction (or one opened for
    /// them) with the next offset of every partition of the worker that
    /// moved past its committed one, and waits for the commit to end.
    fn commit(&mut self) -> Result<(), Halt> {
        self.finish_commit(true)?;
        self.begin_commit()?;
        self.finish_commit(true)
    }

    /// exactly_once: hands the open transaction (or one opened for them)
    /// to the committer with the next offset of every partition of the
    /// worker that moved past its committed one; they count as committed
    /// once the broker says so. No commit may be in flight.
    fn begin_commit(&mut self) -> Result<(), Halt> {
        let moved = self.moved_offsets();
        let (Some(txn), Some(committer)) = (&self.txn, &mut self.committer) else {
            return Ok(());
        };
        let group = self.ctx.group.get().and_then(|g| g.group_metadata());
        let mut txn = txn.lock();
        if txn.opened_at().is_none() {
            if moved.is_empty() {
                return Ok(());
            }
            // Offsets of events without outputs: a transaction for them.
            txn.ensure_open().map_err(Halt::Rewind)?;
        }
        let Some(group) = group else {
            return Err(Halt::Rewind(txn.abort(AbortCause::Error)));
        };
        drop(txn);
        if !committer.begin(group, moved) {
            return Err(Halt::Stop(PipelineError::Panicked));
        }
        Ok(())
    }

    /// Gives partitions `ps` back. exactly_once: a clean revocation writes
    /// their release snapshots (into the transaction with the changelog
    /// store) and commits the transaction, which holds every partition of
    /// the worker; a lost one aborts it. at_least_once: nothing here (the
    /// consumer's thread flushes, commits and snapshots).
    fn hand_back(&mut self, ps: &[i32], how: Revocation) -> Result<(), Halt> {
        let Some(txn) = self.txn.clone() else {
            return Ok(());
        };
        if how == Revocation::Lost {
            self.abandon_held();
            return Err(Halt::Rewind(txn.lock().abort(AbortCause::Lost)));
        }
        // The release snapshots go into a transaction after the one that
        // commits now, if any.
        self.finish_commit(true)?;
        if let Some(hooks) = &self.ctx.hooks {
            let deadline = Instant::now() + self.ctx.kafka.shutdown_timeout;
            for unit in self.units.iter().filter(|u| ps.contains(&u.partition)) {
                let p = unit.partition;
                let next: Vec<(String, Option<i64>)> = {
                    let tracker = self.ctx.tracker.lock();
                    unit.feeds
                        .iter()
                        .map(|f| (f.topic.to_string(), tracker.next(&f.topic, p)))
                        .collect()
                };
                let mut st = unit.state.lock();
                // Only a state past the group's committed offset is news;
                // one still rebuilding below it has nothing to save.
                if st.caught_up() {
                    hooks.release(p, &mut st, &next, deadline);
                }
            }
            self.unhandled_failure()?;
        }
        self.commit()
    }

    /// exactly_once: after a failed transaction, every partition of the
    /// worker goes back to its last committed state: restored from the
    /// state store as of the group's committed offsets (or rebuilt from the
    /// log), the consumer moved back to where that state ends; events up to
    /// the committed offset only rebuild, the later ones are processed (and
    /// their outputs sent) again.
    fn rewind(&mut self, why: &Failure) {
        self.abandon_held();
        if let Some(txn) = &self.txn {
            let mut txn = txn.lock();
            // The failure aborted the transaction already. Should one be
            // open all the same, it goes too: the events whose outputs it
            // holds are processed again, and their outputs sent again.
            if txn.opened_at().is_some() {
                tracing::warn!(
                    worker = self.index,
                    "a transaction was open at a rewind: aborting it"
                );
                txn.abort(AbortCause::Error);
            }
            txn.take_unhandled();
        }
        self.outbox.clear(0);
        let failed = self.partitions();
        // Partitions revoked meanwhile go first: rewinding one that the
        // group has given to another member, or to this one anew, would
        // move a position that is no longer this unit's.
        self.settle(&failed);
        if failed.is_empty() {
            tracing::info!(
                worker = self.index,
                "transaction failed with no partition left to rewind: {why:?}"
            );
        } else {
            tracing::warn!(worker = self.index, partitions = ?failed, "rewinding to the last committed state: {why:?}");
        }
        let ctx = Arc::clone(&self.ctx);
        let group = ctx.group.get().cloned();
        self.seal_unfinished(group.as_deref());
        for unit in self
            .units
            .iter_mut()
            .filter(|u| failed.contains(&u.partition))
        {
            let p = unit.partition;
            let topics: Vec<String> = unit.feeds.iter().map(|f| f.topic.to_string()).collect();
            // The broker's word on what is committed, not the tracker's: a
            // commit whose answer was lost may have gone through.
            let from_broker = group
                .as_ref()
                .map(|g| committed_by_broker(&**g, &topics, p, &ctx.stop));
            let committed: Vec<Option<i64>> = {
                let mut tracker = ctx.tracker.lock();
                let committed = match from_broker {
                    Some(Some(c)) => c,
                    _ => topics.iter().map(|t| tracker.committed(t, p)).collect(),
                };
                for t in &topics {
                    tracker.forget(t, p);
                }
                committed
            };
            if let Some(hooks) = &ctx.hooks {
                hooks.forget(p);
            }
            let (mut state, offsets) = restore::restore(
                ctx.hooks.as_ref(),
                || ctx.shared.new_state(),
                p,
                &topics,
                &committed,
                &ctx.stop,
            );
            let starts = restore::start(
                &mut state,
                p,
                &topics,
                offsets,
                &committed,
                ctx.reset_to_end,
                &ctx.tracker,
            );
            if let Some(group) = &group {
                for (topic, start) in topics.iter().zip(starts) {
                    if let Err(e) = group.seek(topic, p, start) {
                        tracing::warn!(topic = %topic, partition = p, "cannot rewind the consumer: {e}");
                    }
                }
            }
            *unit.state.lock() = state;
            unit.sweep = None;
            ctx.shared.metrics.partition_rewinds.inc();
            if let (Some(hooks), Some(sink)) = (&ctx.hooks, &self.sink) {
                hooks.attach(p, Arc::clone(sink));
            }
        }
    }

    /// exactly_once: before anything new is written, closes the partitions
    /// the failed transaction touched if it was really aborted (the
    /// group's committed offsets say), since a broker that restarted may
    /// have left its records there open (see `transaction_seal`). A seal
    /// that fails is a failure as any other: the next rewind seals again.
    fn seal_unfinished(&mut self, group: Option<&dyn GroupHandle>) {
        let Some(txn) = &self.txn else {
            return;
        };
        let Some(unfinished) = txn.lock().take_unfinished() else {
            return;
        };
        let aborted = unfinished.was_aborted(|topic, partition| {
            let group = group.ok_or(())?;
            let topics = [topic.to_string()];
            match committed_by_broker(group, &topics, partition, &self.ctx.stop) {
                Some(committed) => Ok(committed.first().copied().flatten()),
                None => Err(()),
            }
        });
        if aborted == Some(true) {
            // A failure is kept as unhandled: the next turn rewinds again.
            let _ = txn.lock().seal(&unfinished.partitions);
        }
    }

    /// Before a rewind: revocations that came meanwhile are done (the
    /// transaction that held their work is gone already) and answered,
    /// assignments taken; messages forwarded for a partition that is
    /// rewound are dropped (the rewind fetches them again), others wait.
    fn settle(&mut self, failed: &[i32]) {
        let forwarded_for_failed = |cmd: &Command<C>| matches!(cmd, Command::Message(m) if failed.contains(&m.partition()));
        self.deferred.retain(|cmd| !forwarded_for_failed(cmd));
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Assign(unit) => {
                    if let (Some(hooks), Some(sink)) = (&self.ctx.hooks, &self.sink) {
                        hooks.attach(unit.partition, Arc::clone(sink));
                    }
                    self.units.push(unit);
                }
                Command::Revoke(ps, _, done) => {
                    self.units.retain(|u| !ps.contains(&u.partition));
                    let _ = done.send(());
                }
                cmd if forwarded_for_failed(&cmd) => {}
                cmd => self.deferred.push_back(cmd),
            }
        }
    }

    /// Every `sweep_interval` of wall time, evaluates every customer of a
    /// caught-up partition, a part between each batch.
    fn sweep_step(&mut self, i: usize, now: Instant) -> Result<(), Halt> {
        let unit = &mut self.units[i];
        if unit.sweep.is_none() {
            if now < unit.next_sweep {
                return Ok(());
            }
            unit.next_sweep = now + self.sweep_every;
            let mut st = unit.state.lock();
            if !st.caught_up() {
                return Ok(());
            }
            let t = st.clock_at(now_millis());
            unit.sweep = Some((0, t));
        }
        let Some((from, t)) = unit.sweep else {
            return Ok(());
        };
        let p = unit.partition;
        let state = Arc::clone(&unit.state);
        self.outbox.clear(0);
        let metrics = &self.ctx.shared.metrics;
        let next = {
            let mut st = state.lock();
            let forgotten = st.engine.forgotten_count();
            let (encoder, outbox) = (&self.encoder, &mut self.outbox);
            let next = st
                .engine
                .sweep_part(from, SWEEP_PART, t, &mut |s: &Signal<'_>| {
                    metrics.outputs_by_kind[s.kind.index()].inc();
                    push_signal(outbox, encoder, s, 0);
                });
            metrics
                .customers_forgotten
                .inc_by(st.engine.forgotten_count() - forgotten);
            next
        };
        self.units[i].sweep = next.map(|n| (n, t));
        if self.outbox.out.is_empty() {
            return Ok(());
        }
        // Sweep outputs count toward the partition's last processed offset:
        // neither a commit nor a snapshot covers the state they come from
        // before they are acknowledged.
        let (topic, offset) = self
            .ctx
            .tracker
            .lock()
            .sweep_source(p)
            .unwrap_or_else(|| (Arc::from(""), -1));
        let topic_index = self.ctx.codec.topic_index(&topic);
        let opaque = self.ctx.codec.encode(topic_index, p, offset);
        for out in &mut self.outbox.out {
            out.opaque = opaque;
        }
        self.ctx
            .tracker
            .lock()
            .add_outputs(&topic, p, offset, self.outbox.out.len() as u32);
        self.send_outbox()
    }
}

/// The group's committed offsets of `topics`' `partition` from the broker,
/// tried for up to a minute (it may be coming back); `None` when it never
/// answered.
fn committed_by_broker(
    group: &dyn GroupHandle,
    topics: &[String],
    partition: i32,
    stop: &AtomicBool,
) -> Option<Vec<Option<i64>>> {
    // Asked for until known: the last ones this worker committed may be
    // behind the broker's (a commit whose answer was lost), and restoring
    // below them publishes twice. A pipeline that stops gives up.
    let started = Instant::now();
    let mut said = None::<Instant>;
    loop {
        match group.committed(topics, partition) {
            Ok(c) => return Some(c),
            Err(_) if stop.load(Ordering::SeqCst) => return None,
            Err(e) => {
                if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    said = Some(Instant::now());
                    tracing::warn!(
                        partition,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "cannot read the committed offsets yet ({e}): the partition waits for them{}",
                        crate::kafka::transaction_seal::hanging_hint(started.elapsed())
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Puts a partition's changelog records in its worker's transaction
/// (exactly_once), beginning one if none is open.
struct TransactionSink {
    txn: Arc<Mutex<Transactions>>,
}

impl RecordSink for TransactionSink {
    fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(), String> {
        let producer = {
            let mut txn = self.txn.lock();
            txn.ensure_open().map_err(|f| format!("{f:?}"))?;
            Arc::clone(txn.producer())
        };
        let mut kafka_headers = OwnedHeaders::new();
        for (k, v) in headers {
            kafka_headers = kafka_headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, SourceCodec::NO_SOURCE)
                .partition(partition)
                .key(key)
                .headers(kafka_headers);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((e, _)) => {
                    let failure = self.txn.lock().send_failed(e);
                    return Err(format!("{failure:?}"));
                }
            }
        }
    }
}

/// Parses an input message: an event, an erasure request (a tombstone), or
/// why it is invalid. `now` is the partition's clock for the
/// `timestamp_in_future` check; see [`process`].
fn parse_message<'m, M: Message>(model: &Model, msg: &'m M, now: Millis) -> Parsed<'m> {
    match msg.payload() {
        // A tombstone: an erasure request for the customer of its key.
        None => event::parse_tombstone(msg.key()),
        Some([]) => Parsed::Invalid(event::Invalid {
            reason: event::InvalidReason::InvalidJson,
            detail: "empty message".into(),
        }),
        Some(payload) => event::parse(
            payload,
            model,
            ParseContext {
                fallback_timestamp: msg.timestamp().to_millis(),
                now: Some(now),
            },
        ),
    }
}

/// Scores one input message of `feed` (the unit's `f`th), parsed by
/// [`parse_message`] with the clock as it was when its batch started,
/// into the outbox; `wall` is the wall clock.
#[allow(clippy::too_many_arguments)]
fn process<C: ConsumerContext + 'static, M: Message>(
    ctx: &Context,
    encoder: &Encoder,
    outbox: &mut Outbox,
    feed: &Feed<C>,
    f: usize,
    st: &mut PartitionState,
    msg: &M,
    parsed: Parsed<'_>,
    wall: Millis,
) -> Result<(), PipelineError> {
    let (topic, topic_index) = (&*feed.topic, feed.topic_index);
    let partition = msg.partition();
    let offset = msg.offset();
    let timestamp = msg.timestamp().to_millis();
    let opaque = ctx.codec.encode(topic_index, partition, offset);
    let model = &*ctx.shared.model;
    let silent = st.is_rebuilding(topic, offset);
    let now = wall.max(st.clock);
    let before = outbox.out.len();
    // The partition's clock only moves forward within a batch, and with it
    // the bound of `timestamp_in_future`: an event found too far ahead of
    // the clock at the batch's start is checked again against the clock of
    // its turn, exactly as if it had been parsed then.
    let parsed = match parsed {
        Parsed::Invalid(inv) if inv.reason == event::InvalidReason::TimestampInFuture => {
            parse_message(model, msg, now)
        }
        parsed => parsed,
    };
    let mut sink = |s: &Signal<'_>| {
        if !silent {
            outbox.counts.outputs[s.kind.index()] += 1;
            push_signal(outbox, encoder, s, opaque);
        }
    };
    match parsed {
        Parsed::Event(mut ev) => {
            ev.segment_id = ctx.shared.segment_id(ev.segment.as_deref());
            let result = match ctx.clock {
                Clock::Wall => st.engine.process_live(&ev, now, &mut sink),
                // Replay semantics per partition: the watermark is the
                // clock and crossing a sweep boundary sweeps.
                Clock::Event => st.engine.process_replay(&ev, &mut sink),
            };
            match result {
                Ok(Outcome::Applied { .. }) => outbox.counts.accepted += 1,
                Ok(Outcome::Ignored(r)) => outbox.counts.ignored[r as usize] += 1,
                Err(source) => return Err(PipelineError::Engine { partition, source }),
            }
            st.clock = st.engine.live_clock(now);
        }
        Parsed::Erase(id) => {
            let t = match ctx.clock {
                Clock::Wall => Some(st.clock_at(now)),
                Clock::Event => st.engine.watermark(),
            };
            if let Some(t) = t {
                st.engine.erase(&id, t, &mut sink);
            }
            outbox.counts.erasures += 1;
        }
        Parsed::Ignored(r) => outbox.counts.ignored[r as usize] += 1,
        Parsed::Invalid(inv) => {
            outbox.counts.rejected[inv.reason as usize] += 1;
            if !silent {
                let headers = copy_headers(msg)
                    .insert(Header {
                        key: headers::REASON,
                        value: Some(inv.reason.as_str()),
                    })
                    .insert(Header {
                        key: headers::DETAIL,
                        value: Some(&inv.detail),
                    })
                    .insert(Header {
                        key: headers::SOURCE_TOPIC,
                        value: Some(topic),
                    })
                    .insert(Header {
                        key: headers::SOURCE_PARTITION,
                        value: Some(&partition.to_string()),
                    })
                    .insert(Header {
                        key: headers::SOURCE_OFFSET,
                        value: Some(&offset.to_string()),
                    });
                let key = outbox.push_bytes(msg.key().unwrap_or(&[]));
                let payload = outbox.push_bytes(msg.payload().unwrap_or(&[]));
                outbox.out.push(Out {
                    dest: Dest::DeadLetter,
                    key,
                    payload: Some(payload),
                    headers: Err(headers),
                    opaque,
                });
            }
        }
    }
    let outputs = (outbox.out.len() - before) as u32;
    let produced = &mut outbox.produced[f];
    if outputs > 0 {
        produced.0.push((offset, outputs, timestamp));
    }
    produced.1 = Some(offset);
    Ok(())
}

/// Appends an output to the outbox: keyed by customer id, the `ces-kind`
/// header; `customer_erased` is a tombstone, so that a compacted output
/// topic drops the customer's signals too.
fn push_signal(outbox: &mut Outbox, encoder: &Encoder, s: &Signal<'_>, opaque: usize) {
    let key = outbox.push_bytes(s.customer_id.as_bytes());
    let payload = (!matches!(s.kind, SignalKind::CustomerErased)).then(|| {
        let start = outbox.bytes.len();
        encoder.encode(s, &mut outbox.bytes);
        start..outbox.bytes.len()
    });
    outbox.out.push(Out {
        dest: Dest::Output,
        key,
        payload,
        headers: Ok(s.kind.index()),
        opaque,
    });
}

/// Gauges that need a pass over every customer of a partition: published
/// scores by range, and tiers per configured segment. Kept in the state
/// for the consumer's thread to add up.
fn scan_gauges(st: &mut PartitionState, shared: &Shared) {
    let tiers = shared.model.tiers.len();
    let segments = shared.segments.len();
    let mut ranges = [0i64; SCORE_RANGES.len()];
    let mut by_segment = vec![0i64; segments * tiers];
    let table = st.engine.customers();
    for slot in 0..table.len() as Slot {
        let rec = table.record(slot);
        let bucket = ((rec.emitted_score() / 10.0) as usize).min(SCORE_RANGES.len() - 1);
        ranges[bucket] += 1;
        let seg = usize::from(rec.segment());
        if seg > 0 && seg <= segments {
            let tier = usize::from(rec.emitted_tier()).min(tiers - 1);
            by_segment[(seg - 1) * tiers + tier] += 1;
        }
    }
    st.score_ranges = ranges;
    st.segment_tiers = by_segment;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_of(messages: &[(&str, Option<&str>)]) -> Outbox {
        let mut outbox = Outbox::default();
        for (key, payload) in messages {
            let key = outbox.push_bytes(key.as_bytes());
            let payload = payload.map(|p| outbox.push_bytes(p.as_bytes()));
            outbox.out.push(Out {
                dest: Dest::Output,
                key,
                payload,
                headers: Ok(0),
                opaque: 7,
            });
        }
        outbox
    }

    fn read(outbox: &Outbox) -> Vec<(String, Option<String>)> {
        let text =
            |r: &Range<usize>| String::from_utf8_lossy(&outbox.bytes[r.clone()]).into_owned();
        outbox
            .out
            .iter()
            .map(|o| (text(&o.key), o.payload.as_ref().map(text)))
            .collect()
    }

    /// Outputs held while a commit runs are sent later from the held
    /// buffer: each must keep its own key and payload (a tombstone stays
    /// one), batch after batch.
    #[test]
    fn held_outputs_keep_their_bytes_across_batches() {
        let mut held = Outbox::default();
        let mut first = outbox_of(&[("c-1", Some("{\"score\":1}")), ("c-2", None)]);
        let mut second = outbox_of(&[("customer-3", Some("{\"score\":33}"))]);
        held.append(&mut first);
        held.append(&mut second);
        let expected = vec![
            ("c-1".to_string(), Some("{\"score\":1}".to_string())),
            ("c-2".to_string(), None),
            ("customer-3".to_string(), Some("{\"score\":33}".to_string())),
        ];
        assert_eq!(read(&held), expected);
        assert!(first.out.is_empty() && first.bytes.is_empty());
        assert!(second.out.is_empty() && second.bytes.is_empty());
        held.clear(0);
        assert!(held.out.is_empty() && held.bytes.is_empty());
    }
}
