//! `ces-stream generate`: the synthetic clickstream of [`crate::synth`],
//! into a JSONL file (simulated time) or into any Kafka topic (live time,
//! at a chosen rate), for demos, load tests and benchmarks.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::synth::{Synth, SynthEvent, SynthOptions};
use crate::timestamp::{now_millis, Millis};

/// Writes `events` events spread evenly over `span` ms from `start`.
pub fn to_file(
    mut out: impl Write,
    events: u64,
    opts: SynthOptions,
    start: Millis,
    span: Millis,
) -> std::io::Result<()> {
    let mut synth = Synth::new(opts);
    let mut ev = SynthEvent::default();
    let n = events.max(1);
    let step = span as f64 / n as f64;
    for i in 0..events {
        let t = start + (i as f64 * step) as i64;
        synth.next(t, i as f64 / n as f64, &mut ev);
        out.write_all(&ev.payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Where and how fast to produce.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    pub brokers: String,
    pub topic: String,
    /// Events per second; 0 for as fast as possible.
    pub rate: u64,
    /// Stop after this many events (`None`: until stopped).
    pub events: Option<u64>,
    /// The personas' behaviour cycles with this period (live time).
    pub cycle: Duration,
    /// Extra librdkafka properties.
    pub options: Vec<(String, String)>,
}

/// Produces the synthetic stream to Kafka until `events` are sent or `stop`
/// is set. Counts what it sent in `sent`. Keys are customer ids.
pub fn to_kafka(
    target: &KafkaTarget,
    opts: SynthOptions,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &target.brokers)
        .set("linger.ms", "10")
        .set("enable.idempotence", "true")
        // The partitioner `run` assumes by default (`[kafka] partitioner`),
        // so that any instance finds a customer's partition.
        .set("partitioner", "murmur2_random");
    for (k, v) in &target.options {
        config.set(k, v);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = config.create()?;
    let mut synth = Synth::new(opts);
    let mut ev = SynthEvent::default();
    let started = Instant::now();
    let cycle = target.cycle.as_secs_f64().max(1.0);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && target.events.is_none_or(|max| n < max) {
        if target.rate > 0 {
            // Pace to the rate: sleep until this event is due.
            let due = Duration::from_secs_f64(n as f64 / target.rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
                continue;
            }
        }
        let phase = (started.elapsed().as_secs_f64() % cycle) / cycle;
        synth.next(now_millis(), phase, &mut ev);
        let mut record = BaseRecord::to(&target.topic).key(ev.key.as_bytes());
        // An erasure request is a tombstone on Kafka (a malformed one, with
        // no customer id to key it by, goes as its JSON).
        if !ev.erase || ev.key.is_empty() {
            record = record.payload(&ev.payload[..]);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    std::thread::sleep(Duration::from_millis(2));
                    record = back;
                }
                Err((e, _)) => return Err(e),
            }
        }
        n += 1;
        sent.fetch_add(1, Ordering::Relaxed);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A handle on a generator running on its own thread.
pub struct Running {
    pub stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    pub thread: std::thread::JoinHandle<Result<(), KafkaError>>,
}

/// Starts [`to_kafka`] on a thread.
pub fn spawn(target: KafkaTarget, opts: SynthOptions) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, c) = (Arc::clone(&stop), Arc::clone(&sent));
    let thread = std::thread::spawn(move || to_kafka(&target, opts, &s, &c));
    Running { stop, sent, thread }
}
