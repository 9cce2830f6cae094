//! `ces-stream run`: the Kafka pipeline.
//!
//! One consumer-group member. Its own thread serves the consumer's
//! callbacks (rebalances, statistics) and commits; the partitions it is
//! assigned go to a pool of worker threads (`worker`), each owning its
//! partitions' state and queues outright. The producer is idempotent and
//! acknowledges on its own thread; an input offset is committed only once
//! everything produced for the events before it is acknowledged (see
//! `delivery`). Backpressure: when the producer's queue is full, workers
//! wait, so a slow broker slows consumption instead of growing memory.
//! Rebalances run inside the consumer's poll (see `rebalance`). Shutdown is
//! a future handed to [`run`], and ends within `shutdown_timeout`.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ThreadedProducer};

use crate::kafka::delivery::{resend, Delivery, OffsetTracker, SourceCodec};
use crate::kafka::error::PipelineError;
use crate::kafka::first_contact::{wait_for_brokers, RefusalContext};
use crate::kafka::rebalance::GroupContext;
use crate::kafka::settings::KafkaSettings;
use crate::kafka::shared::Shared;
use crate::kafka::worker::{Context, GroupHandle, Pool};
use crate::metrics::SCORE_RANGES;
use crate::model::Clock;
use crate::partition::PartitionHooks;
use crate::timestamp::now_millis;

