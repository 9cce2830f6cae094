//! Fast in-process tests of the pipeline on librdkafka's mock cluster:
//! shutdown driven by a future, rebalances between two pipelines of one
//! group, the demo command. (Behaviour across processes is tested against a
//! real broker in tests/kafka_broker.rs.)

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ces_stream::config::Settings;
use ces_stream::kafka::pipeline;
use ces_stream::kafka::shared::Shared;
use common::kafka::*;
use rdkafka::mocking::MockCluster;

const MODEL: &str = r#"
[scoring.normalization]
kind = "linear"
max = 100.0
[scoring.activities]
buy = { weight = 20.0 }
[signals]
min_delta = 4.5
"#;

fn settings(bootstrap: &str, input: &str, output: &str, dead: &str, group: &str) -> Settings {
    Settings::from_toml(
        &format!(
            "{MODEL}\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"{group}\"\ninput_topics = [\"{input}\"]\noutput_topic = \"{output}\"\ndead_letter_topic = \"{dead}\"\ncommit_interval = \"100ms\"\nshutdown_timeout = \"10s\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 3000\n\"heartbeat.interval.ms\" = 300\n\"fetch.wait.max.ms\" = 10\n"
        ),
        std::path::Path::new("test.toml"),
    )
    .unwrap()
}

fn buys(customers: usize, rounds: usize) -> Vec<(String, String)> {
    let now = ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis());
    let mut v = Vec::new();
    for _ in 0..rounds {
        for c in 0..customers {
            let id = format!("m-{c}");
            v.push((
                id.clone(),
                serde_json::json!({"customer_id": id, "type": "buy", "timestamp": now.to_string()})
                    .to_string(),
            ));
        }
    }
    v
}

fn last_scores(messages: &[rdkafka::message::OwnedMessage]) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for m in messages {
        let v = json(m);
        if v["kind"] == "score_changed" {
            out.insert(key(m).to_string(), v["score"].as_f64().unwrap());
        }
    }
    out
}

#[test]
fn a_pipeline_stops_cleanly_when_its_shutdown_future_completes() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for (t, p) in [("in", 2), ("out", 2), ("dead", 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let s = settings(&bootstrap, "in", "out", "dead", "g1");
    produce(&bootstrap, "in", &buys(10, 2));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shared = Shared::new(Arc::new(s.model.clone()));
    let metrics = shared.metrics.clone();
    let partitions = shared.partitions.clone();
    let handle = runtime.spawn(async move {
        pipeline::run(s.kafka().unwrap(), s.clock, shared, None, async {
            let _ = rx.await;
        })
        .await
    });
    let out = consume_until(&bootstrap, "out", 2, Duration::from_secs(30), |m| {
        last_scores(m).values().filter(|&&v| v >= 39.9).count() == 10
    });
    assert_eq!(last_scores(&out).len(), 10);
    assert_eq!(metrics.events_accepted.get(), 20);
    assert_eq!(partitions.len(), 2, "both partitions owned");
    tx.send(()).unwrap();
    let result =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(20), handle).await });
    let result = result.expect("stops in time").expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(partitions.is_empty(), "state released on shutdown");
}

