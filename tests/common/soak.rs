//! What the crash soaks and the broker-fault tests share: a generated
//! stream per input partition, a `ces-stream run` setup on a broker (topics,
//! a group, a config with the default model on the event clock), and the
//! comparison at the end with one uninterrupted replay per partition: the
//! state a restart restores, and every signal and dead letter on the topics
//! (nothing missing, nothing invented; duplicates counted).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use ces_stream::synth::{Synth, SynthEvent, SynthOptions};

use super::kafka::*;

pub const DAY: i64 = 86_400_000;
/// 2026-10-01T00:00:00Z
pub const START: i64 = 1_790_812_800_000;

/// A generated stream over `days` days of event time, as (key, payload).
pub fn stream(events: u64, customers: u64, days: i64, seed: u64) -> Vec<(String, String)> {
    let mut synth = Synth::new(SynthOptions {
        customers,
        seed,
        malformed: 0.002,
        segment: 0.1,
        ..SynthOptions::default()
    });
    let mut ev = SynthEvent::default();
    (0..events)
        .map(|i| {
            let t = START + days * DAY * i as i64 / events as i64;
            synth.next(t, i as f64 / events as f64, &mut ev);
            (
                ev.key.clone(),
                String::from_utf8(ev.payload.clone()).unwrap(),
            )
        })
        .collect()
}

/// A `ces-stream run` setup on a broker: topics of its own (the output's
/// partitions as the input's, dead letters in one), a group, a directory
/// for logs and local snapshots, and a config with the default model on
/// the event clock (`[input] clock = "event"`, so that a run compares with
/// a replay).
pub struct Soak {
    pub bootstrap: String,
    pub dir: tempfile::TempDir,
    pub input: String,
    pub output: String,
    pub dead: String,
    pub group: String,
    pub partitions: i32,
    pub config: PathBuf,
    /// The model's text (the default model on the event clock).
    pub model: String,
}

impl Soak {
    /// One input partition, the local store, on the shared broker.
    pub fn new(snapshot_interval: &str) -> Soak {
        Soak::build(
            1,
            &format!("interval = \"{snapshot_interval}\"\nkeep = 3\n"),
        )
    }

    /// Topics of `partitions` partitions on the shared broker, and a config
    /// with `snapshot` inside its `[snapshot]` section.
    pub fn build(partitions: i32, snapshot: &str) -> Soak {
        Soak::build_with(partitions, snapshot, |m| m)
    }

    /// As [`Soak::build`], with `edit` changing the model's text.
    pub fn build_with(partitions: i32, snapshot: &str, edit: impl Fn(String) -> String) -> Soak {
        Soak::on(&shared().bootstrap, partitions, snapshot, edit)
    }

