//! End-to-end tests of `ces-stream run` as a process against a real broker
//! process (Apache Kafka; `CES_TEST_BROKER=tansu` for the second broker):
//! signals out, dead letters, two instances sharing a group, SIGTERM with
//! events in flight, a stop during a rebalance, erasure, retries, the
//! customer API across instances. The tests share one broker (this test
//! binary's), each with topics and a group of its own.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::kafka::*;
use rdkafka::message::Message;

const MODEL: &str = r#"
[scoring.normalization]
kind = "linear"
max = 100.0

[scoring.activities]
visit = { weight = 1.0, channel = "web" }
buy = { weight = 20.0, channel = "shop" }

# Events are scored a little after their timestamps, so scores are a hair
# below whole numbers: publish every change of about 5.
[signals]
min_delta = 4.5
"#;

struct Setup {
    broker: &'static Broker,
    input: String,
    output: String,
    dead: String,
    group: String,
    dir: tempfile::TempDir,
    partitions: i32,
}

impl Setup {
    fn new(partitions: i32) -> Setup {
        let broker = shared();
        let s = Setup {
            input: unique("clicks"),
            output: unique("signals"),
            dead: unique("dead"),
            group: unique("group"),
            dir: tempfile::tempdir().unwrap(),
            partitions,
            broker,
        };
        create_topic(&s.broker.bootstrap, &s.input, partitions);
        create_topic(&s.broker.bootstrap, &s.output, partitions);
        create_topic(&s.broker.bootstrap, &s.dead, 1);
        s
    }

    fn config(&self, extra: &str) -> std::path::PathBuf {
        let kafka = format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{}"
input_topics = ["{}"]
output_topic = "{}"
dead_letter_topic = "{}"
shutdown_timeout = "20s"
commit_interval = "200ms"

[kafka.consumer_options]
"fetch.wait.max.ms" = 10
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500

[http]
listen = "127.0.0.1:0"

[snapshot]
dir = "{}"
{extra}
"#,
            self.broker.bootstrap,
            self.group,
            self.input,
            self.output,
            self.dead,
            self.dir.path().join("state").display()
        );
        write_config(self.dir.path(), MODEL, &kafka)
    }

    fn start(&self, name: &str) -> Instance {
        let config = self.config("");
        Instance::start(&config, &self.dir.path().join(format!("{name}.log")))
    }

    fn outputs_until(
        &self,
        done: impl Fn(&[rdkafka::message::OwnedMessage]) -> bool,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        consume_until(
            &self.broker.bootstrap,
            &self.output,
            self.partitions,
            Duration::from_secs(60),
            done,
        )
    }
}

fn now_rfc3339() -> String {
    ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis()).to_string()
}

fn event(customer: &str, kind: &str) -> (String, String) {
    (
        customer.to_string(),
        serde_json::json!({"customer_id": customer, "type": kind, "timestamp": now_rfc3339()})
            .to_string(),
    )
}

/// The last score_changed score per customer.
fn last_scores(messages: &[rdkafka::message::OwnedMessage]) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for m in messages {
        if header(m, "ces-kind") == Some("score_changed") {
            let v = json(m);
            out.insert(key(m).to_string(), v["score"].as_f64().unwrap());
        }
    }
    out
}