#[test]
fn two_pipelines_in_one_group_share_the_partitions() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for (t, p) in [("in", 4), ("out", 4), ("dead", 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut stops = Vec::new();
    let mut handles = Vec::new();
    let mut owned = Vec::new();
    for _ in 0..2 {
        let s = settings(&bootstrap, "in", "out", "dead", "g2");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Shared::new(Arc::new(s.model.clone()));
        owned.push(shared.partitions.clone());
        handles.push(runtime.spawn(async move {
            pipeline::run(s.kafka().unwrap(), s.clock, shared, None, async {
                let _ = rx.await;
            })
            .await
        }));
        stops.push(tx);
        // The second joins once the first owns the partitions: a rebalance
        // from one member to two, not two members joining at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while owned[0].is_empty() {
            assert!(std::time::Instant::now() < deadline, "no partitions");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Wait for the cooperative rebalance to settle: 4 partitions, 2 each.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline
        && !(owned[0].len() + owned[1].len() == 4 && !owned[0].is_empty() && !owned[1].is_empty())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        owned[0].len() + owned[1].len(),
        4,
        "{:?} {:?}",
        owned[0].numbers(),
        owned[1].numbers()
    );
    assert!(!owned[0].is_empty() && !owned[1].is_empty());

    produce(&bootstrap, "in", &buys(40, 2));
    let out = consume_until(&bootstrap, "out", 4, Duration::from_secs(30), |m| {
        last_scores(m).values().filter(|&&v| v >= 39.9).count() == 40
    });
    assert_eq!(last_scores(&out).len(), 40);

    // The first leaves: the second owns everything and scores on.
    stops.remove(0).send(()).unwrap();
    let first = handles.remove(0);
    let r = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(20), first).await });
    assert!(r.expect("in time").expect("no panic").is_ok());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline && owned[1].len() < 4 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(owned[1].len(), 4);
    produce(&bootstrap, "in", &buys(40, 1));
    let out = consume_until(&bootstrap, "out", 4, Duration::from_secs(30), |m| {
        last_scores(m).values().filter(|&&v| v >= 59.9).count() == 40
    });
    let scores = last_scores(&out);
    assert!(
        scores.values().all(|&v| (v - 60.0).abs() < 0.05),
        "{scores:?}"
    );
    stops.remove(0).send(()).unwrap();
    let r = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), handles.remove(0)).await });
    assert!(r.expect("in time").expect("no panic").is_ok());
}

#[test]
fn the_demo_runs_and_stops_on_its_own() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args([
            "demo",
            "--duration",
            "6s",
            "--plain",
            "--rate",
            "400",
            "--customers",
            "300",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("embedded Kafka broker at"), "{stdout}");
    assert!(stdout.contains("kcat -b"), "{stdout}");
    assert!(stdout.contains("demo stopped cleanly"), "{stdout}");
    // The live lines show events being scored and customers in tiers.
    let scored_something = stdout.lines().any(|l| {
        l.contains("scored") && !l.contains("scored 0/s") && l.contains("very_disengaged=")
    });
    assert!(scored_something, "{stdout}");
}

#[test]
fn input_topics_with_different_partition_counts_are_refused() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for (t, p) in [("a", 2), ("b", 3), ("out", 2), ("dead", 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let s = Settings::from_toml(
        &format!("{MODEL}\n[kafka]\nbrokers = \"{bootstrap}\"\ninput_topics = [\"a\", \"b\"]\noutput_topic = \"out\"\ndead_letter_topic = \"dead\"\n"),
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shared = Shared::new(Arc::new(s.model.clone()));
    let result = runtime.block_on(pipeline::run(
        s.kafka().unwrap(),
        s.clock,
        shared,
        None,
        std::future::pending(),
    ));
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("not co-partitioned")
            && message.contains("a: 2")
            && message.contains("b: 3"),
        "{message}"
    );
}

#[test]
fn our_partition_of_a_customer_is_the_one_librdkafka_picks() {
    use ces_stream::kafka::partitioner::Partitioner;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for count in [4, 7, 12] {
        for partitioner in Partitioner::ALL {
            let topic = &format!("p{count}-{partitioner}");
            cluster.create_topic(topic, count, 1).unwrap();
            let producer: BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("partitioner", partitioner.name())
                .create()
                .unwrap();
            // Wait for the topic's metadata: partitioning needs the count.
            producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap();
            let ids: Vec<String> = (0..3000)
                .map(|i| match i % 3 {
                    0 => format!("c-{i}"),
                    1 => format!("user-{i:08}@example.com"),
                    _ => format!("{:x}-anon-ü-{i}", i * 7919),
                })
                .collect();
            for id in &ids {
                let record: BaseRecord<'_, str, str> =
                    BaseRecord::to(topic).key(id.as_str()).payload("x");
                producer.send(record).map_err(|(e, _)| e).unwrap();
            }
            producer.flush(Duration::from_secs(10)).unwrap();
            // Read them back: each where we say it is.
            let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", format!("check-{topic}-{partitioner}"))
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in 0..count {
                tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                    .unwrap();
            }
            rdkafka::consumer::Consumer::assign(&consumer, &tpl).unwrap();
            let mut seen = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while seen < ids.len() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{partitioner}: read {seen}"
                );
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    use rdkafka::message::Message;
                    let key = m.key().unwrap();
                    assert_eq!(
                        partitioner.partition(key, count),
                        m.partition(),
                        "{partitioner} put {:?} elsewhere ({count} partitions)",
                        String::from_utf8_lossy(key)
                    );
                    seen += 1;
                }
            }
        }
    }
}

