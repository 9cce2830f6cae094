//! End-to-end benchmark of the Kafka pipeline (see scripts/bench-kafka.sh).
//!
//! On a local tansu broker, in one run:
//! 1. preloads a topic with EVENTS synthetic events;
//! 2. drains it with a bare rdkafka consumer that only counts messages (the
//!    baseline);
//! 3. drains it with the ces-stream pipeline (parse, score, publish);
//! 4. produces at half the pipeline's rate and measures the latency from
//!    producing an event to receiving its score_changed output, p50 and p99.
//!
//! Usage: bench_kafka [EVENTS]   (TANSU_BIN overrides the broker binary)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ces_stream::config::Settings;
use ces_stream::kafka::pipeline::{self, Shared};
use ces_stream::synth::{Synth, SynthEvent, SynthOptions};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

const PARTITIONS: i32 = 4;

fn tansu() -> std::path::PathBuf {
    std::env::var("TANSU_BIN")
        .map(Into::into)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cargo/bin/tansu")
        })
}

fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // One topic per request: tansu 0.6.0 creates only the first topic of a
    // multi-topic CreateTopics request.
    for (t, p) in topics {
        let new = [NewTopic::new(t, *p, TopicReplication::Fixed(1))];
        for r in rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .expect("create topics")
        {
            r.expect("topic created");
        }
    }
}

fn settings(bootstrap: &str, input: &str, output: &str, group: &str) -> Settings {
    let mut model =
        std::fs::read_to_string("config/default.toml").expect("run from the repository root");
    if std::env::var("BENCH_NO_OUTPUTS").is_ok() {
        // Diagnostic: the same work without publishing signals.
        model = model
            .replace("min_delta = 5.0", "min_delta = 1000.0")
            .replace("min_peak = 40.0", "min_peak = 100.0")
            .replace("above = 40.0", "above = 99.99")
            .replace("above = 75.0", "above = 99.995");
    }
    Settings::from_toml(
        &format!(
            "{model}\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"{group}\"\ninput_topics = [\"{input}\"]\noutput_topic = \"{output}\"\ndead_letter_topic = \"dead\"\n[kafka.consumer_options]\n\"fetch.wait.max.ms\" = 10\n[kafka.producer_options]\n\"linger.ms\" = 5\n\"queue.buffering.max.messages\" = 500000\n"
        ),
        std::path::Path::new("bench.toml"),
    )
    .expect("valid settings")
}