#[test]
fn events_in_signals_out_and_bad_events_to_the_dead_letter_topic() {
    let s = Setup::new(4);
    let mut instance = s.start("a");
    instance.wait_assigned(Duration::from_secs(30));
    let mut messages = Vec::new();
    for round in 0..3 {
        for c in 0..10 {
            messages.push(event(&format!("c-{c}"), "buy"));
        }
        if round == 1 {
            messages.push(("c-x".into(), "{not json".into()));
            messages.push(("".into(), r#"{"type": "buy", "timestamp": 0}"#.into()));
        }
    }
    produce(&s.broker.bootstrap, &s.input, &messages);

    let out = s.outputs_until(|m| last_scores(m).values().filter(|&&v| v >= 59.9).count() == 10);
    let scores = last_scores(&out);
    assert_eq!(scores.len(), 10, "{scores:?}\n{}", instance.log_text());
    for (customer, score) in &scores {
        assert!((score - 60.0).abs() < 0.05, "{customer}: {score}");
    }
    for m in &out {
        let v = json(m);
        assert_eq!(v["customer_id"], key(m), "keyed by customer id");
        assert_eq!(header(m, "ces-kind"), v["kind"].as_str(), "ces-kind header");
        assert_eq!(v["schema"], "ces.v1");
    }
    // 20 -> 40 -> 60 for every customer: three score_changed each, the last
    // one crossing into somewhat_engaged.
    let changed = out
        .iter()
        .filter(|m| header(m, "ces-kind") == Some("score_changed"))
        .count();
    assert_eq!(changed, 30);

    let dead = consume_until(
        &s.broker.bootstrap,
        &s.dead,
        1,
        Duration::from_secs(30),
        |m| m.len() >= 2,
    );
    assert_eq!(dead.len(), 2, "{}", instance.log_text());
    let reasons: Vec<_> = dead
        .iter()
        .map(|m| header(m, "ces-reason").unwrap().to_string())
        .collect();
    assert!(reasons.contains(&"invalid_json".to_string()), "{reasons:?}");
    assert!(
        reasons.contains(&"missing_customer_id".to_string()),
        "{reasons:?}"
    );
    for m in &dead {
        assert_eq!(header(m, "ces-source-topic"), Some(s.input.as_str()));
        assert!(header(m, "ces-source-partition").is_some());
        assert!(header(m, "ces-source-offset")
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(header(m, "ces-detail").is_some_and(|d| !d.is_empty()));
        let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
        assert!(
            messages.iter().any(|(_, v)| v == payload),
            "original payload kept: {payload}"
        );
    }

    let status = instance
        .terminate(Duration::from_secs(30))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", instance.log_text());
}

/// Events for `customers` customers, `n` of `kind` each, interleaved.
fn rounds(customers: usize, n: usize, kind: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        for c in 0..customers {
            out.push(event(&format!("c-{c}"), kind));
        }
    }
    out
}

#[test]
fn two_instances_split_the_partitions_and_one_takes_over_from_the_other() {
    let s = Setup::new(4);
    let mut a = s.start("a");
    a.wait_assigned(Duration::from_secs(30));
    let mut b = s.start("b");
    b.wait_assigned(Duration::from_secs(60));
    // Both hold partitions: a gave some up.
    a.wait_until("a gives partitions up", Duration::from_secs(30), |a| {
        a.revocations() >= 1.0
    });

    produce(&s.broker.bootstrap, &s.input, &rounds(20, 3, "buy"));
    let out = s.outputs_until(|m| last_scores(m).values().filter(|&&v| v >= 59.9).count() == 20);
    assert_eq!(
        last_scores(&out).len(),
        20,
        "{}\n{}",
        a.log_text(),
        b.log_text()
    );

    // a leaves; b takes its partitions over, rebuilds their state from the
    // log without publishing again, and scores the next events in full.
    let before = b.assignments();
    let status = a.terminate(Duration::from_secs(30)).expect("a exits");
    assert!(status.success(), "{}", a.log_text());
    b.wait_until(
        "b takes a's partitions over",
        Duration::from_secs(60),
        |b| b.assignments() > before && b.metric("ces_assigned_partitions") == 4.0,
    );

    produce(&s.broker.bootstrap, &s.input, &rounds(20, 1, "buy"));
    let out = s.outputs_until(|m| last_scores(m).values().filter(|&&v| v >= 79.9).count() == 20);
    let scores = last_scores(&out);
    for c in 0..20 {
        let score = scores.get(&format!("c-{c}")).copied().unwrap_or(0.0);
        assert!(
            (score - 80.0).abs() < 0.05,
            "c-{c}: {score}\n{}",
            b.log_text()
        );
    }
    // Each customer's signals: 20, 40, 60, then 80; the rebuild published
    // nothing twice.
    let mut per_customer: HashMap<String, usize> = HashMap::new();
    for m in out
        .iter()
        .filter(|m| header(m, "ces-kind") == Some("score_changed"))
    {
        *per_customer.entry(key(m).to_string()).or_default() += 1;
    }
    for (c, n) in per_customer {
        assert_eq!(n, 4, "{c}");
    }
}

#[test]
fn sigterm_with_events_in_flight_loses_none() {
    let s = Setup::new(2);
    // Outputs wait up to a second in the producer before they are sent, so
    // that while events flow some are always consumed and not yet
    // acknowledged.
    let config = s.config("[kafka.producer_options]\n\"linger.ms\" = 1000\n");
    let mut a = Instance::start(&config, &s.dir.path().join("a.log"));
    a.wait_assigned(Duration::from_secs(30));
    let addr = a.http.clone();
    // Produce while the instance consumes, and stop it in the middle.
    let bootstrap = s.broker.bootstrap.clone();
    let input = s.input.clone();
    let producer = std::thread::spawn(move || {
        for chunk in rounds(200, 10, "visit").chunks(200) {
            produce(&bootstrap, &input, chunk);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // Outputs start at the fifth visit of a customer (1000 events in).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&http_get(&addr, "/metrics").1, "ces_events_consumed_total") < 1100.0 {
        assert!(std::time::Instant::now() < deadline, "{}", a.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = a
        .terminate(Duration::from_secs(30))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{}", a.log_text());
    let log = a.log_text();
    assert!(log.contains("partitions released"), "{log}");
    // Proof that the signal came with outputs in flight.
    let in_flight: u64 = log
        .split("outputs_unacknowledged=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the stop logs what is in flight");
    assert!(in_flight > 0, "nothing was in flight:\n{log}");
    producer.join().unwrap();

    let a2 = s.start("a2");
    // Ten visits each: published at 5 and at 10.
    let out = s.outputs_until(|m| last_scores(m).values().filter(|&&v| v >= 9.99).count() == 200);
    let scores = last_scores(&out);
    let missing: Vec<_> = (0..200)
        .map(|c| format!("c-{c}"))
        .filter(|c| scores.get(c).is_none_or(|&v| (v - 10.0).abs() > 0.05))
        .collect();
    assert!(
        missing.is_empty(),
        "missing {} of 200; {} outputs, e.g. {:?}\n{}\n{}",
        missing.len(),
        out.len(),
        out.first().map(json),
        a.log_text(),
        a2.log_text()
    );
}

#[test]
fn a_stop_during_a_rebalance_ends_within_shutdown_timeout() {
    // Each round: two instances with the kafka store (a restore reads the
    // changelog) own the partitions; a third joins, and while the group
    // rebalances one of the first two is stopped, events flowing all along.
    // All rounds share one group, as a deployment's restarts do: Apache
    // Kafka's group coordinator removes a leaving member from a join in
    // progress. tansu (`CES_TEST_BROKER=tansu`) sometimes leaves the group
    // stuck in its join phase then, about one round in three: on tansu
    // alone, each round gets a group of its own (the stopping member's exit
    // time, which this test is about, does not depend on the group).
    let s = Setup::new(4);
    let config = s.config("store = \"kafka\"\ninterval = \"500ms\"\n");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("shutdown_timeout = \"20s\"", "shutdown_timeout = \"5s\"")
        .replace(
            "\"heartbeat.interval.ms\" = 500",
            "\"heartbeat.interval.ms\" = 500\n\"max.poll.interval.ms\" = 10000",
        );
    let bootstrap = s.broker.bootstrap.clone();
    let input = s.input.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                produce(
                    &bootstrap,
                    &input,
                    &rounds(50, 1, if n % 2 == 0 { "visit" } else { "buy" }),
                );
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let dump_logs = || {
        for e in std::fs::read_dir(s.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                eprintln!("== {}\n{text}", e.path().display());
            }
        }
    };
    let mut worst = Duration::ZERO;
    let tansu = s.broker.flavor == common::broker::Flavor::Tansu;
    for (round, delay) in [0u64, 300, 800, 1500].into_iter().enumerate() {
        let group = if tansu {
            format!("{}-r{round}", s.group)
        } else {
            s.group.clone()
        };
        std::fs::write(&config, text.replace(&s.group, &group)).unwrap();
        let start = |name: &str| {
            Instance::start(&config, &s.dir.path().join(format!("r{round}-{name}.log")))
        };
        let mut leaving = start("a");
        let mut staying = start("b");
        for m in [&leaving, &staying] {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while m.metric("ces_assigned_partitions") == 0.0 {
                if std::time::Instant::now() > deadline {
                    dump_logs();
                    panic!("round {round}: no partition for {}", m.log.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut joiner = start("c");
        std::thread::sleep(Duration::from_millis(delay));
        let signalled = std::time::Instant::now();
        let status = leaving
            .terminate(Duration::from_secs(30))
            .expect("exits on SIGTERM");
        let took = signalled.elapsed();
        assert!(status.success(), "{}", leaving.log_text());
        assert!(
            took < Duration::from_millis(5_000 + 1_000),
            "round {round}: the stop took {took:?} with shutdown_timeout = 5s\n{}",
            leaving.log_text()
        );
        worst = worst.max(took);
        for m in [&mut staying, &mut joiner] {
            let status = m
                .terminate(Duration::from_secs(30))
                .expect("exits on SIGTERM");
            assert!(status.success(), "{}", m.log_text());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.join().unwrap();
    eprintln!("slowest stop during a rebalance: {worst:?}");
}

/// `GET /v1/customers/{id}` on an instance: the status (0 while its
/// server is not up yet).
fn customer_status(addr: &str, id: &str) -> u16 {
    try_http_get(addr, &format!("/v1/customers/{id}")).map_or(0, |(status, _)| status)
}

/// Waits until `check` holds, polling.
fn eventually(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_erasure_request_removes_the_customer_everywhere_and_for_good() {
    // A tombstone on the input (key c-1): the state goes, a
    // customer_erased tombstone goes out, the API answers 404, the request
    // is counted, and after a restart c-1 is still gone from the restored
    // state: with the kafka store (a tombstone in the changelog) and with
    // the local store (the next snapshot).
    for store in ["kafka", "local"] {
        let s = Setup::new(1);
        let config = s.config(&format!("store = \"{store}\"\ninterval = \"500ms\"\n"));
        let mut a = Instance::start(&config, &s.dir.path().join("a.log"));
        let addr = a.http.clone();
        produce(
            &s.broker.bootstrap,
            &s.input,
            &[event("c-1", "buy"), event("c-2", "buy")],
        );
        eventually("c-1 and c-2 scored", Duration::from_secs(60), || {
            customer_status(&addr, "c-1") == 200 && customer_status(&addr, "c-2") == 200
        });
        produce_tombstone(&s.broker.bootstrap, &s.input, "c-1");
        let out = s.outputs_until(|m| {
            m.iter()
                .any(|m| header(m, "ces-kind") == Some("customer_erased"))
        });
        let erased: Vec<_> = out
            .iter()
            .filter(|m| header(m, "ces-kind") == Some("customer_erased"))
            .collect();
        assert_eq!(erased.len(), 1, "{store}");
        assert_eq!(key(erased[0]), "c-1");
        assert!(erased[0].payload().is_none(), "a tombstone");
        assert_eq!(customer_status(&addr, "c-1"), 404, "{store}");
        assert_eq!(customer_status(&addr, "c-2"), 200, "{store}");
        let metrics = http_get(&addr, "/metrics").1;
        assert_eq!(metric(&metrics, "ces_erasures_total"), 1.0, "{store}");
        let status = a.terminate(Duration::from_secs(30)).expect("stops");
        assert!(status.success(), "{}", a.log_text());

        if store == "kafka" {
            // The changelog's last word on c-1 is a tombstone.
            let changelog = format!("{}-state", s.group);
            let last = read_all(&s.broker.bootstrap, &changelog, 1)
                .into_iter()
                .rfind(|m| m.key() == Some(b"c-1"))
                .expect("c-1 was in the changelog");
            assert!(
                last.payload().is_none(),
                "c-1 is not tombstoned in the changelog"
            );
        }
        // What a restart restores: c-2, not c-1.
        let inspected = std::process::Command::new(env!("CARGO_BIN_EXE_ces-stream"))
            .args(["inspect", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&inspected.stdout);
        assert!(
            inspected.status.success(),
            "{}",
            String::from_utf8_lossy(&inspected.stderr)
        );
        assert!(
            text.contains("\"c-2\"") && !text.contains("\"c-1\""),
            "{store}: {text}"
        );

        let b = Instance::start(&config, &s.dir.path().join("b.log"));
        let addr = b.http.clone();
        eventually("restored", Duration::from_secs(60), || {
            customer_status(&addr, "c-2") == 200
        });
        assert_eq!(
            customer_status(&addr, "c-1"),
            404,
            "{store} after a restart"
        );
    }
}

#[test]
fn a_retry_is_caught_across_a_restart() {
    // The remembered event ids travel with the snapshot: a producer's
    // retry that arrives after a restart is still a duplicate.
    let s = Setup::new(1);
    let config = s.config("");
    let with_id = |id: &str| {
        (
            "c-1".to_string(),
            serde_json::json!({"event_id": id, "customer_id": "c-1", "type": "buy",
                               "timestamp": now_rfc3339()})
            .to_string(),
        )
    };
    let mut a = Instance::start(&config, &s.dir.path().join("a.log"));
    let addr = a.http.clone();
    produce(&s.broker.bootstrap, &s.input, &[with_id("e-1")]);
    eventually("c-1 scored", Duration::from_secs(60), || {
        customer_status(&addr, "c-1") == 200
    });
    assert!(a
        .terminate(Duration::from_secs(30))
        .expect("stops")
        .success());

    let b = Instance::start(&config, &s.dir.path().join("b.log"));
    let addr = b.http.clone();
    produce(
        &s.broker.bootstrap,
        &s.input,
        &[with_id("e-1"), with_id("e-2")],
    );
    eventually("both consumed", Duration::from_secs(60), || {
        b.metric("ces_events_consumed_total") >= 2.0
    });
    let metrics = http_get(&addr, "/metrics").1;
    let duplicates: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("ces_events_ignored_total{reason=\"duplicate\"}"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(duplicates, 1.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "ces_events_accepted_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "ces_snapshot_restored_customers_total"),
        1.0,
        "c-1 restored from the snapshot:\n{}",
        b.log_text()
    );
}

/// The `partition` an answer names.
fn partition_field(body: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["partition"]
        .as_i64()
        .unwrap()
}

#[test]
fn any_instance_answers_for_any_customer_of_the_group() {
    let s = Setup::new(4);
    // The event clock: an answer's `at` is the partition's watermark, so
    // the owner's answer and a forwarded one are the same bytes.
    let config = s.config("[input]\nclock = \"event\"\n");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\napi_token_env = \"CES_TEST_TOKEN\"",
    );
    std::fs::write(&config, text).unwrap();
    let env = [("CES_TEST_TOKEN", "s3cret")];
    let start = |name: &str| {
        Instance::start_with(
            &config,
            &s.dir.path().join(format!("{name}.log")),
            "info,librdkafka=warn",
            &env,
        )
    };
    let auth = [("Authorization", "Bearer s3cret")];
    let mut a = start("a");
    a.wait_assigned(Duration::from_secs(30));
    let mut b = start("b");
    b.wait_assigned(Duration::from_secs(60));
    a.wait_until("a gives partitions up", Duration::from_secs(30), |a| {
        a.revocations() >= 1.0
    });
    let (addr_a, addr_b) = (a.http.clone(), b.http.clone());

    let customers: Vec<String> = (0..79).map(|c| format!("c-{c}")).collect();
    let events: Vec<(String, String)> = customers.iter().map(|c| event(c, "buy")).collect();
    produce(&s.broker.bootstrap, &s.input, &events);
    s.outputs_until(|m| last_scores(m).len() == customers.len());

    // Every customer, asked of either instance, gets the owner's answer:
    // same status, same bytes. Until the two have read each other's claims
    // a request may answer 503 (never 404): wait for that to pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut answered_by: HashMap<String, usize> = HashMap::new();
    let mut owners = HashMap::new();
    for c in &customers {
        let path = format!("/v1/customers/{c}");
        loop {
            let (sa, ha, ba) = http_get_with(&addr_a, &path, &auth);
            let (sb, hb, bb) = http_get_with(&addr_b, &path, &auth);
            assert!(
                sa != 404 && sb != 404,
                "{c}: a wrong 404: {sa} {ba} / {sb} {bb}"
            );
            if sa == 200 && sb == 200 {
                assert_eq!(ba, bb, "{c}: a and b answer differently");
                let v: serde_json::Value = serde_json::from_str(&ba).unwrap();
                assert_eq!(v["customer_id"], c.as_str());
                assert!((v["score"].as_f64().unwrap() - 20.0).abs() < 0.01, "{ba}");
                // Each answer names the instance that computed it: the same
                // one, the owner, for both.
                let owner = |h: &str| {
                    h.lines()
                        .find_map(|l| l.strip_prefix("x-ces-instance: "))
                        .map(str::to_string)
                        .unwrap()
                };
                assert_eq!(owner(&ha), owner(&hb), "{c}");
                let o = owner(&ha);
                assert!(o.ends_with(&addr_a) || o.ends_with(&addr_b), "{o}");
                *answered_by.entry(o.clone()).or_default() += 1;
                // One owner per partition.
                assert_eq!(
                    owners
                        .insert(partition_field(&ba), o.clone())
                        .unwrap_or(o.clone()),
                    o,
                    "{c}"
                );
                break;
            }
            assert!(
                [sa, sb].iter().all(|s| *s == 200 || *s == 503),
                "{c}: {sa} {ba} / {sb} {bb}"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{c} still unavailable: {sa} {ba} / {sb} {bb}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(owners.len(), 4, "every partition had customers: {owners:?}");
    // Both instances own some: half the answers were forwarded, each way.
    assert_eq!(answered_by.len(), 2, "{answered_by:?}");

    // The token travels with a forwarded request; without one, 401 before
    // any forwarding.
    assert_eq!(http_get_with(&addr_a, "/v1/customers/c-1", &[]).0, 401);
    // A customer nobody has: the owner's 404, through either instance.
    for addr in [&addr_a, &addr_b] {
        let (status, _, body) = http_get_with(addr, "/v1/customers/nobody", &auth);
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("\"partition\""), "{body}");
    }
    // A forwarded request is never forwarded again: asked of the instance
    // that does not own the customer, it answers 503.
    let c0_owner_is_a = {
        let (_, h, _) = http_get_with(&addr_a, "/v1/customers/c-0", &auth);
        h.contains(&format!("x-ces-instance: http://{addr_a}"))
    };
    let other = if c0_owner_is_a { &addr_b } else { &addr_a };
    let mut forwarded_header = auth.to_vec();
    forwarded_header.push(("X-Ces-Forwarded", "1"));
    let (status, head, _) = http_get_with(other, "/v1/customers/c-0", &forwarded_header);
    assert_eq!(status, 503);
    assert!(head.contains("retry-after: 1"), "{head}");

    // /v1/tiers: the whole group from either instance.
    for addr in [&addr_a, &addr_b] {
        let (status, _, body) = http_get_with(addr, "/v1/tiers", &auth);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["customers"], 79, "{v}");
        assert_eq!(v["complete"], true, "{v}");
        assert_eq!(v["partitions"].as_object().unwrap().len(), 4, "{v}");
        let instances = v["instances"].as_array().unwrap();
        assert_eq!(instances.len(), 2, "{v}");
        assert!(instances.iter().all(|i| i.get("error").is_none()), "{v}");
    }

    // b stops: a takes its partitions over and answers for everyone. All
    // through the stop and the rebalance, a is asked for every customer in
    // turn: no answer may be a 404 (503 while no one owns a partition or a
    // restores it), until a whole round is answered 200.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (statuses, exit) = std::thread::scope(|scope| {
        let asker = scope.spawn(|| {
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            let mut clean_rounds = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while clean_rounds == 0 || !done.load(std::sync::atomic::Ordering::SeqCst) {
                let mut clean = true;
                for c in &customers {
                    let (status, _, body) =
                        http_get_with(&addr_a, &format!("/v1/customers/{c}"), &auth);
                    assert!(status == 200 || status == 503, "{c}: {status} {body}");
                    if status == 200 {
                        assert!(body.contains(&format!("\"customer_id\":\"{c}\"")));
                    }
                    clean &= status == 200;
                    *statuses.entry(status).or_default() += 1;
                }
                if clean && done.load(std::sync::atomic::Ordering::SeqCst) {
                    clean_rounds += 1;
                }
                assert!(std::time::Instant::now() < deadline, "{statuses:?}");
            }
            statuses
        });
        let status = b.terminate(Duration::from_secs(30)).expect("b exits");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (asker.join().unwrap(), status)
    });
    assert!(exit.success(), "{}", b.log_text());
    assert!(statuses[&200] >= customers.len(), "{statuses:?}");
    eprintln!("answers during b's stop and the rebalance: {statuses:?}");
    let (_, _, body) = http_get_with(&addr_a, "/v1/tiers", &auth);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["customers"], 79, "{v}");
    assert_eq!(v["instances"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn run_without_a_config_file_scores_with_the_built_in_model() {
    let s = Setup::new(1);
    let state = s.dir.path().join("state");
    let mut instance = Instance::start_without_config(
        &s.dir.path().join("env-only.log"),
        &[
            ("CES_KAFKA_BROKERS", &s.broker.bootstrap),
            ("CES_KAFKA_GROUP_ID", &s.group),
            ("CES_KAFKA_INPUT_TOPICS", &s.input),
            ("CES_KAFKA_OUTPUT_TOPIC", &s.output),
            ("CES_KAFKA_DEAD_LETTER_TOPIC", &s.dead),
            ("CES_SNAPSHOT_DIR", state.to_str().unwrap()),
        ],
    );
    instance.wait_assigned(Duration::from_secs(30));
    assert!(
        instance.logged("built-in model"),
        "the log says which model scores:\n{}",
        instance.log_text()
    );
    // `purchase` is an activity of config/default.toml only.
    let purchase = serde_json::json!({
        "customer_id": "env-1", "type": "purchase", "timestamp": now_rfc3339()
    });
    produce(
        &s.broker.bootstrap,
        &s.input,
        &[("env-1".to_string(), purchase.to_string())],
    );
    let out = s.outputs_until(|m| !last_scores(m).is_empty());
    assert!(last_scores(&out)["env-1"] > 0.0, "{}", instance.log_text());
    let status = instance.terminate(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{}", instance.log_text());
}