    /// As [`Soak::build_with`], on the broker at `bootstrap`.
    pub fn on(
        bootstrap: &str,
        partitions: i32,
        snapshot: &str,
        edit: impl Fn(String) -> String,
    ) -> Soak {
        let dir = tempfile::tempdir().unwrap();
        let input = unique("clicks");
        let output = unique("signals");
        let dead = unique("dead");
        let group = unique("group");
        create_topic(bootstrap, &input, partitions);
        create_topic(bootstrap, &output, partitions);
        create_topic(bootstrap, &dead, 1);
        let model = edit(
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
            )
            .unwrap()
            .replace("[input]\n", "[input]\nclock = \"event\"\n"),
        );
        let mut soak = Soak {
            bootstrap: bootstrap.to_string(),
            dir,
            input,
            output,
            dead,
            group,
            partitions,
            config: PathBuf::new(),
            model,
        };
        let (group, output) = (soak.group.clone(), soak.output.clone());
        soak.config = soak.config_for("config", &group, &output, snapshot);
        soak
    }

    /// The soak in exactly_once mode (`[kafka] guarantee`); its instances
    /// start with [`Soak::start_as`], each with an instance id of its own.
    pub fn exactly_once(self) -> Soak {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replace("[kafka]\n", "[kafka]\nguarantee = \"exactly_once\"\n"),
        )
        .unwrap();
        self
    }

    /// Starts an instance logging to `NAME.log` with `instance_id` (kept
    /// by its restarts, so that each fences its predecessor).
    pub fn start_as(&self, name: &str, instance_id: &str) -> Instance {
        // CES_TEST_RUST_LOG: a finer filter for a run under investigation.
        let filter = std::env::var("CES_TEST_RUST_LOG");
        Instance::start_with(
            &self.config,
            &self.log(name),
            filter.as_deref().unwrap_or("info,librdkafka=warn"),
            &[("CES_KAFKA_INSTANCE_ID", instance_id)],
        )
    }

    /// Writes `NAME.toml`: the soak's model, input and dead-letter topic,
    /// with this group, output topic and `[snapshot]` section body (which
    /// may add sections after it).
    pub fn config_for(&self, name: &str, group: &str, output: &str, snapshot: &str) -> PathBuf {
        let (bootstrap, dir, input, dead) = (&self.bootstrap, &self.dir, &self.input, &self.dead);
        let kafka = format!(
            r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dead_letter_topic = "{dead}"
commit_interval = "100ms"
shutdown_timeout = "20s"

[kafka.consumer_options]
"fetch.wait.max.ms" = 10
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500

[http]
listen = "127.0.0.1:0"

[snapshot]
dir = "{}"
{snapshot}
"#,
            dir.path().join("state").display()
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, format!("{}\n{kafka}", self.model)).unwrap();
        path
    }

    pub fn start(&self, name: &str) -> Instance {
        Instance::start(&self.config, &self.log(name))
    }

    /// The log file of the instance called `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Every instance log of the soak, one after the other.
    pub fn logs(&self) -> String {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| {
                format!(
                    "== {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Runs an instance until it has caught up with the end of the input
    /// (one partition, `end` messages), then stops it with SIGTERM (which
    /// snapshots the partition).
    pub fn drain(&self, name: &str, end: usize) {
        self.drain_with(&self.config, name, end);
    }

    /// As [`Soak::drain`], with another config file.
    pub fn drain_with(&self, config: &Path, name: &str, end: usize) {
        assert_eq!(self.partitions, 1, "drain is for one partition");
        let mut instance = Instance::start(config, &self.log(name));
        self.wait_drained(config, &mut instance, &[end as i64]);
        let status = instance.terminate(Duration::from_secs(60)).expect("exits");
        assert!(status.success(), "{}", instance.log_text());
    }

    /// Waits until `instance` (running `config`) is ready (its partitions
    /// restored and past what the group had committed) and the group's
    /// committed offsets reach `ends` (an offset is committed only once the
    /// outputs of the events before it are acknowledged).
    pub fn wait_drained(&self, config: &Path, instance: &mut Instance, ends: &[i64]) {
        let settings = ces_stream::config::Settings::load(config).unwrap();
        let kafka = settings.kafka.expect("a [kafka] section");
        let (group, topic) = (kafka.group_id, &kafka.input_topics[0]);
        let bootstrap = self.bootstrap.clone();
        instance.wait_until_described(
            &format!("drained to {ends:?}"),
            Duration::from_secs(240),
            |i| {
                i.is_ready()
                    && ends.iter().enumerate().all(|(p, end)| {
                        *end == 0 || committed(&bootstrap, &group, topic, p as i32) == Some(*end)
                    })
            },
            |i| {
                let offsets: Vec<_> = (0..ends.len())
                    .map(|p| committed(&bootstrap, &group, topic, p as i32))
                    .collect();
                let log_ends: Vec<_> = (0..ends.len())
                    .map(|p| end_offset(&bootstrap, topic, p as i32))
                    .collect();
                format!(
                    "ready: {}, committed: {offsets:?}, log ends: {log_ends:?}, readyz: {:?}, consumed: {}",
                    i.is_ready(),
                    try_http_get(&i.http, "/readyz"),
                    i.metric("ces_events_consumed_total")
                )
            },
        );
    }

    pub fn inspect(&self, at: &str) -> HashMap<String, serde_json::Value> {
        self.inspect_with(&self.config, at)
    }

    pub fn inspect_with(&self, config: &Path, at: &str) -> HashMap<String, serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
            .args(["inspect", "--config"])
            .arg(config)
            .args(["--at", at])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        by_customer(&out.stdout)
    }

    /// The end of the test: what a restart restores (`inspect` at `at`)
    /// equals one uninterrupted replay per partition of `per_partition`
    /// (the messages each input partition received, in order), and the
    /// output and dead-letter topics hold every message those replays emit
    /// and none they do not. Duplicates are counted, not refused
    /// (at-least-once).
    pub fn compare_with_replays(
        &self,
        per_partition: &[Vec<(String, Option<String>)>],
        at: &str,
    ) -> Comparison {
        let restored = self.inspect(at);
        let mut replayed = HashMap::new();
        let mut outputs = Vec::new();
        let mut dead = Vec::new();
        let model = ces_stream::config::Settings::load(&self.config)
            .unwrap()
            .model;
        for (p, evs) in per_partition.iter().enumerate() {
            let sub = self.dir.path().join(format!("replay-{p}"));
            std::fs::create_dir_all(&sub).unwrap();
            let lines = as_jsonl(evs);
            replayed.extend(replay_final(&self.config, &lines, at, &sub));
            outputs.extend(
                replay_outputs(&self.config, &lines, &sub)
                    .iter()
                    .map(|l| as_published(l)),
            );
            dead.extend(evs.iter().filter_map(|(_, v)| {
                let v = v.as_ref()?;
                matches!(
                    ces_stream::event::parse(v.as_bytes(), &model, Default::default()),
                    ces_stream::event::Parsed::Invalid(_)
                )
                .then(|| v.clone())
            }));
        }
        assert_same_state(&restored, &replayed);
        let messages = read_all(&self.bootstrap, &self.output, self.partitions);
        let published: Vec<String> = messages.iter().map(as_replay_line).collect();
        let duplicates = assert_published("outputs", &outputs, &published);
        if duplicates > 0 {
            eprintln!("{}", where_duplicated(&messages, &outputs));
        }
        let dead_published: Vec<String> = read_all(&self.bootstrap, &self.dead, 1)
            .iter()
            .map(as_replay_line)
            .collect();
        let dead_duplicates = assert_published("dead letters", &dead, &dead_published);
        Comparison {
            customers: replayed.len(),
            outputs: outputs.len(),
            duplicates,
            dead_letters: dead.len(),
            dead_duplicates,
        }
    }
}

/// What [`Soak::compare_with_replays`] found, all of it correct.
#[derive(Debug)]
pub struct Comparison {
    pub customers: usize,
    /// Messages the replays emit (each one found on the output topic).
    pub outputs: usize,
    /// Messages on the output topic beyond those.
    pub duplicates: usize,
    pub dead_letters: usize,
    pub dead_duplicates: usize,
}

pub fn by_customer(jsonl: &[u8]) -> HashMap<String, serde_json::Value> {
    std::str::from_utf8(jsonl)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["customer_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// The final state of one uninterrupted replay of `events` at `at`.
pub fn replay_final(
    config: &Path,
    events: &[(String, String)],
    at: &str,
    dir: &Path,
) -> HashMap<String, serde_json::Value> {
    let input = dir.join("replay-input.jsonl");
    let text: Vec<&str> = events.iter().map(|(_, v)| v.as_str()).collect();
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let state = dir.join("replay-final.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args([
            "replay",
            "--no-progress",
            "--output",
            "/dev/null",
            "--config",
        ])
        .arg(config)
        .arg("--input")
        .arg(&input)
        .arg("--final-state")
        .arg(&state)
        .args(["--at", at])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    by_customer(&std::fs::read(&state).unwrap())
}

pub fn assert_same_state(
    restored: &HashMap<String, serde_json::Value>,
    replayed: &HashMap<String, serde_json::Value>,
) {
    assert_eq!(restored.len(), replayed.len(), "customer counts differ");
    let mut bad = Vec::new();
    for (id, r) in replayed {
        let Some(s) = restored.get(id) else {
            bad.push(format!("{id}: missing"));
            continue;
        };
        let close = |k: &str| (s[k].as_f64().unwrap() - r[k].as_f64().unwrap()).abs() <= 0.01;
        if !close("score")
            || !close("peak_score")
            || s["tier"] != r["tier"]
            || s["at_risk"] != r["at_risk"]
            || s["last_event_at"] != r["last_event_at"]
        {
            bad.push(format!("{id}: restored {s} replayed {r}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} customers differ, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
}

/// The partition the test assigns a customer to (explicitly, not through a
/// client's partitioner, so that per-partition replays know it too).
pub fn partition_of(customer: &str, partitions: u32) -> i32 {
    (crc32fast::hash(customer.as_bytes()) % partitions) as i32
}

/// A stream for the kafka-store soak: events (with retries and erasure
/// requests) per input partition, as (key, payload); an erasure request's
/// payload is `None` (a tombstone on Kafka, `{"erase": id}` in a replay).
pub fn soak_stream(
    events: u64,
    customers: u64,
    days: i64,
    seed: u64,
    partitions: i32,
) -> Vec<Vec<(String, Option<String>)>> {
    let mut synth = Synth::new(SynthOptions {
        customers,
        seed,
        malformed: 0.005,
        segment: 0.1,
        duplicates: 0.03,
        erasures: 0.002,
    });
    let mut ev = SynthEvent::default();
    let mut per_partition = vec![Vec::new(); partitions as usize];
    for i in 0..events {
        let t = START + days * DAY * i as i64 / events as i64;
        synth.next(t, i as f64 / events as f64, &mut ev);
        let tombstone = ev.erase && !ev.key.is_empty();
        let payload = (!tombstone).then(|| String::from_utf8(ev.payload.clone()).unwrap());
        let p = partition_of(&ev.key, partitions as u32);
        per_partition[p as usize].push((ev.key.clone(), payload));
    }
    per_partition
}

/// The replay input of one partition's messages.
pub fn as_jsonl(messages: &[(String, Option<String>)]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|(k, v)| {
            let line = v
                .clone()
                .unwrap_or_else(|| serde_json::json!({ "erase": k }).to_string());
            (k.clone(), line)
        })
        .collect()
}

pub type Producer = rdkafka::producer::ThreadedProducer<DeliveryCheck>;

/// Remembers the first message the broker did not take: a soak's input
/// that silently lost a message would read as ces-stream's fault (its
/// committed offsets never reaching the expected ends).
#[derive(Default)]
pub struct DeliveryCheck {
    failed: std::sync::Mutex<Option<String>>,
}

impl rdkafka::client::ClientContext for DeliveryCheck {}

impl rdkafka::producer::ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            use rdkafka::message::Message;
            let mut failed = self.failed.lock().unwrap();
            failed.get_or_insert_with(|| {
                format!(
                    "{error} (partition {}, {} bytes)",
                    message.partition(),
                    message.payload_len()
                )
            });
        }
    }
}

/// An idempotent producer: messages to one partition stay in order.
pub fn producer(bootstrap: &str) -> Producer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(DeliveryCheck::default())
        .unwrap()
}

/// Produces messages (tombstones for `None`) to one partition, in order,
/// and waits for them.
pub fn produce_messages(
    producer: &Producer,
    topic: &str,
    partition: i32,
    messages: &[(String, Option<String>)],
) {
    use rdkafka::producer::BaseRecord;
    for (k, v) in messages {
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).partition(partition).key(k.as_bytes());
        if let Some(v) = v {
            record = record.payload(v.as_bytes());
        }
        send_waiting(producer, record);
    }
    flush_sent(producer, Duration::from_secs(60));
    use rdkafka::producer::Producer as _;
    if let Some(failed) = producer.context().failed.lock().unwrap().as_ref() {
        panic!("the test's own input lost a message: {failed}");
    }
}

