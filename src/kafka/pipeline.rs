//! `ces-stream run`: the Kafka pipeline.
//!
//! One consumer-group member on a dedicated thread: poll, parse, score,
//! produce, and every so often sweep, commit and refresh gauges. The
//! producer is idempotent and acknowledges on its own thread; an input
//! offset is committed only once everything produced for the events before
//! it is acknowledged (see `delivery`). Backpressure: when the producer's
//! queue is full, the consumer waits, so a slow broker slows consumption
//! instead of growing memory. Rebalances run inside `poll` (see
//! `rebalance`). Shutdown is a future handed to [`run`].

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::IntCounter;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::engine::{Outcome, Signal, SignalKind};
use crate::event::{self, ParseContext, Parsed};
use crate::kafka::delivery::{
    copy_headers, headers, is_permanent, Delivery, OffsetTracker, Retry, Source,
};
use crate::kafka::rebalance::GroupContext;
use crate::kafka::settings::KafkaSettings;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::output::Encoder;
use crate::partition::Clock;
use crate::partition::PartitionHooks;
use crate::partition::{PartitionState, Partitions};
use crate::snapshot::periodic::Periodic;
use crate::timestamp::now_millis;

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
    #[error("the pipeline thread stopped unexpectedly")]
    Panicked,
}

/// What the pipeline shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub model: Arc<Model>,
    pub partitions: Partitions,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// `[metrics] segments`, in order: a customer's segment id is its
    /// 1-based position here.
    pub segments: Arc<Vec<String>>,
    /// The changelog store deletes removed customers: partition states
    /// keep track of them.
    pub track_removals: bool,
}

impl Shared {
    pub fn new(model: Arc<Model>) -> Shared {
        Shared::with_segments(model, Vec::new())
    }

    pub fn with_segments(model: Arc<Model>, segments: Vec<String>) -> Shared {
        let metrics = Metrics::new(&model);
        Shared {
            model,
            partitions: Partitions::default(),
            metrics,
            health: Arc::new(Health::default()),
            segments: Arc::new(segments),
            track_removals: false,
        }
    }

    /// A new, empty partition state.
    pub fn new_state(&self) -> PartitionState {
        let mut engine = crate::engine::Engine::new(Arc::clone(&self.model));
        if self.track_removals {
            engine.customers_mut().track_removals();
        }
        PartitionState::from_engine(engine)
    }

    fn segment_id(&self, segment: Option<&str>) -> u8 {
        segment
            .and_then(|s| self.segments.iter().position(|x| x == s))
            .map_or(0, |i| (i + 1) as u8)
    }
}

/// The pipeline's liveness, for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer subscribed and the loop runs.
    pub consuming: AtomicBool,
    /// Wall time (ms) of the loop's latest turn.
    pub last_turn: std::sync::atomic::AtomicI64,
    /// Why the pipeline stopped, if it failed.
    pub failed: parking_lot::Mutex<Option<String>>,
}