#[test]
fn an_event_ahead_of_the_wall_clock_is_checked_against_the_clock_of_its_turn() {
    // Live clock = max(watermark, now). Event a, 8 minutes ahead, is within
    // the 10-minute skew and moves the watermark; event b, 15 minutes
    // ahead, is then within the skew of the clock a left behind. Both are
    // produced before the pipeline starts, so they arrive in one batch,
    // which is parsed before it is scored: b must still be judged against
    // the clock after a, not the clock at the batch's start.
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for (t, p) in [("in", 1), ("out", 1), ("dead", 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let mut s = settings(&bootstrap, "in", "out", "dead", "g-skew");
    s.model.input.max_future_skew = 10 * 60_000;
    let now = ces_stream::timestamp::now_millis();
    let event = |id: &str, ahead_min: i64| {
        let ts = ces_stream::timestamp::format_rfc3339(now + ahead_min * 60_000).to_string();
        let v = serde_json::json!({"customer_id": id, "type": "buy", "timestamp": ts});
        (id.to_string(), v.to_string())
    };
    produce(&bootstrap, "in", &[event("a", 8), event("b", 15)]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shared = Shared::new(Arc::new(s.model.clone()));
    let metrics = shared.metrics.clone();
    let handle = runtime.spawn(async move {
        pipeline::run(s.kafka().unwrap(), s.clock, shared, None, async {
            let _ = rx.await;
        })
        .await
    });
    let out = consume_until(&bootstrap, "out", 1, Duration::from_secs(30), |m| {
        last_scores(m).len() == 2
    });
    assert_eq!(last_scores(&out).len(), 2, "both scored");
    assert_eq!(metrics.events_accepted.get(), 2);
    let rejected: u64 = metrics.rejected_by_reason.iter().map(|c| c.get()).sum();
    assert_eq!(rejected, 0, "nothing dead-lettered");
    tx.send(()).unwrap();
    let result =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(20), handle).await });
    assert!(result.expect("stops in time").expect("no panic").is_ok());
}

#[test]
fn a_dead_letter_too_large_for_the_producer_goes_out_truncated_with_its_length() {
    // An input message of 200,000 bytes is too_large (the model takes
    // events up to 65,536); its dead letter, the whole payload plus
    // headers, is more than the producer's message.max.bytes (100,000)
    // allows. It goes out with its first half, at most 64 KiB, and a
    // ces-truncated header with the original length; the stream goes on.
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    for (t, p) in [("in", 1), ("out", 1), ("dead", 1)] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let mut s = settings(&bootstrap, "in", "out", "dead", "g-large");
    s.model.input.max_event_bytes = 65_536;
    let mut kafka = s.kafka().unwrap().clone();
    kafka
        .producer_options
        .push(("message.max.bytes".into(), "100000".into()));
    let big: String = std::iter::repeat_n("0123456789", 20_000).collect();
    let mut events = vec![("big".to_string(), big.clone())];
    events.extend(buys(1, 1));
    produce(&bootstrap, "in", &events);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shared = Shared::new(Arc::new(s.model.clone()));
    let metrics = shared.metrics.clone();
    let handle = runtime.spawn(async move {
        pipeline::run(&kafka, s.clock, shared, None, async {
            let _ = rx.await;
        })
        .await
    });
    let dead = consume_until(&bootstrap, "dead", 1, Duration::from_secs(30), |m| {
        !m.is_empty()
    });
    let out = consume_until(&bootstrap, "out", 1, Duration::from_secs(30), |m| {
        !last_scores(m).is_empty()
    });
    tx.send(()).unwrap();
    let result = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), handle).await })
        .expect("stops in time")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");

    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    let payload = rdkafka::message::Message::payload(letter).unwrap();
    assert_eq!(payload.len(), 65_536, "the first half, at most 64 KiB");
    assert_eq!(payload, &big.as_bytes()[..65_536]);
    assert_eq!(header(letter, "ces-truncated"), Some("200000"));
    assert_eq!(header(letter, "ces-reason"), Some("too_large"));
    assert_eq!(key(letter), "big");
    // The next event was scored: the stream did not stop.
    assert!(last_scores(&out).contains_key("m-0"), "{out:?}");
    assert_eq!(metrics.events_accepted.get(), 1);
}