/// A multiset of lines.
pub fn counts<'a>(lines: impl Iterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    let mut m = HashMap::new();
    for l in lines {
        *m.entry(l.as_str()).or_default() += 1;
    }
    m
}

/// A replay output line as the output topic carries it: `customer_erased`
/// is a tombstone there, keyed by the customer, without a time.
pub fn as_published(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    if v["kind"] == "customer_erased" {
        format!("customer_erased {}", v["customer_id"].as_str().unwrap())
    } else {
        line.to_string()
    }
}

/// Every `expected` line is published at least as often (nothing
/// missing), and nothing is published that is not expected (nothing
/// invented). Returns the number of duplicates.
pub fn assert_published(what: &str, expected: &[String], published: &[String]) -> usize {
    let (want, got) = (counts(expected.iter()), counts(published.iter()));
    let missing: Vec<_> = want
        .iter()
        .filter(|(l, n)| got.get(*l).copied().unwrap_or(0) < **n)
        .map(|(l, _)| *l)
        .collect();
    let invented: Vec<_> = got.keys().filter(|l| !want.contains_key(*l)).collect();
    assert!(
        missing.is_empty() && invented.is_empty(),
        "{what}: {} missing, e.g. {:?}; {} invented, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)],
        invented.len(),
        &invented[..invented.len().min(3)]
    );
    published.len() - expected.len()
}