/// Runs the pipeline until `shutdown` completes, then stops consuming,
/// flushes, commits and returns. Errors end it early.
pub async fn run(
    settings: &Settings,
    shared: Shared,
    hooks: Option<Arc<dyn PartitionHooks>>,
    periodic: Option<Periodic>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let kafka = match settings.kafka() {
        Ok(k) => k.clone(),
        Err(e) => return Err(PipelineError::Producer(e.to_string())),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    // If this future is dropped (its runtime shuts down), the thread stops too.
    let _guard = StopOnDrop(Arc::clone(&stop));
    let clock = settings.clock;
    let bound = kafka.shutdown_timeout;
    let mut handle = tokio::task::spawn_blocking(move || {
        run_blocking(&kafka, clock, shared, hooks, periodic, thread_stop)
    });
    tokio::select! {
        result = &mut handle => return result.unwrap_or(Err(PipelineError::Panicked)),
        () = shutdown => {
            tracing::info!("shutdown requested: stopping consumption");
            stop.store(true, Ordering::SeqCst);
        }
    }
    // The pipeline thread bounds every step of its shutdown by the same
    // deadline; this is the backstop when a client call blocks past it.
    match tokio::time::timeout(bound, &mut handle).await {
        Ok(result) => result.unwrap_or(Err(PipelineError::Panicked)),
        Err(_) => {
            tracing::error!(
                timeout = ?bound,
                "shutdown did not finish within shutdown_timeout: exiting anyway; events not yet committed are processed again by the next owner"
            );
            Ok(())
        }
    }
}

/// Sets the stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One output or dead letter, waiting to be sent.
struct Outgoing {
    topic: bool, // true: output topic, false: dead-letter topic
    key: Vec<u8>,
    /// `None`: a tombstone (`customer_erased`).
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

/// The pipeline's state on its thread.
struct Worker<'a> {
    kafka: &'a KafkaSettings,
    clock: Clock,
    shared: Shared,
    encoder: Encoder,
    producer: Arc<ThreadedProducer<Delivery>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    topics: HashMap<String, (Arc<str>, IntCounter)>,
    outbox: Vec<Outgoing>,
    stop: &'a AtomicBool,
    periodic: Option<Periodic>,
}

/// Runs the pipeline on the current thread until `stop` is set.
pub fn run_blocking(
    kafka: &KafkaSettings,
    clock: Clock,
    shared: Shared,
    hooks: Option<Arc<dyn PartitionHooks>>,
    periodic: Option<Periodic>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let producer: ThreadedProducer<Delivery> = kafka
        .producer_config()
        .create_with_context(Delivery::new(Arc::clone(&tracker), shared.metrics.clone()))
        .map_err(|source| PipelineError::Client {
            client: "producer",
            source,
        })?;
    let producer = Arc::new(producer);
    // Metadata is read with a consumer that never lets a broker create a
    // topic it is asked about (a producer's metadata request may).
    let metadata: BaseConsumer = kafka
        .consumer_config()
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|source| PipelineError::Client {
            client: "consumer",
            source,
        })?;
    check_topics(kafka, &metadata)?;
    check_co_partitioned(kafka, &metadata)?;
    drop(metadata);

    let consumer_config = kafka.consumer_config();
    let reset_to_end = matches!(
        consumer_config.get("auto.offset.reset"),
        Some("latest" | "largest" | "end")
    );
    let context = GroupContext {
        model: Arc::clone(&shared.model),
        partitions: shared.partitions.clone(),
        producer: Arc::clone(&producer),
        tracker: Arc::clone(&tracker),
        assigned: Mutex::new(BTreeSet::new()),
        metrics: shared.metrics.clone(),
        flush_timeout: kafka.shutdown_timeout,
        hooks,
        reset_to_end,
        stop: Arc::clone(&stop),
        deadline: Mutex::new(None),
    };
    let consumer: BaseConsumer<GroupContext> = consumer_config
        .create_with_context(context)
        .map_err(|source| PipelineError::Client {
            client: "consumer",
            source,
        })?;
    let topics: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| PipelineError::Subscribe {
            topics: kafka.input_topics.clone(),
            source,
        })?;
    tracing::info!(
        brokers = %kafka.brokers,
        group = %kafka.group_id,
        topics = ?kafka.input_topics,
        assignor = kafka.assignment_strategy(),
        "consuming"
    );

    let mut worker = Worker {
        kafka,
        clock,
        encoder: Encoder::new(&shared.model),
        shared,
        producer,
        tracker,
        topics: HashMap::new(),
        outbox: Vec::new(),
        stop: &stop,
        periodic,
    };
    let result = worker.run(&consumer);
    tracing::info!(
        outputs_unacknowledged = worker.tracker.lock().in_flight(),
        "consumption stopped"
    );
    // Every step from here on ends by this deadline (the loop leaves within
    // a poll of the stop signal).
    let deadline = Instant::now()
        + kafka
            .shutdown_timeout
            .saturating_sub(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    *consumer.context().deadline.lock() = Some(deadline);
    worker
        .shared
        .health
        .consuming
        .store(false, Ordering::SeqCst);
    if let Err(e) = &result {
        *worker.shared.health.failed.lock() = Some(e.to_string());
    }
    if let Some(p) = &mut worker.periodic {
        p.abandon_all(&worker.shared.partitions);
    }
    // Whatever happened, hand back what can be handed back: flush, commit,
    // release every partition (its state goes to the store), leave the group.
    let ctx = consumer.context();
    let drained = ctx.drain(deadline);
    let assigned: Vec<(String, i32)> = ctx.assigned.lock().iter().cloned().collect();
    if result.is_ok() {
        if !drained {
            tracing::warn!("shutdown: some outputs were not acknowledged in time; their events will be processed again");
        }
        ctx.release(&consumer, &assigned);
    } else {
        ctx.commit(&consumer, &assigned);
    }
    // Leaving the group can wait on the coordinator (and serve one more
    // rebalance); do it on a thread of its own, for what is left of the
    // deadline.
    let (closed, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = closed.send(());
    });
    match wait.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(()) => tracing::info!("consumer closed"),
        Err(_) => tracing::warn!("the consumer did not leave the group by the shutdown deadline"),
    }
    result
}