fn raw_consume(bootstrap: &str, topic: &str, total: u64) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "raw")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while n < total {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
        }
    }
    started.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let events: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut broker = std::process::Command::new(tansu())
        .args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tansu (scripts/ci-deps.sh installs it)");
    let bootstrap = format!("127.0.0.1:{port}");
    std::thread::sleep(Duration::from_millis(500));
    create_topics(
        &bootstrap,
        &[
            ("in", PARTITIONS),
            ("out", PARTITIONS),
            ("dead", 1),
            ("in2", PARTITIONS),
            ("out2", PARTITIONS),
            ("in3", PARTITIONS),
            ("out3", PARTITIONS),
        ],
    );

    // 1. Preload.
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    ces_stream::generate::to_kafka(
        &ces_stream::generate::KafkaTarget {
            brokers: bootstrap.clone(),
            topic: "in".into(),
            rate: 0,
            events: Some(events),
            cycle: Duration::from_secs(600),
            options: vec![
                ("linger.ms".into(), "50".into()),
                ("batch.size".into(), "1000000".into()),
            ],
        },
        SynthOptions {
            customers: 100_000,
            ..SynthOptions::default()
        },
        &stop,
        &sent,
    )
    .expect("preload");
    println!(
        "preloaded {events} events in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // 2. Baseline.
    let raw = raw_consume(&bootstrap, "in", events);
    let raw_rate = events as f64 / raw.as_secs_f64();
    println!(
        "bare consumer:  {:.2}s  {:.0} msg/s",
        raw.as_secs_f64(),
        raw_rate
    );

    // A light load first, while the broker is fresh.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    latency(&runtime, &bootstrap, "in3", "out3", 5_000);

    // 3. The pipeline.
    let s = settings(&bootstrap, "in", "out", "ces-drain");
    let shared = Shared::new(Arc::new(s.model.clone()));
    let metrics = shared.metrics.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let handle = runtime.spawn(async move {
        pipeline::run(s.kafka().unwrap(), s.clock, shared, None, async {
            let _ = rx.await;
        })
        .await
    });
    while metrics.events_consumed.with_label_values(&["in"]).get() < events {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ces = started.elapsed();
    let ces_rate = events as f64 / ces.as_secs_f64();
    let _ = tx.send(());
    let _ = runtime.block_on(handle);
    println!(
        "ces-stream run: {:.2}s  {:.0} msg/s",
        ces.as_secs_f64(),
        ces_rate
    );
    println!(
        "ratio: {:.2}x of the bare consumer (goal >= 0.8x)",
        ces_rate / raw_rate
    );

    // 4. Latency at half the pipeline's rate.
    latency(&runtime, &bootstrap, "in2", "out2", (ces_rate / 2.0) as u64);
    let _ = broker.kill();
    let _ = broker.wait();
}

/// Produces at `rate` for 15 s into `input` and measures the time from
/// producing an event to receiving its score_changed on `output`.
fn latency(
    runtime: &tokio::runtime::Runtime,
    bootstrap: &str,
    input: &str,
    output: &str,
    rate: u64,
) {
    let bootstrap = bootstrap.to_string();
    let s = settings(&bootstrap, input, output, &format!("ces-latency-{input}"));
    let shared = Shared::new(Arc::new(s.model.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = runtime.spawn(async move {
        pipeline::run(s.kafka().unwrap(), s.clock, shared, None, async {
            let _ = rx.await;
        })
        .await
    });
    std::thread::sleep(Duration::from_secs(2)); // group join
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (sent_at, latencies, done, bootstrap, output) = (
            Arc::clone(&sent_at),
            Arc::clone(&latencies),
            Arc::clone(&done),
            bootstrap.clone(),
            output.to_string(),
        );
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "latency-reader")
                .set("fetch.wait.max.ms", "1")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(&output, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&tpl).unwrap();
            while !done.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                    let received = Instant::now();
                    let Some(v) = m
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    else {
                        continue;
                    };
                    if v["kind"] != "score_changed" {
                        continue;
                    }
                    if let Some(id) = v["event_id"].as_str() {
                        if let Some(t) = sent_at.lock().remove(id) {
                            latencies
                                .lock()
                                .push(received.duration_since(t).as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
        })
    };
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let mut synth = Synth::new(SynthOptions {
        customers: 100_000,
        malformed: 0.0,
        segment: 0.0,
        seed: 3,
        ..SynthOptions::default()
    });
    let mut ev = SynthEvent::default();
    let started = Instant::now();
    let seconds = 15.0;
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let due = Duration::from_secs_f64(n as f64 / rate as f64);
        let elapsed = started.elapsed();
        if due > elapsed {
            std::thread::sleep((due - elapsed).min(Duration::from_millis(1)));
            continue;
        }
        synth.next(ces_stream::timestamp::now_millis(), 0.5, &mut ev);
        // The generator's native events carry "event_id":"e-<seq>".
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&ev.payload) else {
            continue;
        };
        let Some(id) = v["event_id"].as_str() else {
            continue;
        };
        sent_at.lock().insert(id.to_string(), Instant::now());
        let record = BaseRecord::to(input)
            .key(ev.key.as_bytes())
            .payload(&ev.payload[..]);
        if producer.send(record).is_err() {
            continue;
        }
        n += 1;
    }
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        println!("  (the producer could not flush: {e})");
    }
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let _ = tx.send(());
    let _ = runtime.block_on(handle);
    let mut l = latencies.lock().clone();
    l.sort_by(|a, b| a.total_cmp(b));
    println!(
        "latency at {rate} events/s ({n} events, {} score_changed measured): p50 {:.1} ms, p99 {:.1} ms (goal p99 < 50 ms)",
        l.len(),
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
}
