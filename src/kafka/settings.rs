//! The validated `[kafka]` section, and the librdkafka client configurations
//! built from it.
//!
//! Users may pass any librdkafka property through `[kafka.options]` (both
//! clients), `[kafka.consumer_options]` or `[kafka.producer_options]`:
//! security, SASL, TLS, compression, timeouts. Properties whose value
//! ces-stream's guarantees depend on are refused with the reason.

use std::time::Duration;

use indexmap::IndexMap;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::config_blocks::{check, HumanDuration, InvalidSetting, OptionValue};
use crate::kafka::partitioner::Partitioner;
use serde::{Deserialize, Serialize};

/// Properties ces-stream sets itself, and why a user may not.
const OWNED: [(&str, &str); 9] = [
    ("bootstrap.servers", "set it with kafka.brokers"),
    ("metadata.broker.list", "set it with kafka.brokers"),
    ("group.id", "set it with kafka.group_id"),
    (
        "enable.auto.commit",
        "ces-stream commits an offset only once every output of the events before it is acknowledged",
    ),
    (
        "enable.auto.offset.store",
        "ces-stream commits an offset only once every output of the events before it is acknowledged",
    ),
    (
        "enable.idempotence",
        "the producer is always idempotent, so that retries never reorder or duplicate within a partition",
    ),
    (
        "transactional.id",
        "in exactly_once mode ces-stream gives each worker its own (group, instance_id, worker)",
    ),
    (
        "partition.assignment.strategy",
        "ces-stream picks the assignor that keeps each customer's partition together",
    ),
    ("group.protocol", "ces-stream uses the classic consumer group protocol"),
];

/// `[kafka]`: where `ces-stream run` reads and writes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap servers; default `localhost:9092`. Env: `CES_KAFKA_BROKERS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Consumer group; default `ces-stream`. Env: `CES_KAFKA_GROUP_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Topics to read; a name starting with `^` is a regex subscription.
    /// Required. Env: `CES_KAFKA_INPUT_TOPICS` (comma-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_topics: Option<Vec<String>>,
    /// Default `ces-signals`. Env: `CES_KAFKA_OUTPUT_TOPIC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    /// Default `ces-dead-letters`. Env: `CES_KAFKA_DEAD_LETTER_TOPIC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// How long a shutdown may take to flush and commit; default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// How often acknowledged offsets are committed; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_interval: Option<HumanDuration>,
    /// Worker threads the partitions are spread over; default: the number
    /// of cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<i64>,
    /// The partitioner of the producers that write the input, by
    /// librdkafka's name: how any instance finds a customer's partition.
    /// Default `murmur2_random` (the Java clients' and Kafka Streams').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitioner: Option<Partitioner>,
    /// `at_least_once` (the default) or `exactly_once` (Kafka
    /// transactions). Env: `CES_KAFKA_GUARANTEE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<String>,
    /// This instance's name in its group, unique among the group's live
    /// instances and kept across restarts: part of each worker's
    /// `transactional.id` in exactly_once mode. Default: the host name (in
    /// Kubernetes, the pod's). Env: `CES_KAFKA_INSTANCE_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// librdkafka properties for both the consumer and the producer.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub options: IndexMap<String, OptionValue>,
    /// librdkafka properties for the consumer only.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub consumer_options: IndexMap<String, OptionValue>,
    /// librdkafka properties for the producer only.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub producer_options: IndexMap<String, OptionValue>,
}

/// What reaches the output and dead-letter topics when a process crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Guarantee {
    /// Every output at least once: a crash can publish the outputs of the
    /// events after the last commit again. No transactions.
    #[default]
    AtLeastOnce,
    /// Every output exactly once to `read_committed` consumers: outputs,
    /// dead letters, changelog records and input offsets of each worker
    /// go in one Kafka transaction, committed every `commit_interval`.
    ExactlyOnce,
}

impl Guarantee {
    pub fn name(self) -> &'static str {
        match self {
            Guarantee::AtLeastOnce => "at_least_once",
            Guarantee::ExactlyOnce => "exactly_once",
        }
    }

    fn parse(text: &str) -> Option<Guarantee> {
        [Guarantee::AtLeastOnce, Guarantee::ExactlyOnce]
            .into_iter()
            .find(|g| g.name() == text)
    }
}