/// The partitions of `topic`; `None` when the brokers do not know it.
fn partition_count(
    kafka: &KafkaSettings,
    metadata: &BaseConsumer,
    topic: &str,
) -> Result<Option<usize>, PipelineError> {
    let metadata = metadata
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|source| PipelineError::Unreachable {
            brokers: kafka.brokers.clone(),
            source,
        })?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// Refuses input topics with different partition counts: a customer's
/// state lives in one partition number across all of them.
fn check_co_partitioned(
    kafka: &KafkaSettings,
    producer: &BaseConsumer,
) -> Result<(), PipelineError> {
    let literal: Vec<&String> = kafka
        .input_topics
        .iter()
        .filter(|t| !t.starts_with('^'))
        .collect();
    if literal.len() < 2 {
        return Ok(());
    }
    let mut counts = Vec::new();
    for topic in literal {
        let n = partition_count(kafka, producer, topic)?.unwrap_or(0);
        counts.push((topic.clone(), n));
    }
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        let counts = counts
            .iter()
            .map(|(t, n)| format!("{t}: {n} partitions"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PipelineError::NotCoPartitioned { counts });
    }
    Ok(())
}

/// Fails fast when the output topics are missing, rather than retrying
/// deliveries forever.
fn check_topics(kafka: &KafkaSettings, producer: &BaseConsumer) -> Result<(), PipelineError> {
    check_topics_until(kafka, producer, Instant::now() + Duration::from_secs(10))
}

fn check_topics_until(
    kafka: &KafkaSettings,
    producer: &BaseConsumer,
    deadline: Instant,
) -> Result<(), PipelineError> {
    for (topic, role) in [
        (&kafka.output_topic, "output_topic"),
        (&kafka.dead_letter_topic, "dead_letter_topic"),
    ] {
        if partition_count(kafka, producer, topic)?.is_none() {
            // A topic created a moment ago may not be in every broker's
            // metadata yet: look again for a few seconds before giving up.
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                return check_topics_until(kafka, producer, deadline);
            }
            return Err(PipelineError::MissingTopic {
                topic: topic.clone(),
                role,
                brokers: kafka.brokers.clone(),
            });
        }
    }
    Ok(())
}

/// Sends failed deliveries again, once each; those the producer cannot
/// take now (full queue) are kept for the next round.
pub fn resend(producer: &ThreadedProducer<Delivery>, retries: Vec<Retry>) {
    let mut left = Vec::new();
    for r in retries {
        let mut record = BaseRecord::with_opaque_to(&r.topic, r.source);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(p) = &r.payload {
            record = record.payload(&p[..]);
        }
        if let Some(h) = &r.headers {
            record = record.headers(h.clone());
        }
        if let Err((e, back)) = producer.send(record) {
            tracing::debug!("retry of a delivery to {} deferred: {e}", r.topic);
            left.push(Retry {
                topic: r.topic.clone(),
                key: r.key.clone(),
                payload: r.payload.clone(),
                headers: r.headers.clone(),
                source: back.delivery_opaque,
            });
        }
    }
    if !left.is_empty() {
        producer.context().retries.lock().extend(left);
    }
}

