//! `ces-stream demo`: the whole product on one machine, no Kafka install.
//!
//! Starts an in-process Kafka-protocol broker (librdkafka's mock cluster),
//! a synthetic clickstream into it, and the real `run` pipeline against it,
//! then shows a live view: throughput, customers per tier, the latest churn
//! alerts read back from the output topic. The bootstrap address is printed
//! so that other Kafka clients can attach.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::config::Settings;
use crate::generate::{self, KafkaTarget};
use crate::kafka::error::PipelineError;
use crate::kafka::pipeline;
use crate::kafka::shared::Shared;
use crate::synth::SynthOptions;

/// The demo's model: the default one on a clock of minutes.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub rate: u64,
    pub customers: u64,
    pub partitions: i32,
    pub duration: Option<Duration>,
    /// A model to use instead of the demo one.
    pub config: Option<std::path::PathBuf>,
    /// Print a plain line per second instead of redrawing the screen.
    pub plain: bool,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the embedded broker: {0}")]
    Broker(rdkafka::error::KafkaError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("the generator failed: {0}")]
    Generator(String),
}

const INPUT: &str = "touchpoints";
const OUTPUT: &str = "ces-signals";
const DEAD: &str = "ces-dead-letters";

/// Runs the demo until `shutdown` completes or the duration passes.
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    let cluster = MockCluster::new(1).map_err(DemoError::Broker)?;
    let bootstrap = cluster.bootstrap_servers();
    for (topic, partitions) in [
        (INPUT, opts.partitions),
        (OUTPUT, opts.partitions),
        (DEAD, 1),
    ] {
        cluster
            .create_topic(topic, partitions, 1)
            .map_err(DemoError::Broker)?;
    }
    let model_text = match &opts.config {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|source| crate::config::ConfigError::Read {
                path: path.clone(),
                source,
            })?
        }
        None => DEMO_CONFIG.to_string(),
    };
    if model_text.contains("[kafka]") {
        tracing::info!("the demo replaces the config's [kafka] section with its embedded broker");
    }
    let model_text = strip_kafka(&model_text);
    let settings = Settings::from_toml(
        &format!(
            "{model_text}\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"ces-demo\"\ninput_topics = [\"{INPUT}\"]\noutput_topic = \"{OUTPUT}\"\ndead_letter_topic = \"{DEAD}\"\ncommit_interval = \"500ms\"\nshutdown_timeout = \"10s\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 6000\n\"fetch.wait.max.ms\" = 20\n"
        ),
        opts.config.as_deref().unwrap_or(Path::new("config/demo.toml")),
    )?;

    println!("ces-stream demo: embedded Kafka broker at {bootstrap}");
    println!("  input topic {INPUT}, signals on {OUTPUT}, dead letters on {DEAD}");
    println!(
        "  attach any Kafka client, e.g.: kcat -b {bootstrap} -t {OUTPUT} -C -f '%k %h %s\\n'"
    );
    println!(
        "  stop with Ctrl-C{}",
        match opts.duration {
            Some(d) => format!(" (or wait {})", humantime::format_duration(d)),
            None => String::new(),
        }
    );

    let generator = generate::spawn(
        KafkaTarget {
            brokers: bootstrap.clone(),
            topic: INPUT.into(),
            rate: opts.rate,
            events: None,
            cycle: Duration::from_secs(360),
            options: Vec::new(),
        },
        SynthOptions {
            customers: opts.customers,
            seed: 7,
            malformed: 0.002,
            segment: 0.1,
            duplicates: 0.01,
            erasures: 0.0005,
        },
    );
    let alerts = Alerts::start(&bootstrap, opts.partitions);
    let shared = Shared::new(Arc::new(settings.model.clone()));
    let view_shared = shared.clone();

    let stop_view = Arc::new(AtomicBool::new(false));
    let view = {
        let stop = Arc::clone(&stop_view);
        let sent = Arc::clone(&generator.sent);
        let alerts = alerts.clone();
        let plain = opts.plain || !std::io::stdout().is_terminal();
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || {
            view_loop(&view_shared, &sent, &alerts, &stop, plain, &bootstrap)
        })
    };

    let duration = opts.duration;
    let stop_printing = Arc::clone(&stop_view);
    let stop_all = async move {
        match duration {
            Some(d) => {
                tokio::select! {
                    () = shutdown => {},
                    () = tokio::time::sleep(d) => tracing::info!("demo duration reached"),
                }
            }
            None => shutdown.await,
        }
        // The view stops before the pipeline releases its partitions: a
        // last line counting no customers would look like lost state.
        stop_printing.store(true, Ordering::SeqCst);
    };
    let result = match settings.kafka() {
        Ok(kafka) => pipeline::run(kafka, settings.clock, shared, None, stop_all).await,
        Err(e) => Err(PipelineError::Producer(e.to_string())),
    };
    generator.stop.store(true, Ordering::SeqCst);
    stop_view.store(true, Ordering::SeqCst);
    alerts.stop.store(true, Ordering::SeqCst);
    let _ = view.join();
    let generated = generator
        .thread
        .join()
        .map_err(|_| DemoError::Generator("panicked".into()))?;
    drop(cluster);
    result?;
    generated.map_err(|e| DemoError::Generator(e.to_string()))?;
    println!("demo stopped cleanly");
    Ok(())
}