/// Runs the pipeline until `shutdown` completes, then stops consuming,
/// flushes, commits and returns, within `kafka.shutdown_timeout`. Errors
/// end it early.
pub async fn run(
    kafka: &KafkaSettings,
    clock: Clock,
    shared: Shared,
    hooks: Option<Arc<dyn PartitionHooks>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let kafka = kafka.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    // If this future is dropped (its runtime shuts down), the thread stops too.
    let _guard = StopOnDrop(Arc::clone(&stop));
    let bound = kafka.shutdown_timeout;
    let mut handle = tokio::task::spawn_blocking(move || {
        run_blocking(&kafka, clock, shared, hooks, thread_stop)
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

/// Runs the pipeline on the current thread until `stop` is set.
pub fn run_blocking(
    kafka: &KafkaSettings,
    clock: Clock,
    shared: Shared,
    hooks: Option<Arc<dyn PartitionHooks>>,
    stop: Arc<AtomicBool>,
) -> Result<(), PipelineError> {
    let tracker = Arc::new(Mutex::new(if kafka.exactly_once() {
        OffsetTracker::transactional()
    } else {
        OffsetTracker::default()
    }));
    let codec = Arc::new(SourceCodec::default());
    for t in kafka.input_topics.iter().filter(|t| !t.starts_with('^')) {
        codec.topic_index(t);
    }
    let producer: ThreadedProducer<Delivery> = kafka
        .producer_config()
        .create_with_context(Delivery::new(
            Arc::clone(&tracker),
            Arc::clone(&codec),
            shared.metrics.clone(),
        ))
        .map_err(|source| PipelineError::Client {
            client: "producer",
            source,
        })?;
    let producer = Arc::new(producer);
    // Metadata is read with a consumer that never lets a broker create a
    // topic it is asked about (a producer's metadata request may).
    let metadata: BaseConsumer<RefusalContext> = kafka
        .consumer_config()
        .set("allow.auto.create.topics", "false")
        .create_with_context(RefusalContext::default())
        .map_err(|source| PipelineError::Client {
            client: "consumer",
            source,
        })?;
    // A wrong password or an untrusted certificate stops the start here,
    // with what to check, for either client (their options may differ).
    // The producer first: its context hears librdkafka's whole message.
    wait_for_brokers(
        producer.client(),
        &producer.context().refusal,
        || {},
        &kafka.brokers,
        "producer",
    )?;
    let refusal = &metadata.context().refusal;
    wait_for_brokers(
        metadata.client(),
        refusal,
        || {
            while let Some(event) = metadata.poll(Duration::ZERO) {
                if let Err(e) = event {
                    refusal.note(&e, &e.to_string());
                }
            }
        },
        &kafka.brokers,
        "consumer",
    )?;
    check_topics(kafka, &metadata)?;
    check_co_partitioned(kafka, &metadata)?;
    drop(metadata);

    let consumer_config = kafka.consumer_config();
    let reset_to_end = matches!(
        consumer_config.get("auto.offset.reset"),
        Some("latest" | "largest" | "end")
    );
    // Workers stop with the pipeline, but also stop it when one fails.
    let workers_stop = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context {
        kafka: Arc::new(kafka.clone()),
        clock,
        shared: shared.clone(),
        producer: Arc::clone(&producer),
        tracker: Arc::clone(&tracker),
        codec: Arc::clone(&codec),
        hooks: hooks.clone(),
        stop: Arc::clone(&workers_stop),
        failed: Mutex::new(None),
        group: OnceLock::new(),
        reset_to_end,
    });
    let pool = Arc::new(Mutex::new(Pool::start(kafka.workers, Arc::clone(&ctx))?));
    let context = GroupContext {
        model: Arc::clone(&shared.model),
        partitions: shared.partitions.clone(),
        producer: Arc::clone(&producer),
        tracker: Arc::clone(&tracker),
        codec: Arc::clone(&codec),
        assigned: Mutex::new(BTreeSet::new()),
        metrics: shared.metrics.clone(),
        flush_timeout: kafka.shutdown_timeout,
        hooks,
        reset_to_end,
        stop: Arc::clone(&stop),
        deadline: Mutex::new(None),
        pool: Arc::clone(&pool),
        consumer: OnceLock::new(),
        track_removals: shared.track_removals,
        commit_sent: Mutex::new(None),
        exactly_once: kafka.exactly_once(),
        sweep_every: Duration::from_millis(shared.model.signals.sweep_interval.max(1) as u64),
        member: Mutex::new(None),
    };
    let consumer: Arc<BaseConsumer<GroupContext>> = Arc::new(
        consumer_config
            .create_with_context(context)
            .map_err(|source| PipelineError::Client {
                client: "consumer",
                source,
            })?,
    );
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let _ = ctx
        .group
        .set(Arc::new(ConsumerHandle(Arc::downgrade(&consumer))));
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
        guarantee = kafka.guarantee.name(),
        workers = pool.lock().len(),
        "consuming"
    );

    let result = serve(kafka, &shared, &consumer, &producer, &ctx, &stop);
    tracing::info!(
        outputs_unacknowledged = tracker.lock().in_flight(),
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
    shared.health.consuming.store(false, Ordering::SeqCst);
    if let Err(e) = &result {
        *shared.health.failed.lock() = Some(e.to_string());
    }
    // The workers finish their batches and hand everything back.
    pool.lock().stop();
    // Whatever happened, hand back what can be handed back: flush, commit,
    // release every partition (its state goes to the store), leave the group.
    let ctx_group = consumer.context();
    let drained = crate::kafka::delivery::drain(&producer, deadline);
    let assigned: Vec<(String, i32)> = ctx_group.assigned.lock().iter().cloned().collect();
    if result.is_ok() {
        if !drained {
            tracing::warn!("shutdown: some outputs were not acknowledged in time; their events will be processed again");
        }
        ctx_group.release(&consumer, &assigned);
    } else {
        ctx_group.commit(&consumer, &assigned);
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

/// What the workers need of the consumer (exactly_once).
struct ConsumerHandle(std::sync::Weak<BaseConsumer<GroupContext>>);

impl GroupHandle for ConsumerHandle {
    fn group_metadata(&self) -> Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>> {
        self.0.upgrade()?.context().member.lock().clone()
    }

    fn seek(
        &self,
        topic: &str,
        partition: i32,
        offset: rdkafka::topic_partition_list::Offset,
    ) -> Result<(), String> {
        let consumer = self.0.upgrade().ok_or("the consumer is gone")?;
        consumer
            .seek(topic, partition, offset, Duration::from_secs(10))
            .map_err(|e| e.to_string())
    }

    fn committed(&self, topics: &[String], partition: i32) -> Result<Vec<Option<i64>>, String> {
        let consumer = self.0.upgrade().ok_or("the consumer is gone")?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for t in topics {
            tpl.add_partition(t, partition);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        topics
            .iter()
            .map(|t| {
                let e = committed
                    .find_partition(t, partition)
                    .ok_or("no answer for the partition")?;
                // A pending transaction's offsets answer with an error
                // (unstable) until it ends: no guess then.
                e.error().map_err(|e| e.to_string())?;
                Ok(match e.offset() {
                    rdkafka::topic_partition_list::Offset::Offset(o) => Some(o),
                    _ => None,
                })
            })
            .collect()
    }
}

/// The consumer's thread until `stop`: serves callbacks, commits, resends
/// failed deliveries, refreshes gauges, watches the workers.
fn serve(
    kafka: &KafkaSettings,
    shared: &Shared,
    consumer: &Arc<BaseConsumer<GroupContext>>,
    producer: &ThreadedProducer<Delivery>,
    ctx: &Context,
    stop: &AtomicBool,
) -> Result<(), PipelineError> {
    let mut next_commit = Instant::now() + kafka.commit_interval;
    let mut next_gauges = Instant::now();
    shared.health.consuming.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        shared
            .health
            .last_turn
            .store(now_millis(), Ordering::Relaxed);
        if let Some(why) = producer.context().fatal() {
            return Err(PipelineError::Producer(why));
        }
        if let Some(e) = ctx.failed.lock().take() {
            return Err(e);
        }
        let retries = producer.context().take_retries();
        if !retries.is_empty() {
            resend(producer, retries);
        }
        let now = Instant::now();
        if now >= next_commit {
            consumer.context().commit_async(consumer);
            next_commit = now + kafka.commit_interval;
        }
        if now >= next_gauges {
            refresh_gauges(shared, producer);
            next_gauges = now + Duration::from_secs(1);
        }
        // Callbacks only: the partitions' messages go to their own queues.
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                // Fetched before its partition's queue was split off.
                consumer.context().pool.lock().forward(m.detach());
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => tracing::warn!("consumer error: {e}"),
        }
    }
    Ok(())
}

/// How long a gauge refresh waits for one partition's state.
const GAUGE_LOCK_WAIT: Duration = Duration::from_millis(5);

/// Gauges summed over the partitions (each worker keeps its partitions'
/// counts current between batches). Runs on the consumer's polling
/// thread, which must never wait on a worker: while a partition's state
/// is busy, the gauges keep their last complete figures until the next
/// refresh.
fn refresh_gauges(shared: &Shared, producer: &ThreadedProducer<Delivery>) {
    let m = &shared.metrics;
    let model = &shared.model;
    let mut customers = 0u64;
    let mut at_risk = 0u64;
    let mut tiers = vec![0u64; model.tiers.len()];
    let mut ranges = [0i64; SCORE_RANGES.len()];
    let mut segments = vec![0i64; shared.segments.len() * model.tiers.len()];
    for p in shared.partitions.numbers() {
        if let Some(state) = shared.partitions.get(p) {
            let Some(st) = state.try_lock_for(GAUGE_LOCK_WAIT) else {
                return;
            };
            customers += st.engine.customers().len() as u64;
            at_risk += st.engine.at_risk_count();
            for (t, c) in tiers.iter_mut().zip(st.engine.tier_counts()) {
                *t += c;
            }
            for (r, c) in ranges.iter_mut().zip(st.score_ranges) {
                *r += c;
            }
            for (s, c) in segments.iter_mut().zip(&st.segment_tiers) {
                *s += c;
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
    for (range, n) in SCORE_RANGES.iter().zip(ranges) {
        m.score_customers.with_label_values(&[range]).set(n);
    }
    let n_tiers = model.tiers.len();
    for (i, segment) in shared.segments.iter().enumerate() {
        for (t, tier) in model.tiers.iter().enumerate() {
            m.segment_tier_customers
                .with_label_values(&[segment.as_str(), &*tier.name])
                .set(segments.get(i * n_tiers + t).copied().unwrap_or(0));
        }
    }
    m.producer_queue_messages
        .set(i64::from(producer.in_flight_count()));
}

/// The partitions of `topic`; `None` when the brokers do not know it.
fn partition_count<C: ConsumerContext>(
    kafka: &KafkaSettings,
    metadata: &BaseConsumer<C>,
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
fn check_co_partitioned<C: ConsumerContext>(
    kafka: &KafkaSettings,
    producer: &BaseConsumer<C>,
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
fn check_topics<C: ConsumerContext>(
    kafka: &KafkaSettings,
    producer: &BaseConsumer<C>,
) -> Result<(), PipelineError> {
    check_topics_until(kafka, producer, Instant::now() + Duration::from_secs(10))
}

fn check_topics_until<C: ConsumerContext>(
    kafka: &KafkaSettings,
    producer: &BaseConsumer<C>,
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