impl Worker<'_> {
    fn run(&mut self, consumer: &BaseConsumer<GroupContext>) -> Result<(), PipelineError> {
        let model = Arc::clone(&self.shared.model);
        let sweep_every = Duration::from_millis(model.signals.sweep_interval.max(1) as u64);
        let mut next_sweep = Instant::now() + sweep_every;
        let mut next_commit = Instant::now() + self.kafka.commit_interval;
        let mut next_gauges = Instant::now();
        let mut next_scan = Instant::now();
        self.shared.health.consuming.store(true, Ordering::SeqCst);
        while !self.stop.load(Ordering::SeqCst) {
            self.shared
                .health
                .last_turn
                .store(now_millis(), Ordering::Relaxed);
            if let Some(why) = self.producer.context().fatal() {
                return Err(PipelineError::Producer(why));
            }
            let now = Instant::now();
            self.resend_failed();
            if now >= next_sweep && self.clock == Clock::Wall {
                self.sweep()?;
                next_sweep = now + sweep_every;
            }
            if now >= next_commit {
                self.commit(consumer);
                next_commit = now + self.kafka.commit_interval;
            }
            if let Some(p) = &mut self.periodic {
                p.tick(&self.shared.partitions, &self.tracker);
            }
            if now >= next_gauges {
                self.refresh_gauges();
                next_gauges = now + Duration::from_secs(1);
            }
            if now >= next_scan {
                self.scan_gauges();
                next_scan = now + Duration::from_secs(10);
            }
            // A batch: wait for the first message, then take what is ready.
            let Some(first) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let started = Instant::now();
            self.handle(first)?;
            for _ in 0..1000 {
                match consumer.poll(Duration::ZERO) {
                    Some(m) => self.handle(m)?,
                    None => break,
                }
            }
            self.shared
                .metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn handle(
        &mut self,
        message: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
    ) -> Result<(), PipelineError> {
        match message {
            Ok(m) => self.process(&m),
            Err(KafkaError::PartitionEOF(p)) => {
                // The state is current. Said at INFO the first time after
                // an assignment, at DEBUG after that.
                if let Some(state) = self.shared.partitions.get(p) {
                    let mut st = state.lock();
                    let mut positions = self.tracker.lock().positions(p);
                    if positions.is_empty() {
                        // Nothing new since the assignment.
                        positions = st.started_at.clone();
                    }
                    let customers = st.engine.customers().len();
                    if !st.reached_end {
                        st.reached_end = true;
                        tracing::info!(
                            partition = p,
                            customers,
                            ?positions,
                            "partition caught up with the end of its log"
                        );
                    } else {
                        tracing::debug!(
                            partition = p,
                            customers,
                            ?positions,
                            "partition caught up with the end of its log"
                        );
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!("consumer error: {e}");
                Ok(())
            }
        }
    }

    fn topic(&mut self, name: &str) -> (Arc<str>, IntCounter) {
        if let Some((t, c)) = self.topics.get(name) {
            return (Arc::clone(t), c.clone());
        }
        let t: Arc<str> = Arc::from(name);
        let c = self
            .shared
            .metrics
            .events_consumed
            .with_label_values(&[name]);
        self.topics
            .insert(name.to_string(), (Arc::clone(&t), c.clone()));
        (t, c)
    }

    /// Parses, scores and produces the outputs of one input message.
    fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), PipelineError> {
        let (topic, consumed) = self.topic(msg.topic());
        consumed.inc();
        let partition = msg.partition();
        let offset = msg.offset();
        let timestamp = msg.timestamp().to_millis();
        let model = Arc::clone(&self.shared.model);
        let metrics = &self.shared.metrics;
        let shared = &self.shared;
        let state = shared
            .partitions
            .get_or_insert_with(partition, || shared.new_state());
        let mut st = state.lock();
        let silent = st.is_rebuilding(&topic, offset);
        let now = now_millis().max(st.clock);
        let payload = msg.payload().unwrap_or(&[]);
        let parsed = match msg.payload() {
            // A tombstone: an erasure request for the customer of its key.
            None => event::parse_tombstone(msg.key()),
            Some([]) => Parsed::Invalid(event::Invalid {
                reason: event::InvalidReason::InvalidJson,
                detail: "empty message".into(),
            }),
            Some(payload) => event::parse(
                payload,
                &model,
                ParseContext {
                    fallback_timestamp: timestamp,
                    now: Some(now),
                },
            ),
        };
        self.outbox.clear();
        match parsed {
            Parsed::Event(mut ev) => {
                ev.segment_id = self.shared.segment_id(ev.segment.as_deref());
                let encoder = &self.encoder;
                let outbox = &mut self.outbox;
                let mut sink = |s: &Signal<'_>| {
                    if !silent {
                        metrics.outputs_by_kind[s.kind.index()].inc();
                        outbox.push(encode_signal(encoder, s));
                    }
                };
                let result = match self.clock {
                    Clock::Wall => st.engine.process_live(&ev, now, &mut sink),
                    // Replay semantics per partition: the watermark is the
                    // clock and crossing a sweep boundary sweeps.
                    Clock::Event => st.engine.process_replay(&ev, &mut sink),
                };
                match result {
                    Ok(Outcome::Applied { .. }) => metrics.events_accepted.inc(),
                    Ok(Outcome::Ignored(r)) => metrics.ignored_by_reason[r as usize].inc(),
                    Err(source) => return Err(PipelineError::Engine { partition, source }),
                }
                st.clock = st.engine.live_clock(now);
            }
            Parsed::Erase(id) => {
                metrics.erasures.inc();
                let t = match self.clock {
                    Clock::Wall => Some(st.clock_at(now)),
                    Clock::Event => st.engine.watermark(),
                };
                let encoder = &self.encoder;
                let outbox = &mut self.outbox;
                if let Some(t) = t {
                    st.engine.erase(&id, t, &mut |s: &Signal<'_>| {
                        if !silent {
                            metrics.outputs_by_kind[s.kind.index()].inc();
                            outbox.push(encode_signal(encoder, s));
                        }
                    });
                }
            }
            Parsed::Ignored(r) => metrics.ignored_by_reason[r as usize].inc(),
            Parsed::Invalid(inv) => {
                metrics.rejected_by_reason[inv.reason as usize].inc();
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
                            value: Some(&*topic),
                        })
                        .insert(Header {
                            key: headers::SOURCE_PARTITION,
                            value: Some(&partition.to_string()),
                        })
                        .insert(Header {
                            key: headers::SOURCE_OFFSET,
                            value: Some(&offset.to_string()),
                        });
                    self.outbox.push(Outgoing {
                        topic: false,
                        key: msg.key().unwrap_or(&[]).to_vec(),
                        payload: Some(payload.to_vec()),
                        headers,
                    });
                }
            }
        }
        drop(st);
        self.tracker
            .lock()
            .processed(&topic, partition, offset, self.outbox.len() as u32);
        let source = Source {
            topic,
            partition,
            offset,
            timestamp,
        };
        self.send_outbox(&source)
    }

    /// Sends the outbox, waiting while the producer's queue is full.
    fn send_outbox(&mut self, source: &Source) -> Result<(), PipelineError> {
        let outbox = std::mem::take(&mut self.outbox);
        for out in &outbox {
            let topic = if out.topic {
                &self.kafka.output_topic
            } else {
                &self.kafka.dead_letter_topic
            };
            self.send(topic, out, Box::new(source.clone()))?;
        }
        self.outbox = outbox;
        Ok(())
    }

    fn send(&self, topic: &str, out: &Outgoing, source: Box<Source>) -> Result<(), PipelineError> {
        let mut record = BaseRecord::with_opaque_to(topic, source)
            .key(&out.key[..])
            .headers(out.headers.clone());
        if let Some(p) = &out.payload {
            record = record.payload(&p[..]);
        }
        let mut waited = false;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: wait for acknowledgements to make room.
                    if !waited {
                        tracing::debug!("producer queue full: waiting");
                        waited = true;
                    }
                    if let Some(why) = self.producer.context().fatal() {
                        return Err(PipelineError::Producer(why));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    back,
                )) if !out.topic && out.payload.as_ref().is_some_and(|p| p.len() > 1024) => {
                    // A dead letter too large for the producer: keep its
                    // head and say so, rather than stopping the stream.
                    let len = out.payload.as_ref().map_or(0, Vec::len);
                    let keep = (len / 2).min(64 * 1024);
                    let smaller = Outgoing {
                        topic: false,
                        key: out.key.clone(),
                        payload: out.payload.as_ref().map(|p| p[..keep].to_vec()),
                        headers: out.headers.clone().insert(Header {
                            key: headers::TRUNCATED,
                            value: Some(&len.to_string()),
                        }),
                    };
                    return self.send(topic, &smaller, back.delivery_opaque);
                }
                Err((e, _)) => {
                    let permanent = e.rdkafka_error_code().is_some_and(is_permanent);
                    return Err(PipelineError::Producer(format!(
                        "cannot produce to {topic}{}: {e}",
                        if permanent { "" } else { " (unexpected)" }
                    )));
                }
            }
        }
    }

    fn resend_failed(&mut self) {
        let retries = self.producer.context().take_retries();
        if !retries.is_empty() {
            resend(&self.producer, retries);
        }
    }

    /// Evaluates every customer of every caught-up partition.
    fn sweep(&mut self) -> Result<(), PipelineError> {
        let started = Instant::now();
        let mut sent = 0usize;
        for p in self.shared.partitions.numbers() {
            let Some(state) = self.shared.partitions.get(p) else {
                continue;
            };
            let mut outbox = std::mem::take(&mut self.outbox);
            outbox.clear();
            {
                let mut st = state.lock();
                if !st.caught_up() {
                    continue;
                }
                let t = st.clock_at(now_millis());
                let encoder = &self.encoder;
                let metrics = &self.shared.metrics;
                let forgotten = st.engine.forgotten_count();
                st.engine.sweep(t, &mut |s: &Signal<'_>| {
                    metrics.outputs_by_kind[s.kind.index()].inc();
                    outbox.push(encode_signal(encoder, s));
                });
                metrics
                    .customers_forgotten
                    .inc_by(st.engine.forgotten_count() - forgotten);
            }
            // Sweep outputs count toward the partition's last processed
            // offset: neither a commit nor a snapshot covers the state they
            // come from before they are acknowledged.
            let (topic, offset) = self
                .tracker
                .lock()
                .sweep_source(p)
                .unwrap_or_else(|| (Arc::from(""), -1));
            self.tracker
                .lock()
                .add_outputs(&topic, p, offset, outbox.len() as u32);
            let source = Box::new(Source {
                topic,
                partition: p,
                offset,
                timestamp: None,
            });
            for out in &outbox {
                self.send(&self.kafka.output_topic, out, source.clone())?;
            }
            sent += outbox.len();
            self.outbox = outbox;
        }
        tracing::debug!(
            outputs = sent,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sweep done"
        );
        Ok(())
    }

    fn commit(&self, consumer: &BaseConsumer<GroupContext>) {
        let offsets = self.tracker.lock().committable();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in &offsets {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        match consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => {
                let mut tracker = self.tracker.lock();
                for (t, p, o) in &offsets {
                    tracker.mark_committed(t, *p, *o);
                }
            }
            Err(e) => tracing::warn!("cannot commit offsets: {e}"),
        }
    }

    /// Gauges that need a pass over every customer: published scores by
    /// range, and tiers per configured segment.
    fn scan_gauges(&self) {
        let m = &self.shared.metrics;
        let tiers = self.shared.model.tiers.len();
        let segments = self.shared.segments.len();
        let mut ranges = [0i64; 10];
        let mut by_segment = vec![0i64; segments * tiers];
        for p in self.shared.partitions.numbers() {
            let Some(state) = self.shared.partitions.get(p) else {
                continue;
            };
            let st = state.lock();
            let table = st.engine.customers();
            for slot in 0..table.len() as crate::customers::Slot {
                let rec = table.record(slot);
                let bucket = ((rec.emitted_score() / 10.0) as usize).min(9);
                ranges[bucket] += 1;
                let seg = usize::from(rec.segment());
                if seg > 0 && seg <= segments {
                    let tier = usize::from(rec.emitted_tier()).min(tiers - 1);
                    by_segment[(seg - 1) * tiers + tier] += 1;
                }
            }
        }
        for (range, n) in crate::metrics::SCORE_RANGES.iter().zip(ranges) {
            m.score_customers.with_label_values(&[range]).set(n);
        }
        for (i, segment) in self.shared.segments.iter().enumerate() {
            for (t, tier) in self.shared.model.tiers.iter().enumerate() {
                m.segment_tier_customers
                    .with_label_values(&[segment.as_str(), &*tier.name])
                    .set(by_segment[i * tiers + t]);
            }
        }
    }

    fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        let model = &self.shared.model;
        let mut customers = 0u64;
        let mut at_risk = 0u64;
        let mut tiers = vec![0u64; model.tiers.len()];
        for p in self.shared.partitions.numbers() {
            if let Some(state) = self.shared.partitions.get(p) {
                let st = state.lock();
                customers += st.engine.customers().len() as u64;
                at_risk += st.engine.at_risk_count();
                for (t, c) in tiers.iter_mut().zip(st.engine.tier_counts()) {
                    *t += c;
                }
            }
        }
        m.customers.set(customers as i64);
        m.churn_risk_customers.set(at_risk as i64);
        for (tier, count) in model.tiers.iter().zip(tiers) {
            m.tier_customers
                .with_label_values(&[&tier.name])
                .set(count as i64);
        }
        m.producer_queue_messages
            .set(i64::from(self.producer.in_flight_count()));
    }
}

/// An output event as a Kafka message: keyed by customer id, with the
/// `ces-kind` header.
fn encode_signal(encoder: &Encoder, s: &Signal<'_>) -> Outgoing {
    // `customer_erased` is a tombstone, so that a compacted output topic
    // drops the customer's signals too.
    let payload = (!matches!(s.kind, SignalKind::CustomerErased)).then(|| {
        let mut payload = Vec::with_capacity(256);
        encoder.encode(s, &mut payload);
        payload
    });
    Outgoing {
        topic: true,
        key: s.customer_id.as_bytes().to_vec(),
        payload,
        headers: OwnedHeaders::new().insert(Header {
            key: headers::KIND,
            value: Some(s.kind.name()),
        }),
    }
}
