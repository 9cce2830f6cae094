//! Prometheus metrics of a running instance: one registry, named the
//! Prometheus way (`ces_` prefix, `_total`, `_seconds`, base units), with
//! bounded labels only (topics, partitions, reasons, kinds, tiers; never a
//! customer id or free text).
//!
//! Hot-path counters are resolved to their label values once, so that
//! counting an event is an atomic increment.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::engine::SignalKind;
use crate::event::{IgnoreReason, InvalidReason};
use crate::model::Model;

/// The `range` labels of `ces_score_customers`.
pub const SCORE_RANGES: [&str; 10] = [
    "0-10", "10-20", "20-30", "30-40", "40-50", "50-60", "60-70", "70-80", "80-90", "90-100",
];

/// Updates the gauges fed by librdkafka statistics: consumer lag per
/// partition and broker round-trip times.
pub fn record_statistics(metrics: &Metrics, client: &str, stats: &rdkafka::Statistics) {
    for (topic, t) in &stats.topics {
        for (partition, p) in &t.partitions {
            // -1 is "unknown" (no position yet); the internal partition -1 is skipped.
            if *partition >= 0 && client == "consumer" && p.consumer_lag >= 0 {
                metrics
                    .consumer_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }
    for broker in stats.brokers.values() {
        if let Some(rtt) = &broker.rtt {
            if broker.nodeid >= 0 {
                metrics
                    .broker_rtt_seconds
                    .with_label_values(&[client, &broker.nodename])
                    .set(rtt.avg as f64 / 1e6);
            }
        }
    }
}

/// The `cause` label values of `ces_transactions_aborted_total`.
pub const TRANSACTION_ABORT_CAUSES: [&str; 3] = ["error", "fatal", "lost"];

/// Every metric of the process.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub events_accepted: IntCounter,
    pub events_rejected: IntCounterVec,
    pub events_ignored: IntCounterVec,
    pub outputs: IntCounterVec,
    pub batch_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub customers: IntGauge,
    pub tier_customers: IntGaugeVec,
    pub segment_tier_customers: IntGaugeVec,
    pub score_customers: IntGaugeVec,
    pub churn_risk_customers: IntGauge,
    pub assigned_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    pub producer_queue_messages: IntGauge,
    pub delivery_errors: IntCounterVec,
    pub broker_rtt_seconds: prometheus::GaugeVec,
    pub snapshot_seconds: Histogram,
    pub snapshot_bytes: IntGauge,
    pub snapshot_age_seconds: prometheus::Gauge,
    pub snapshot_failures: IntCounterVec,
    pub snapshot_restored_customers: IntCounter,
    /// Erasure requests consumed (tombstones on an input topic).
    pub erasures: IntCounter,
    /// Customers removed by sweeps after `scoring.forget_after` of silence.
    pub customers_forgotten: IntCounter,
    /// `/v1/*` requests for customers another instance owns, by outcome:
    /// `forwarded` (the owner answered), `failed` (it could not be
    /// reached), `unavailable` (no owner known: 503 Retry-After).
    pub api_routed: IntCounterVec,
    /// Records of the members topic ignored, by reason: not signed by the
    /// group's secret, malformed, or replayed (see `kafka::members`).
    pub member_claims_rejected: IntCounterVec,
    /// Resolved children, in `InvalidReason::ALL` / `IgnoreReason::ALL` order.
    pub rejected_by_reason: Vec<IntCounter>,
    pub ignored_by_reason: Vec<IntCounter>,
    /// Per kind, in `SignalKind::NAMES` order.
    pub outputs_by_kind: [IntCounter; 4],
    /// exactly_once: transactions committed.
    pub transactions_committed: IntCounter,
    /// exactly_once: transactions aborted, per cause in
    /// [`TRANSACTION_ABORT_CAUSES`] order.
    pub transactions_aborted: Vec<IntCounter>,
    /// exactly_once: from a transaction's begin to its commit.
    pub transaction_seconds: Histogram,
    /// exactly_once: partitions taken back to their last committed state
    /// after a failed transaction (their later events are processed again).
    pub partition_rewinds: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    /// Registers every metric. Long, and left so on purpose: a flat list
    /// of registrations, one per metric, each with its name, help and
    /// labels, in the order of the README's table; cutting it into steps
    /// would only scatter that list.
    pub fn new(model: &Model) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let events_consumed = counter(
            r,
            "ces_events_consumed_total",
            "Input messages consumed, by topic.",
            &["topic"],
        );
        let events_accepted = IntCounter::new(
            "ces_events_accepted_total",
            "Events applied to a customer's score.",
        )
        .expect("valid metric");
        r.register(Box::new(events_accepted.clone()))
            .expect("unique metric");
        let events_rejected = counter(
            r,
            "ces_events_rejected_total",
            "Invalid events sent to the dead-letter topic, by reason.",
            &["reason"],
        );
        let events_ignored = counter(
            r,
            "ces_events_ignored_total",
            "Valid events not scored, by reason.",
            &["reason"],
        );
        let outputs = counter(
            r,
            "ces_outputs_total",
            "Output events published, by kind.",
            &["kind"],
        );
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let batch_seconds = histogram(
            "ces_batch_processing_seconds",
            "Time to process one batch of consumed messages.",
            prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("valid buckets"),
        );
        let end_to_end_seconds = histogram(
            "ces_end_to_end_latency_seconds",
            "From the input message's Kafka timestamp to the broker's acknowledgement of its output.",
            prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
        );
        let consumer_lag = gauge(
            r,
            "ces_consumer_lag_messages",
            "Messages between the consumer's position and the end of the partition.",
            &["topic", "partition"],
        );
        let customers = IntGauge::new("ces_customers", "Customers tracked by this instance.")
            .expect("valid metric");
        r.register(Box::new(customers.clone()))
            .expect("unique metric");
        let tier_customers = gauge(
            r,
            "ces_tier_customers",
            "Customers per tier (the tier last published).",
            &["tier"],
        );
        let segment_tier_customers = gauge(
            r,
            "ces_segment_tier_customers",
            "Customers per tier for the configured segments (attributes.segment).",
            &["segment", "tier"],
        );
        let score_customers = gauge(
            r,
            "ces_score_customers",
            "Customers by last published score, in ranges of 10 points (0-10 ... 90-100), refreshed every 10 s.",
            &["range"],
        );
        let churn_risk_customers = IntGauge::new(
            "ces_churn_risk_customers",
            "Customers currently flagged at risk of churn.",
        )
        .expect("valid metric");
        r.register(Box::new(churn_risk_customers.clone()))
            .expect("unique metric");
        let assigned_partitions = IntGauge::new(
            "ces_assigned_partitions",
            "Input partitions assigned to this instance.",
        )
        .expect("valid metric");
        r.register(Box::new(assigned_partitions.clone()))
            .expect("unique metric");
        let rebalances = counter(
            r,
            "ces_rebalances_total",
            "Consumer group rebalances, by kind (assign, revoke, lost: the group session expired, error).",
            &["kind"],
        );
        let producer_queue_messages = IntGauge::new(
            "ces_producer_queue_messages",
            "Messages in the producer's queue, not yet acknowledged.",
        )
        .expect("valid metric");
        r.register(Box::new(producer_queue_messages.clone()))
            .expect("unique metric");
        let delivery_errors = counter(
            r,
            "ces_producer_delivery_errors_total",
            "Failed deliveries of outputs and dead letters (each is retried), by error.",
            &["error"],
        );
        let broker_rtt_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "ces_broker_rtt_seconds",
                "Average broker round-trip time from librdkafka statistics.",
            ),
            &["client", "broker"],
        )
        .expect("valid metric");
        r.register(Box::new(broker_rtt_seconds.clone()))
            .expect("unique metric");
        let snapshot_seconds = histogram(
            "ces_snapshot_duration_seconds",
            "Time to write one partition snapshot.",
            prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
        );
        let snapshot_bytes = IntGauge::new(
            "ces_snapshot_size_bytes",
            "Size of the last snapshot written.",
        )
        .expect("valid metric");
        r.register(Box::new(snapshot_bytes.clone()))
            .expect("unique metric");
        let snapshot_age_seconds = prometheus::Gauge::new(
            "ces_snapshot_age_seconds",
            "Age of the oldest latest-snapshot among the assigned partitions.",
        )
        .expect("valid metric");
        r.register(Box::new(snapshot_age_seconds.clone()))
            .expect("unique metric");
        let snapshot_failures = counter(
            r,
            "ces_snapshot_failures_total",
            "Snapshots that could not be written or read, by kind (write, corrupt).",
            &["kind"],
        );
        let snapshot_restored_customers = IntCounter::new(
            "ces_snapshot_restored_customers_total",
            "Customers restored from snapshots.",
        )
        .expect("valid metric");
        r.register(Box::new(snapshot_restored_customers.clone()))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }

        let rejected_by_reason = InvalidReason::ALL
            .iter()
            .map(|r| events_rejected.with_label_values(&[r.as_str()]))
            .collect();
        let ignored_by_reason = IgnoreReason::ALL
            .iter()
            .map(|r| events_ignored.with_label_values(&[r.as_str()]))
            .collect();
        let outputs_by_kind = SignalKind::NAMES.map(|k| outputs.with_label_values(&[k]));
        let erasures = IntCounter::new(
            "ces_erasures_total",
            "Erasure requests consumed (input tombstones), of known customers or not.",
        )
        .expect("valid metric");
        r.register(Box::new(erasures.clone()))
            .expect("unique metric");
        let customers_forgotten = IntCounter::new(
            "ces_customers_forgotten_total",
            "Customers removed by sweeps after scoring.forget_after without an event.",
        )
        .expect("valid metric");
        r.register(Box::new(customers_forgotten.clone()))
            .expect("unique metric");
        let api_routed = counter(
            r,
            "ces_api_routed_requests_total",
            "Customer API requests for partitions this instance does not own, by outcome.",
            &["outcome"],
        );
        for outcome in ["forwarded", "failed", "unavailable"] {
            api_routed.with_label_values(&[outcome]);
        }
        let member_claims_rejected = counter(
            r,
            "ces_member_claims_rejected_total",
            "Records of the members topic ignored because the group did not sign them (or they replay an older one), by reason.",
            &["reason"],
        );
        // Its reasons are registered by the service, which knows them
        // (`kafka::members::Rejection`): this module sits below kafka.
        for t in &model.tiers {
            tier_customers.with_label_values(&[&t.name]).set(0);
        }
        for kind in ["assign", "revoke", "lost", "error"] {
            rebalances.with_label_values(&[kind]);
        }
        let transactions_committed = IntCounter::new(
            "ces_transactions_committed_total",
            "Kafka transactions committed (guarantee = exactly_once).",
        )
        .expect("valid metric");
        r.register(Box::new(transactions_committed.clone()))
            .expect("unique metric");
        let aborted = counter(
            r,
            "ces_transactions_aborted_total",
            "Kafka transactions aborted (guarantee = exactly_once), by cause: error (a send or the commit failed), fatal (the producer was fenced or failed, and replaced), lost (the partitions were lost with the group session).",
            &["cause"],
        );
        let transactions_aborted = TRANSACTION_ABORT_CAUSES
            .iter()
            .map(|c| aborted.with_label_values(&[c]))
            .collect();
        let partition_rewinds = IntCounter::new(
            "ces_partition_rewinds_total",
            "Partitions taken back to their last committed state after a failed Kafka transaction (guarantee = exactly_once): their events since are processed again.",
        )
        .expect("valid metric");
        r.register(Box::new(partition_rewinds.clone()))
            .expect("unique metric");
        let transaction_seconds = histogram(
            "ces_transaction_duration_seconds",
            "From a Kafka transaction's begin to its commit (guarantee = exactly_once).",
            prometheus::exponential_buckets(0.005, 2.0, 12).expect("valid buckets"),
        );
        for range in SCORE_RANGES {
            score_customers.with_label_values(&[range]).set(0);
        }
        for kind in [
            "write",
            "corrupt",
            "incompatible",
            "compacted",
            "uncommitted",
        ] {
            snapshot_failures.with_label_values(&[kind]);
        }
        for error in [
            "timed_out",
            "queue_full",
            "transport",
            "unknown_topic",
            "leader",
            "request_timed_out",
            "permanent",
            "other",
            "unknown",
        ] {
            delivery_errors.with_label_values(&[error]);
        }
        Metrics {
            registry,
            events_consumed,
            events_accepted,
            events_rejected,
            events_ignored,
            outputs,
            batch_seconds,
            end_to_end_seconds,
            consumer_lag,
            customers,
            tier_customers,
            segment_tier_customers,
            score_customers,
            churn_risk_customers,
            assigned_partitions,
            rebalances,
            producer_queue_messages,
            delivery_errors,
            broker_rtt_seconds,
            snapshot_seconds,
            snapshot_bytes,
            snapshot_age_seconds,
            snapshot_failures,
            snapshot_restored_customers,
            rejected_by_reason,
            ignored_by_reason,
            outputs_by_kind,
            erasures,
            customers_forgotten,
            api_routed,
            member_claims_rejected,
            transactions_committed,
            transactions_aborted,
            transaction_seconds,
            partition_rewinds,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            return format!("# cannot encode metrics: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