/// librdkafka's `transaction.timeout.ms` for ces-stream's transactions
/// unless set: a crashed instance's open transaction holds back
/// `read_committed` readers until it is aborted, at once when the instance
/// comes back (same `instance_id`), else after this long. Kafka Streams
/// uses 10 s too.
pub const DEFAULT_TRANSACTION_TIMEOUT_MS: &str = "10000";

/// Validated `[kafka]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub output_topic: String,
    pub dead_letter_topic: String,
    pub shutdown_timeout: Duration,
    pub commit_interval: Duration,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// The input producers' partitioner.
    pub partitioner: Partitioner,
    pub guarantee: Guarantee,
    /// This instance's name in its group (see [`RawKafka::instance_id`]).
    pub instance_id: String,
    pub options: Vec<(String, String)>,
    pub consumer_options: Vec<(String, String)>,
    pub producer_options: Vec<(String, String)>,
}

fn err(key: String, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        key,
        reason: reason.into(),
    }
}

/// This machine's host name (in Kubernetes, the pod's name): `$HOSTNAME`,
/// else the kernel's, else `localhost`.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_string())
}

/// What secret values are shown as, wherever the configuration is shown.
pub const MASK: &str = "********";

/// Whether a librdkafka property holds a secret, to be masked wherever
/// the configuration is shown: passwords, SASL secrets and JAAS texts,
/// OAuth client secrets and configs, private keys inline.
pub fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "oauthbearer.config"]
        .iter()
        .any(|word| name.contains(word))
        || name == "ssl.key.pem"
        || name == "ssl_key"
}

/// The options of one `[kafka.*options]` table, each checked by librdkafka.
fn options_of(
    section: &str,
    raw: &IndexMap<String, OptionValue>,
) -> Result<Vec<(String, String)>, InvalidSetting> {
    let mut out = Vec::with_capacity(raw.len());
    for (k, v) in raw {
        let key = format!("kafka.{section}.{}", crate::model::quote_key(k));
        if let Some((_, why)) = OWNED.iter().find(|(name, _)| name == k) {
            return Err(err(key, format!("cannot be set: {why}")));
        }
        // Let librdkafka check the name and the value now, not at start-up
        // of a client after events were read.
        let value = v.to_string();
        let mut probe = ClientConfig::new();
        probe.set(k, &value);
        if let Err(e) = probe.create_native_config() {
            // librdkafka's message repeats the value: never a secret's.
            let reason = match e {
                KafkaError::ClientConfig(_, description, _, _) => description,
                other => other.to_string(),
            };
            let reason = if is_secret_option(k) && !value.is_empty() {
                reason.replace(&value, MASK)
            } else {
                reason
            };
            return Err(err(key, reason));
        }
        out.push((k.clone(), value));
    }
    Ok(out)
}

/// The producer's `linger.ms` unless the user sets one: how long outputs
/// wait to fill a batch. librdkafka's 5 ms made small batches under load,
/// each with its own request and delivery report: `run` spent 1.25-1.35x
/// the CPU per event it spends with 30 ms, and 1.13x what it spends with
/// 25 ms (bench_kafka A/B, 1M events, 3 pairs a set); 25 ms keeps an idle
/// stream's outputs well inside the 50 ms latency goal. (Kafka Streams
/// uses 100 ms.)
pub const DEFAULT_LINGER_MS: &str = "25";

/// librdkafka's `heartbeat.interval.ms` default, and the share of
/// `session.timeout.ms` a heartbeat interval should stay within (Kafka's
/// advice: a third, so that two heartbeats can be missed).
const DEFAULT_HEARTBEAT_MS: u64 = 3_000;

/// The consumer's value of `name`: the consumer options win over the common
/// ones.
fn consumer_option<'a>(
    options: &'a [(String, String)],
    consumer_options: &'a [(String, String)],
    name: &str,
) -> Option<&'a str> {
    options
        .iter()
        .chain(consumer_options)
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A heartbeat interval as long as the session never keeps the group: the
/// Java client refuses it too.
fn check_heartbeat(
    options: &[(String, String)],
    consumer_options: &[(String, String)],
) -> Result<(), InvalidSetting> {
    let ms = |name| {
        consumer_option(options, consumer_options, name)?
            .parse::<u64>()
            .ok()
    };
    if let (Some(session), Some(heartbeat)) =
        (ms("session.timeout.ms"), ms("heartbeat.interval.ms"))
    {
        check(
            "kafka.consumer_options.\"heartbeat.interval.ms\"",
            heartbeat < session,
            &format!(
                "must be below session.timeout.ms ({session}), at most a third of it: the group session would expire between heartbeats"
            ),
        )?;
    }
    Ok(())
}