/// The outputs of one uninterrupted replay of `events`, in order.
pub fn replay_outputs(config: &Path, events: &[(String, String)], dir: &Path) -> Vec<String> {
    let input = dir.join("replay-outputs-input.jsonl");
    let text: Vec<&str> = events.iter().map(|(_, v)| v.as_str()).collect();
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["replay", "--no-progress", "--config"])
        .arg(config)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// An output message as the replay writes it: the JSON payload, or the
/// `customer_erased` line a tombstone stands for.
/// Where the copies of each line published more often than expected sit
/// (partition@offset), for the diagnosis of a failed exactly-once run.
pub fn where_duplicated(
    messages: &[rdkafka::message::OwnedMessage],
    expected: &[String],
) -> String {
    use rdkafka::message::Message;
    let want = counts(expected.iter());
    let mut at: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        at.entry(as_replay_line(m))
            .or_default()
            .push(format!("{}@{}", m.partition(), m.offset()));
    }
    at.iter()
        .filter(|(line, places)| places.len() > want.get(line.as_str()).copied().unwrap_or(0))
        .map(|(line, places)| format!("{places:?} {}", &line[..line.len().min(160)]))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn as_replay_line(m: &rdkafka::message::OwnedMessage) -> String {
    use rdkafka::message::Message;
    match m.payload() {
        Some(p) => String::from_utf8(p.to_vec()).unwrap(),
        None => format!("customer_erased {}", key(m)),
    }
}

/// Produces each partition's messages in `rounds` slices, a pause between
/// slices, with an idempotent producer (in order, no duplicates, also
/// across a broker restart), until all are acknowledged.
pub fn produce_in_rounds(
    bootstrap: &str,
    topic: &str,
    per_partition: &[Vec<(String, Option<String>)>],
    rounds: usize,
    pause: Duration,
) -> JoinHandle<()> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    let per_partition = per_partition.to_vec();
    std::thread::spawn(move || {
        let producer = producer(&bootstrap);
        for k in 0..rounds {
            for (p, evs) in per_partition.iter().enumerate() {
                let size = evs.len().div_ceil(rounds);
                let part = &evs[(k * size).min(evs.len())..((k + 1) * size).min(evs.len())];
                produce_messages(&producer, &topic, p as i32, part);
            }
            std::thread::sleep(pause);
        }
    })
}

pub fn ends(per_partition: &[Vec<(String, Option<String>)>]) -> Vec<i64> {
    per_partition.iter().map(|evs| evs.len() as i64).collect()
}
