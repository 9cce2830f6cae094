//! Kafka test harness: topics, producing, consuming, offsets, and
//! `ces-stream run` processes, against a real broker process
//! ([`super::broker`]: Apache Kafka by default).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub use super::broker::{shared, Broker};

/// Client settings every test client uses.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e:?}"));
    }
}

/// Produces keyed messages and waits for their acknowledgement.
pub fn produce(bootstrap: &str, topic: &str, messages: &[(String, String)]) {
    send_all(bootstrap, topic, None, messages);
}

/// Produces keyed messages to one partition, in order (idempotent, so that
/// a retry cannot reorder them).
pub fn produce_to(bootstrap: &str, topic: &str, partition: i32, messages: &[(String, String)]) {
    send_all(bootstrap, topic, Some(partition), messages);
}

fn send_all(bootstrap: &str, topic: &str, partition: Option<i32>, messages: &[(String, String)]) {
    let mut config = client_config(bootstrap);
    // The Java clients' partitioner, which `[kafka] partitioner` expects by
    // default (librdkafka's own default is consistent_random).
    config
        .set("linger.ms", "10")
        .set("partitioner", "murmur2_random");
    if partition.is_some() {
        config.set("enable.idempotence", "true");
    }
    let producer: ThreadedProducer<DefaultProducerContext> = config.create().unwrap();
    for (k, v) in messages {
        let mut record = BaseRecord::to(topic)
            .key(k.as_bytes())
            .payload(v.as_bytes());
        if let Some(p) = partition {
            record = record.partition(p);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    std::thread::sleep(Duration::from_millis(5));
                    record = back;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// Reads a topic from the beginning of every partition until `done` says
/// so or `timeout` passes; returns what was read.
pub fn consume_until(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    done: impl Fn(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let h = m.headers()?;
    (0..h.count())
        .map(|i| h.get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().unwrap_or(b"null")).unwrap()
}

pub fn key(m: &OwnedMessage) -> &str {
    std::str::from_utf8(m.key().unwrap_or(b"")).unwrap()
}

/// A `ces-stream run` process, killed on drop if still running.
pub struct Instance {
    pub child: Child,
    pub log: PathBuf,
}

impl Instance {
    /// Starts `ces-stream run --config CONFIG`, logging to `log`.
    pub fn start(config: &Path, log: &Path) -> Instance {
        Instance::start_logging(config, log, "info,librdkafka=warn")
    }

    /// As [`Instance::start`], with `RUST_LOG` = `filter`.
    pub fn start_logging(config: &Path, log: &Path, filter: &str) -> Instance {
        Instance::start_with(config, log, filter, &[])
    }

    /// As [`Instance::start_logging`], with environment variables.
    pub fn start_with(config: &Path, log: &Path, filter: &str, env: &[(&str, &str)]) -> Instance {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", filter)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Instance {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file for `run` in `dir`: the model text plus a [kafka] section.
pub fn write_config(dir: &Path, model: &str, kafka: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, format!("{model}\n{kafka}")).unwrap();
    path
}

/// The group's committed offset of one partition, if any.
pub fn committed(bootstrap: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok()?;
    match c.elements().first()?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The end offset (high watermark) of one partition.
pub fn end_offset(bootstrap: &str, topic: &str, partition: i32) -> i64 {
    let consumer: BaseConsumer = client_config(bootstrap).create().unwrap();
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .unwrap()
        .1
}

/// Every message of `topic` that nobody writes to any more, partition by
/// partition (in offset order within each): read until nothing new comes
/// for a second. (tansu's high watermark can lag behind the last record
/// of a batch, so it is only a lower bound.)
pub fn read_all(bootstrap: &str, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let total: i64 = (0..partitions)
        .map(|p| end_offset(bootstrap, topic, p))
        .sum();
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last_new = Instant::now();
    let mut messages = Vec::new();
    while Instant::now() < deadline && (messages.len() as i64) < total
        || last_new.elapsed() < Duration::from_secs(1)
    {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            messages.push(m.detach());
            last_new = Instant::now();
        }
        assert!(Instant::now() < deadline, "could not read all of {topic}");
    }
    messages.sort_by_key(|m| (m.partition(), m.offset()));
    messages
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, &[]);
    (status, body)
}

/// A GET with extra request headers: (status, response headers in lower
/// case, body).
pub fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The sum of a metric's series (every label set) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| v.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

impl Instance {
    /// The HTTP address the instance logged it listens on.
    pub fn http_addr(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if let Some(addr) = log
                .split("listen=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                return addr.trim_matches('"').to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no HTTP address in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Produces a tombstone (a message without a value): an erasure request
/// for the customer `key` names.
pub fn produce_tombstone(bootstrap: &str, topic: &str, key: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(bootstrap).create().unwrap();
    let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(key);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}
