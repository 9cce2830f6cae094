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

pub use super::produce::send_waiting;

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

#[allow(unused_imports)] // each test binary uses part of it
pub use super::broker::{shared, Broker};

/// Client settings every test client uses.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    // Apache Kafka's default replication factor: 1 on a lone broker, 3 on
    // a cluster (tests/common/cluster.rs); tansu wants a number.
    let replication = match super::broker::Flavor::from_env() {
        super::broker::Flavor::ApacheKafka => TopicReplication::Fixed(-1),
        super::broker::Flavor::Tansu => TopicReplication::Fixed(1),
    };
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(name, partitions, replication)],
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
        send_waiting(&producer, record);
    }
    flush_sent(&producer, Duration::from_secs(60));
}

/// Waits until every message sent is acknowledged. rust-rdkafka's own
/// `flush` polls in steps of 100 ms, which a `ThreadedProducer`'s thread
/// races for the acknowledgements: each flush took 100 ms here. This asks
/// librdkafka to send at once, then watches the queue empty.
pub fn flush_sent<C: rdkafka::producer::ProducerContext>(
    producer: &ThreadedProducer<C>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let _ = producer.flush(Duration::ZERO);
    while producer.in_flight_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} messages unacknowledged after {timeout:?}",
            producer.in_flight_count()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
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

/// A `ces-stream run` process, killed on drop if still running. Its HTTP
/// address is chosen before it starts (`CES_HTTP_LISTEN`), so that tests
/// ask it for its state (`/readyz`, `/metrics`) instead of reading its log.
pub struct Instance {
    pub child: Child,
    pub log: PathBuf,
    /// `host:port` of its HTTP server.
    pub http: String,
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
        Instance::spawn(Some(config), log, filter, env)
    }

    /// `ces-stream run` without `--config`: configured by `env` alone.
    pub fn start_without_config(log: &Path, env: &[(&str, &str)]) -> Instance {
        Instance::spawn(None, log, "info,librdkafka=warn", env)
    }

    fn spawn(config: Option<&Path>, log: &Path, filter: &str, env: &[(&str, &str)]) -> Instance {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ces-stream"));
        command.arg("run");
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        // Killed with the test thread that started it, should the test
        // process die without unwinding (a kill).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // A test that needs the address beforehand passes it.
        let http = env
            .iter()
            .find(|(name, _)| *name == "CES_HTTP_LISTEN")
            .map_or_else(
                || format!("127.0.0.1:{}", super::broker::free_port()),
                |(_, listen)| listen.to_string(),
            );
        let child = command
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .env("CES_HTTP_LISTEN", &http)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Instance {
            child,
            log: log.to_path_buf(),
            http,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log contains `needle` (for what the log itself must
    /// say; waits ask the instance's state).
    pub fn logged(&self, needle: &str) -> bool {
        self.log_text().contains(needle)
    }

    /// `/metrics`, or nothing while the server is not up (or the process
    /// is stopped or paused).
    pub fn metrics_text(&self) -> String {
        try_http_get(&self.http, "/metrics").map_or(String::new(), |(_, body)| body)
    }

    /// The sum of a metric's series, 0 when it is not there (yet).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics_text(), name)
    }

    /// One series of a metric, by its exact label set (`kind="revoke"`).
    pub fn metric_with(&self, name: &str, labels: &str) -> f64 {
        metric_series(&self.metrics_text(), name, labels)
    }

    /// Assignments taken (`ces_rebalances_total{kind="assign"}`).
    pub fn assignments(&self) -> f64 {
        self.metric_with("ces_rebalances_total", "kind=\"assign\"")
    }

    /// Revocations gone through (`ces_rebalances_total{kind="revoke"}`).
    pub fn revocations(&self) -> f64 {
        self.metric_with("ces_rebalances_total", "kind=\"revoke\"")
    }

    /// Assignments lost with the group session
    /// (`ces_rebalances_total{kind="lost"}`).
    pub fn losses(&self) -> f64 {
        self.metric_with("ces_rebalances_total", "kind=\"lost\"")
    }

    /// `/readyz` answers 200: partitions assigned, restored, caught up.
    pub fn is_ready(&self) -> bool {
        try_http_get(&self.http, "/readyz").is_some_and(|(status, _)| status == 200)
    }

    /// Waits until `check` holds for this instance; panics with its log
    /// (and `what`) otherwise, or when the process exits first.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, check: impl Fn(&Instance) -> bool) {
        self.wait_until_described(what, timeout, check, |_| String::new());
    }

    /// As [`Instance::wait_until`]; on a timeout, the panic ends with
    /// `describe`'s account of the state the wait was watching (after the
    /// log, so that a truncated CI log still shows it).
    pub fn wait_until_described(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Instance) -> bool,
        describe: impl Fn(&Instance) -> String,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{}\nexited ({status}) before {what}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{}\nnot within {timeout:?}: {what}\n{}",
                self.log_text(),
                describe(self)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the instance owns partitions.
    pub fn wait_assigned(&mut self, timeout: Duration) {
        self.wait_until("partitions assigned", timeout, |i| {
            i.metric("ces_assigned_partitions") > 0.0
        });
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_until("ready", timeout, Instance::is_ready);
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
/// partition (in offset order within each): read until the consumer's
/// position reaches each partition's end offset, read first. (On tansu,
/// whose high watermark can lag behind the last record of a batch: until
/// nothing new comes for a second.)
pub fn read_all(bootstrap: &str, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let ends: Vec<i64> = (0..partitions)
        .map(|p| end_offset(bootstrap, topic, p))
        .collect();
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
    let tansu = super::broker::Flavor::from_env() == super::broker::Flavor::Tansu;
    let at_the_end = |consumer: &BaseConsumer| {
        let Ok(positions) = consumer.position() else {
            return false;
        };
        ends.iter().enumerate().all(|(p, end)| {
            *end == 0
                || matches!(
                    positions.find_partition(topic, p as i32).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *end
                )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last_new = Instant::now();
    let mut messages = Vec::new();
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            messages.push(m.detach());
            last_new = Instant::now();
        }
        let done = if tansu {
            messages.len() as i64 >= ends.iter().sum::<i64>()
                && last_new.elapsed() > Duration::from_secs(1)
        } else {
            at_the_end(&consumer)
        };
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "could not read all of {topic}");
    }
    messages.sort_by_key(|m| (m.partition(), m.offset()));
    messages
}

/// A GET that may find nobody listening (yet), or no answer within 5 s
/// (a stopped process): `None` then.
pub fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let (status, _, body) = request(addr, path, &[], Duration::from_secs(5)).ok()?;
    (status != 0).then_some((status, body))
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, &[]);
    (status, body)
}

/// A GET with extra request headers: (status, response headers in lower
/// case, body).
pub fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    request(addr, path, headers, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// A GET; status 0 when the answer is not HTTP.
fn request(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// One series of a metric in Prometheus text, by its exact label set
/// (`kind="revoke"`); 0 when absent.
pub fn metric_series(text: &str, name: &str, labels: &str) -> f64 {
    let series = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
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

/// Produces a tombstone (a message without a value): an erasure request
/// for the customer `key` names.
pub fn produce_tombstone(bootstrap: &str, topic: &str, key: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(bootstrap).create().unwrap();
    let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(key);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    flush_sent(&producer, Duration::from_secs(30));
}