/// Removes a `[kafka...]` section from a configuration text: the demo
/// brings its own broker.
fn strip_kafka(text: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            skip = t.starts_with("[kafka");
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Churn alerts and signal counts read back from the output topic.
#[derive(Clone)]
struct Alerts {
    latest: Arc<Mutex<VecDeque<serde_json::Value>>>,
    signals: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Alerts {
    fn start(bootstrap: &str, partitions: i32) -> Alerts {
        let alerts = Alerts {
            latest: Arc::new(Mutex::new(VecDeque::new())),
            signals: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let a = alerts.clone();
        let bootstrap = bootstrap.to_string();
        std::thread::spawn(move || {
            let consumer: BaseConsumer = match ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "ces-demo-view")
                .set("enable.auto.commit", "false")
                .create()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("the demo view cannot read signals: {e}");
                    return;
                }
            };
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                let _ = tpl.add_partition_offset(OUTPUT, p, Offset::Beginning);
            }
            if let Err(e) = consumer.assign(&tpl) {
                tracing::warn!("the demo view cannot read signals: {e}");
                return;
            }
            while !a.stop.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                a.signals.fetch_add(1, Ordering::Relaxed);
                let Some(Ok(v)) = m.payload().map(serde_json::from_slice::<serde_json::Value>)
                else {
                    continue;
                };
                if v["kind"] == "churn_risk" {
                    let mut latest = a.latest.lock();
                    latest.push_front(v);
                    latest.truncate(8);
                }
            }
        });
        alerts
    }
}

fn bar(n: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((n as f64 / total as f64) * width as f64).round() as usize
    };
    format!(
        "{}{}",
        "█".repeat(filled),
        "·".repeat(width - filled.min(width))
    )
}

fn view_loop(
    shared: &Shared,
    sent: &AtomicU64,
    alerts: &Alerts,
    stop: &AtomicBool,
    plain: bool,
    bootstrap: &str,
) {
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let m = &shared.metrics;
        let now = Instant::now();
        let produced = sent.load(Ordering::Relaxed);
        let scored = m.events_accepted.get();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let in_rate = (produced - last.1) as f64 / secs;
        let scored_rate = (scored.saturating_sub(last.2)) as f64 / secs;
        last = (now, produced, scored);
        let dead: u64 = m.rejected_by_reason.iter().map(|c| c.get()).sum();
        let model = &shared.model;
        let mut tiers = vec![0u64; model.tiers.len()];
        let mut at_risk = 0;
        for p in shared.partitions.numbers() {
            if let Some(state) = shared.partitions.get(p) {
                let partition_state = state.lock();
                for (t, c) in tiers.iter_mut().zip(partition_state.engine.tier_counts()) {
                    *t += c;
                }
                at_risk += partition_state.engine.at_risk_count();
            }
        }
        let customers: u64 = tiers.iter().sum();
        if plain {
            let tiers_text: Vec<String> = model
                .tiers
                .iter()
                .zip(&tiers)
                .map(|(t, n)| format!("{}={n}", t.name))
                .collect();
            println!(
                "[{:>4}s] in {in_rate:.0}/s, scored {scored_rate:.0}/s, dead letters {dead}, customers {customers} ({}), at risk {at_risk}, signals {}",
                started.elapsed().as_secs(),
                tiers_text.join(" "),
                alerts.signals.load(Ordering::Relaxed)
            );
            continue;
        }
        let mut s = String::new();
        s.push_str("\x1b[2J\x1b[H");
        let _ = writeln!(
            s,
            "ces-stream demo · broker {bootstrap} · {}s · Ctrl-C to stop\n",
            started.elapsed().as_secs()
        );
        let _ = writeln!(s, "events in   {in_rate:>8.0}/s    scored {scored_rate:>8.0}/s    dead letters {dead:>6}    signals {:>8}", alerts.signals.load(Ordering::Relaxed));
        let _ = writeln!(
            s,
            "\ncustomers   {customers:>8}    at risk of churn {at_risk}\n"
        );
        for (t, n) in model.tiers.iter().zip(&tiers) {
            let _ = writeln!(s, "  {:<18} {:>7}  {}", t.name, n, bar(*n, customers, 40));
        }
        let _ = writeln!(s, "\nlatest churn alerts:");
        for a in alerts.latest.lock().iter() {
            let reasons: Vec<&str> = a["reasons"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {}  {:<10} score {:>6} (peak {:>6})  {:<6} {}",
                a["at"].as_str().unwrap_or("").get(11..19).unwrap_or(""),
                a["customer_id"].as_str().unwrap_or(""),
                a["score"],
                a["peak_score"],
                a["level"].as_str().unwrap_or(""),
                reasons.join(", ")
            );
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_config_is_valid_and_fast() {
        let s = crate::config::Settings::from_toml(
            super::DEMO_CONFIG,
            std::path::Path::new("demo.toml"),
        )
        .unwrap();
        assert!(s.model.half_life <= 5 * 60_000);
        assert!(s.model.signals.sweep_interval <= 10_000);
    }
}