impl KafkaSettings {
    pub(crate) fn from_raw(raw: &RawKafka) -> Result<KafkaSettings, InvalidSetting> {
        let brokers = raw
            .brokers
            .clone()
            .unwrap_or_else(|| "localhost:9092".into());
        check(
            "kafka.brokers",
            !brokers.trim().is_empty(),
            "cannot be empty",
        )?;
        let group_id = raw.group_id.clone().unwrap_or_else(|| "ces-stream".into());
        check(
            "kafka.group_id",
            !group_id.trim().is_empty(),
            "cannot be empty",
        )?;
        let input_topics = raw.input_topics.clone().unwrap_or_default();
        check(
            "kafka.input_topics",
            !input_topics.is_empty(),
            "at least one input topic is required (or set CES_KAFKA_INPUT_TOPICS)",
        )?;
        for (i, t) in input_topics.iter().enumerate() {
            check(
                &format!("kafka.input_topics[{i}]"),
                !t.trim().is_empty(),
                "topic names cannot be empty",
            )?;
        }
        let output_topic = raw
            .output_topic
            .clone()
            .unwrap_or_else(|| "ces-signals".into());
        let dead_letter_topic = raw
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| "ces-dead-letters".into());
        for (key, topic) in [
            ("kafka.output_topic", &output_topic),
            ("kafka.dead_letter_topic", &dead_letter_topic),
        ] {
            check(key, !topic.trim().is_empty(), "cannot be empty")?;
            check(
                key,
                !input_topics.contains(topic),
                &format!(
                    "\"{topic}\" is also an input topic: ces-stream would read its own output"
                ),
            )?;
        }
        let options = options_of("options", &raw.options)?;
        let consumer_options = options_of("consumer_options", &raw.consumer_options)?;
        check_heartbeat(&options, &consumer_options)?;
        let guarantee = match raw.guarantee.as_deref() {
            None => Guarantee::AtLeastOnce,
            Some(text) => Guarantee::parse(text.trim()).ok_or_else(|| {
                err(
                    "kafka.guarantee".into(),
                    format!("\"{text}\": expected \"at_least_once\" or \"exactly_once\""),
                )
            })?,
        };
        if guarantee == Guarantee::ExactlyOnce {
            if let Some(level) = consumer_option(&options, &consumer_options, "isolation.level") {
                check(
                    "kafka.consumer_options.\"isolation.level\"",
                    level == "read_committed",
                    "exactly_once reads the input read_committed: an aborted transaction's records are never input",
                )?;
            }
        }
        let instance_id = raw.instance_id.clone().unwrap_or_else(host_name);
        check(
            "kafka.instance_id",
            !instance_id.trim().is_empty(),
            "cannot be empty",
        )?;
        let duration = |key: &str, d: Option<HumanDuration>, default: u64| {
            let d = d.map_or(Duration::from_secs(default), |d| d.0);
            if d.is_zero() {
                Err(err(key.into(), "must be positive"))
            } else {
                Ok(d)
            }
        };
        Ok(KafkaSettings {
            brokers,
            group_id,
            input_topics,
            output_topic,
            dead_letter_topic,
            shutdown_timeout: duration("kafka.shutdown_timeout", raw.shutdown_timeout, 30)?,
            // Each commit ends a transaction in exactly_once mode, and
            // outputs become visible then: 100 ms, as Kafka Streams.
            commit_interval: match (raw.commit_interval, guarantee) {
                (None, Guarantee::ExactlyOnce) => Duration::from_millis(100),
                (d, _) => duration("kafka.commit_interval", d, 1)?,
            },
            workers: match raw.workers {
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) => {
                    check(
                        "kafka.workers",
                        (1..=256).contains(&n),
                        "must be between 1 and 256",
                    )?;
                    n as usize
                }
            },
            partitioner: raw.partitioner.unwrap_or_default(),
            guarantee,
            instance_id,
            options,
            consumer_options,
            producer_options: options_of("producer_options", &raw.producer_options)?,
        })
    }

    pub(crate) fn to_raw(&self) -> RawKafka {
        let table = |v: &[(String, String)]| {
            v.iter()
                .map(|(k, v)| (k.clone(), OptionValue::Text(v.clone())))
                .collect()
        };
        RawKafka {
            brokers: Some(self.brokers.clone()),
            group_id: Some(self.group_id.clone()),
            input_topics: Some(self.input_topics.clone()),
            output_topic: Some(self.output_topic.clone()),
            dead_letter_topic: Some(self.dead_letter_topic.clone()),
            shutdown_timeout: Some(HumanDuration(self.shutdown_timeout)),
            commit_interval: Some(HumanDuration(self.commit_interval)),
            workers: Some(self.workers as i64),
            partitioner: Some(self.partitioner),
            guarantee: Some(self.guarantee.name().to_string()),
            instance_id: Some(self.instance_id.clone()),
            options: table(&self.options),
            consumer_options: table(&self.consumer_options),
            producer_options: table(&self.producer_options),
        }
    }

    /// The brokers and the options of every client (`[kafka.options]`).
    pub fn common_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// Whether the subscription may cover several topics. Their partitions
    /// with the same number must then be assigned together, which only the
    /// range assignor guarantees; a single topic uses cooperative-sticky.
    pub fn several_topics(&self) -> bool {
        self.input_topics.len() > 1 || self.input_topics.iter().any(|t| t.starts_with('^'))
    }

    pub fn assignment_strategy(&self) -> &'static str {
        if self.several_topics() {
            "range"
        } else {
            "cooperative-sticky"
        }
    }

    /// The consumer's configuration: ces-stream's settings, then the user's.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("partition.assignment.strategy", self.assignment_strategy())
            // To log when a partition has caught up with its log.
            .set("enable.partition.eof", "true")
            // librdkafka's default, said: exactly_once depends on it (an
            // aborted transaction's records are never input).
            .set("isolation.level", "read_committed")
            // Lag and round-trip times for the metrics.
            .set("statistics.interval.ms", "5000")
            // Defaults a user may override:
            .set("auto.offset.reset", "earliest")
            // Fetch responses sooner than librdkafka's 500 ms default: the
            // end-to-end latency goal is tens of milliseconds.
            .set("fetch.wait.max.ms", "100");
        for (k, v) in self.options.iter().chain(&self.consumer_options) {
            c.set(k, v);
        }
        // A shorter session than librdkafka's 45 s with its 3 s heartbeat
        // leaves too few heartbeats per session (6 s: two); a lost session
        // drops the partitions. A third of the session, unless set.
        let option = |name| consumer_option(&self.options, &self.consumer_options, name);
        if option("heartbeat.interval.ms").is_none() {
            if let Some(session) = option("session.timeout.ms").and_then(|v| v.parse::<u64>().ok())
            {
                let heartbeat = (session / 3).clamp(1, DEFAULT_HEARTBEAT_MS);
                c.set("heartbeat.interval.ms", heartbeat.to_string());
            }
        }
        c
    }

    /// Whether outputs go out in transactions.
    pub fn exactly_once(&self) -> bool {
        self.guarantee == Guarantee::ExactlyOnce
    }

    /// The `transactional.id` of worker `worker` (exactly_once): stable
    /// across restarts of this instance, so that a restarted instance fences
    /// its previous incarnation and aborts its open transactions at once.
    pub fn transactional_id(&self, worker: usize) -> String {
        format!("{}-{}-{worker}", self.group_id, self.instance_id)
    }

    /// A worker's transactional producer (exactly_once): the producer's
    /// configuration with its `transactional.id`.
    pub fn transactional_producer_config(&self, worker: usize) -> ClientConfig {
        let mut c = self.producer_config();
        c.set("transactional.id", self.transactional_id(worker));
        if c.get("transaction.timeout.ms").is_none() {
            c.set("transaction.timeout.ms", DEFAULT_TRANSACTION_TIMEOUT_MS);
        }
        c
    }

    /// The producer's configuration: idempotent, then the user's options.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", DEFAULT_LINGER_MS)
            .set("statistics.interval.ms", "5000");
        for (k, v) in self.options.iter().chain(&self.producer_options) {
            c.set(k, v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::is_secret_option;

    #[test]
    fn secret_options_are_recognised() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.jaas.config",
            "ssl.key.pem",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_option(name), "{name}");
        }
        for name in [
            "sasl.username",
            "ssl.ca.location",
            "security.protocol",
            "ssl.certificate.pem",
        ] {
            assert!(!is_secret_option(name), "{name}");
        }
    }

    use crate::config::Settings;
    use std::path::Path;

    #[test]
    fn a_refused_secret_option_does_not_show_its_value() {
        // This build has no OAuth/OIDC: librdkafka refuses the property and
        // its message repeats the value.
        let e = load(
            "[kafka]\nbrokers = \"b\"\ninput_topics = [\"t\"]\n[kafka.options]\n\"sasl.oauthbearer.client.secret\" = \"oauth-secret-value\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("sasl.oauthbearer.client.secret"), "{e}");
        assert!(!e.contains("oauth-secret-value"), "{e}");
    }

    const MODEL: &str = "[scoring.activities]\npage_view = { weight = 1.0 }\n";

    fn load(kafka: &str, env: &[(&str, &str)]) -> Result<Settings, String> {
        let text = format!("{MODEL}{kafka}");
        Settings::from_toml_with_env(&text, Path::new("t.toml"), |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_passthrough() {
        let s = load(
            "[kafka]\ninput_topics = [\"clicks\"]\n[kafka.options]\n\"security.protocol\" = \"plaintext\"\n\"fetch.wait.max.ms\" = 10\n",
            &[],
        )
        .unwrap();
        let k = s.kafka.unwrap();
        assert_eq!(k.brokers, "localhost:9092");
        assert_eq!(k.group_id, "ces-stream");
        assert_eq!(k.output_topic, "ces-signals");
        assert_eq!(k.dead_letter_topic, "ces-dead-letters");
        assert_eq!(k.assignment_strategy(), "cooperative-sticky");
        let c = k.consumer_config();
        assert_eq!(c.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        let p = k.producer_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("security.protocol"), Some("plaintext"));
    }

    #[test]
    fn a_short_session_gets_a_heartbeat_a_third_of_it() {
        let consumer = |options: &str| {
            load(
                &format!(
                    "[kafka]\ninput_topics = [\"clicks\"]\n[kafka.consumer_options]\n{options}"
                ),
                &[],
            )
            .map(|s| s.kafka.unwrap().consumer_config())
        };
        let c = consumer("\"session.timeout.ms\" = 6000\n").unwrap();
        assert_eq!(c.get("heartbeat.interval.ms"), Some("2000"));
        // Long sessions keep librdkafka's 3 s; a heartbeat set stays.
        let c = consumer("\"session.timeout.ms\" = 60000\n").unwrap();
        assert_eq!(c.get("heartbeat.interval.ms"), Some("3000"));
        let c =
            consumer("\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 500\n").unwrap();
        assert_eq!(c.get("heartbeat.interval.ms"), Some("500"));
        let c = consumer("").unwrap();
        assert_eq!(c.get("heartbeat.interval.ms"), None);
        // One that outlasts the session is refused, with its key.
        let e = consumer("\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 6000\n")
            .unwrap_err();
        assert!(
            e.contains("kafka.consumer_options.\"heartbeat.interval.ms\"")
                && e.contains("session.timeout.ms (6000)"),
            "{e}"
        );
    }

    #[test]
    fn several_topics_use_the_range_assignor() {
        let s = load("[kafka]\ninput_topics = [\"a\", \"b\"]\n", &[]).unwrap();
        assert_eq!(s.kafka.unwrap().assignment_strategy(), "range");
        let s = load("[kafka]\ninput_topics = [\"^clicks-.*\"]\n", &[]).unwrap();
        assert_eq!(s.kafka.unwrap().assignment_strategy(), "range");
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load(
            "[kafka]\nbrokers = \"file:9092\"\ninput_topics = [\"a\"]\n",
            &[
                ("CES_KAFKA_BROKERS", "env:9092"),
                ("CES_KAFKA_INPUT_TOPICS", "x, y"),
                ("CES_KAFKA_GROUP_ID", "g2"),
            ],
        )
        .unwrap();
        let k = s.kafka.unwrap();
        assert_eq!(k.brokers, "env:9092");
        assert_eq!(k.input_topics, ["x", "y"]);
        assert_eq!(k.group_id, "g2");
        // The environment alone is enough.
        let s = load("", &[("CES_KAFKA_INPUT_TOPICS", "clicks")]).unwrap();
        assert_eq!(s.kafka.unwrap().input_topics, ["clicks"]);
    }

    #[test]
    fn every_environment_variable_reaches_its_own_key() {
        use super::KafkaSettings;
        // Each variable with a value no other key has, and where the value
        // must land; a variable the table lists and this test does not
        // fails it, so that the two stay together.
        type Field = fn(&KafkaSettings) -> String;
        let cases: [(&str, &str, Field); 7] = [
            ("CES_KAFKA_BROKERS", "b:1", |k| k.brokers.clone()),
            ("CES_KAFKA_GROUP_ID", "g-env", |k| k.group_id.clone()),
            ("CES_KAFKA_INPUT_TOPICS", "in-env", |k| {
                k.input_topics.join(",")
            }),
            ("CES_KAFKA_OUTPUT_TOPIC", "out-env", |k| {
                k.output_topic.clone()
            }),
            ("CES_KAFKA_DEAD_LETTER_TOPIC", "dead-env", |k| {
                k.dead_letter_topic.clone()
            }),
            ("CES_KAFKA_GUARANTEE", "exactly_once", |k| {
                k.guarantee.name().to_string()
            }),
            ("CES_KAFKA_INSTANCE_ID", "pod-7", |k| k.instance_id.clone()),
        ];
        let listed: Vec<&str> = crate::config::KAFKA_ENV.iter().map(|(v, _)| *v).collect();
        let tested: Vec<&str> = cases.iter().map(|(v, _, _)| *v).collect();
        assert_eq!(listed, tested);
        for (var, value, field) in cases {
            let base = load("[kafka]\ninput_topics = [\"a\"]\n", &[]).unwrap();
            let set = load("[kafka]\ninput_topics = [\"a\"]\n", &[(var, value)]).unwrap();
            let (base, set) = (base.kafka.unwrap(), set.kafka.unwrap());
            assert_eq!(field(&set), value, "{var}");
            // Every other key is as without the variable.
            for (other, _, other_field) in cases.iter().filter(|(o, _, _)| *o != var) {
                assert_eq!(
                    other_field(&set),
                    other_field(&base),
                    "{var} changed {other}"
                );
            }
        }
    }

    #[test]
    fn exactly_once_is_configured_per_worker() {
        let s = load(
            "[kafka]\ninput_topics = [\"a\"]\ngroup_id = \"g\"\nguarantee = \"exactly_once\"\ninstance_id = \"pod-1\"\n",
            &[],
        )
        .unwrap();
        let k = s.kafka.unwrap();
        assert!(k.exactly_once());
        // Commits end transactions: 100 ms unless set.
        assert_eq!(k.commit_interval, std::time::Duration::from_millis(100));
        let p = k.transactional_producer_config(3);
        assert_eq!(p.get("transactional.id"), Some("g-pod-1-3"));
        assert_eq!(p.get("transaction.timeout.ms"), Some("10000"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(
            k.consumer_config().get("isolation.level"),
            Some("read_committed")
        );
        // at_least_once by default, with its 1 s commits.
        let k = load("[kafka]\ninput_topics = [\"a\"]\n", &[])
            .unwrap()
            .kafka
            .unwrap();
        assert!(!k.exactly_once());
        assert_eq!(k.commit_interval, std::time::Duration::from_secs(1));
        // Bad values are refused with their key.
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\nguarantee = \"exactly-once\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("kafka.guarantee") && e.contains("exactly_once"),
            "{e}"
        );
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\nguarantee = \"exactly_once\"\n[kafka.consumer_options]\n\"isolation.level\" = \"read_uncommitted\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("isolation.level"), "{e}");
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\ninstance_id = \" \"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("kafka.instance_id"), "{e}");
    }

    #[test]
    fn owned_and_unknown_options_are_refused() {
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\n[kafka.options]\n\"enable.auto.commit\" = true\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("kafka.options.\"enable.auto.commit\"") && e.contains("cannot be set"),
            "{e}"
        );
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\n[kafka.consumer_options]\n\"group.id\" = \"x\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("kafka.group_id"), "{e}");
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\n[kafka.options]\n\"no.such.property\" = 1\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("no.such.property"), "{e}");
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\n[kafka.producer_options]\n\"compression.type\" = \"bogus\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("compression.type"), "{e}");
    }

    #[test]
    fn topics_are_checked() {
        let e = load("[kafka]\nbrokers = \"b:1\"\n", &[]).unwrap_err();
        assert!(
            e.contains("kafka.input_topics") && e.contains("at least one"),
            "{e}"
        );
        let e = load(
            "[kafka]\ninput_topics = [\"a\"]\noutput_topic = \"a\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("kafka.output_topic") && e.contains("input topic"),
            "{e}"
        );
    }
}
