//! Snapshots and recovery against a real broker process (Apache Kafka, the
//! test binary's shared broker; `CES_TEST_BROKER=tansu` for the second
//! broker), each test with topics and a group of its own. After crashes of
//! ces-stream at random moments (kill -9, also during snapshot writes), the
//! state a restart restores, once the input is drained, equals the final
//! state of one uninterrupted replay of the same events; a corrupt newest
//! snapshot is skipped for the previous one.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::kafka::*;
use common::soak::*;

#[test]
fn crash_soak_kill_9_at_random_moments_then_state_equals_one_replay() {
    let soak = Soak::new("250ms");
    let events = stream(60_000, 3_000, 20, 17);

    // Each round gets new events and is killed (-9) at a pseudo-random
    // moment while processing them, often while a snapshot is written.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    for (round, chunk) in events.chunks(events.len() / 12 + 1).enumerate() {
        produce_to(&soak.bootstrap, &soak.input, 0, chunk);
        let mut instance = soak.start(&format!("crash-{round}"));
        // A killed member stays in the group until its session times out:
        // wait for this one to own the partition, then let it work a while.
        instance.wait_assigned(Duration::from_secs(60));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 600));
        instance.signal("KILL");
        let _ = instance.child.wait();
        kills += 1;
    }
    assert!(kills >= 12);
    // Snapshots were written along the way.
    let state_dir = soak
        .dir
        .path()
        .join("state")
        .join(&soak.group)
        .join("partition-0");
    assert!(
        std::fs::read_dir(&state_dir)
            .map(|d| d.count())
            .unwrap_or(0)
            > 0,
        "no snapshot was ever written"
    );

    soak.drain("final", events.len());
    let at = "2026-10-25T00:00:00Z";
    let restored = soak.inspect(at);
    let replayed = replay_final(&soak.config, &events, at, soak.dir.path());
    assert_same_state(&restored, &replayed);
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_previous_one() {
    let soak = Soak::new("1h");
    let events = stream(20_000, 1_000, 10, 5);
    let (first, second) = events.split_at(12_000);
    produce_to(&soak.bootstrap, &soak.input, 0, first);
    soak.drain("first", first.len()); // a snapshot on release
    produce_to(&soak.bootstrap, &soak.input, 0, second);
    soak.drain("second", events.len()); // a newer one
    let state_dir = soak
        .dir
        .path()
        .join("state")
        .join(&soak.group)
        .join("partition-0");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ces"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(newest, &bytes).unwrap();

    // A restart skips the corrupt file, restores the previous snapshot and
    // processes the second half again: the end state is still exact.
    let mut instance = soak.start("after-corruption");
    instance.wait_until("restored", Duration::from_secs(60), |i| {
        i.metric("ces_snapshot_restored_customers_total") > 0.0
    });
    assert_eq!(
        instance.metric_with("ces_snapshot_failures_total", "kind=\"corrupt\""),
        1.0
    );
    assert!(instance.logged("skipping snapshot"));
    drop(instance);
    // Corrupt again (the killed run may have written a new snapshot).
    soak.drain("recover", events.len());
    let at = "2026-10-15T00:00:00Z";
    for name in ["first", "second", "after-corruption", "recover"] {
        eprintln!(
            "== {name}\n{}",
            std::fs::read_to_string(soak.dir.path().join(format!("{name}.log")))
                .unwrap_or_default()
        );
    }
    assert_same_state(
        &soak.inspect(at),
        &replay_final(&soak.config, &events, at, soak.dir.path()),
    );
}

#[test]
fn kafka_store_kill_9_soak_two_instances_lose_and_invent_nothing() {
    // The kafka store, two instances in one group, 4 partitions: events
    // (with retries and erasure requests) stream for about a minute while
    // one instance or the other is killed -9 ten times and restarted; then
    // both are stopped with SIGTERM. What the changelog restores equals one
    // replay per partition, and the output and dead-letter topics hold
    // every message those replays emit, and none they do not (duplicates
    // are allowed: at-least-once).
    const PARTITIONS: i32 = 4;
    // Outputs linger in the producer for up to 50 ms, so that a kill often
    // finds events consumed whose outputs are not acknowledged yet.
    let soak = Soak::build(
        PARTITIONS,
        "store = \"kafka\"\ninterval = \"300ms\"\n[kafka.producer_options]\n\"linger.ms\" = 50\n",
    );
    let per_partition = soak_stream(24_000, 300, 12, 29, PARTITIONS);
    let (dir, config) = (soak.dir.path().to_path_buf(), soak.config.clone());
    let start = |name: &str| {
        Instance::start_logging(
            &config,
            &dir.join(format!("{name}.log")),
            "info,librdkafka=warn",
        )
    };

    let producer = {
        let (bootstrap, input) = (soak.bootstrap.clone(), soak.input.clone());
        let per_partition = per_partition.clone();
        std::thread::spawn(move || {
            let producer = producer(&bootstrap);
            let rounds = 300;
            for k in 0..rounds {
                for (p, evs) in per_partition.iter().enumerate() {
                    let size = evs.len().div_ceil(rounds);
                    let part = &evs[(k * size).min(evs.len())..((k + 1) * size).min(evs.len())];
                    produce_messages(&producer, &input, p as i32, part);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    let mut instances = [start("a-0"), start("b-0")];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 1..=10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Kill an instance that owns partitions and works on them (a killed
        // member stays in the group until its session times out, so
        // killing faster would only keep the group rebalancing).
        let victim = (seed >> 8) as usize % 2;
        instances[victim].wait_assigned(Duration::from_secs(90));
        std::thread::sleep(Duration::from_millis(200 + seed % 2500));
        instances[victim].signal("KILL");
        let _ = instances[victim].child.wait();
        let name = format!("{}-{round}", ["a", "b"][victim]);
        instances[victim] = start(&name);
    }
    producer.join().unwrap();

    // Both alive: wait until every event's outputs are acknowledged and
    // committed, then stop both.
    let deadline = Instant::now() + Duration::from_secs(240);
    for (p, evs) in per_partition.iter().enumerate() {
        while committed(&soak.bootstrap, &soak.group, &soak.input, p as i32)
            != Some(evs.len() as i64)
        {
            assert!(Instant::now() < deadline, "partition {p} not drained");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    for instance in &mut instances {
        let status = instance.terminate(Duration::from_secs(60)).expect("stops");
        assert!(status.success(), "{}", instance.log_text());
    }
    // Restarts restored partitions from the changelog (not only rebuilt
    // them from the log).
    let logs = soak.logs();
    let restores = logs.matches("partition restored from snapshot").count();
    let cut_short = logs
        .matches("records written after the last checkpoint")
        .count();
    if std::env::var("CES_SOAK_KEEP").is_ok() {
        std::fs::write("/tmp/soak-logs.txt", &logs).unwrap();
    }
    assert!(restores >= 4, "{restores} restores");

    // What a restart restores equals one replay per partition; every
    // signal and dead letter of the replays is on the topics, none other.
    let found = soak.compare_with_replays(&per_partition, "2026-10-14T00:00:00Z");
    eprintln!(
        "soak: {found:?}; {restores} restores, {cut_short} of them past a snapshot cut short"
    );
}

/// Copies changelog `from` to `to` (one partition) without its last
/// checkpoint: what a kill -9 between a snapshot's records and its
/// checkpoint leaves.
fn copy_without_last_checkpoint(bootstrap: &str, from: &str, to: &str) -> usize {
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
    let messages = read_all(bootstrap, from, 1);
    let last = messages
        .iter()
        .rposition(|m| m.key() == Some(ces_stream::snapshot::changelog::CHECKPOINT_KEY))
        .expect("a checkpoint");
    create_topic(bootstrap, to, 1);
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut copied = 0;
    for (i, m) in messages.iter().enumerate() {
        if i == last {
            continue;
        }
        let mut headers = rdkafka::message::OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(rdkafka::message::Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(to)
            .partition(0)
            .key(m.key().unwrap_or(b""))
            .headers(headers);
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        send_waiting(&producer, record);
        copied += 1;
    }
    flush_sent(&producer, Duration::from_secs(30));
    copied
}

#[test]
fn a_changelog_record_ahead_of_its_checkpoint_restores_exactly() {
    // The case: one partition, the event clock, max_lateness 2d.
    // E0, E1 (c-1, Jan 1), a clean stop (checkpoint after E1); E2 (c-1,
    // Jan 9) processed and its record of c-1 in the changelog, but no
    // checkpoint: the state a kill -9 between records and checkpoint
    // leaves. Then E3 (c-3, Jan 6): too late in an uninterrupted run
    // (the watermark is Jan 9), so c-3 never exists, and c-1 keeps the
    // peak of that run.
    let changelog = unique("state-a");
    let soak = Soak::build_with(
        1,
        &format!("store = \"kafka\"\ninterval = \"1h\"\ntopic = \"{changelog}\"\n"),
        |m| m.replace("max_lateness = \"30d\"", "max_lateness = \"2d\""),
    );
    let ev = |id: &str, c: &str, kind: &str, t: &str, value: Option<f64>| {
        let mut v =
            serde_json::json!({"event_id": id, "customer_id": c, "type": kind, "timestamp": t});
        if let Some(x) = value {
            v["value"] = serde_json::json!(x);
        }
        (c.to_string(), v.to_string())
    };
    let events = vec![
        ev("e0", "c-1", "purchase", "2026-01-01T00:00:00Z", Some(300.0)),
        ev("e1", "c-1", "renewal", "2026-01-01T06:00:00Z", None),
        ev("e2", "c-1", "upgrade", "2026-01-09T00:00:00Z", None),
        ev("e3", "c-3", "purchase", "2026-01-06T00:00:00Z", Some(50.0)),
    ];
    let bootstrap = soak.bootstrap.clone();
    produce_to(&bootstrap, &soak.input, 0, &events[..2]);
    soak.drain("first", 2); // records of c-1, checkpoint at offset 2
    produce_to(&bootstrap, &soak.input, 0, &events[2..3]);
    soak.drain("second", 3); // c-1 with E2, checkpoint at offset 3

    // Another changelog: the same without the last checkpoint. A new group
    // (nothing committed: E2's outputs count as never delivered) and a new
    // output topic.
    let cut = unique("state-b");
    let second = std::fs::read_to_string(soak.dir.path().join("second.log")).unwrap();
    assert!(second.contains("snapshot written on release"), "{second}");
    assert!(copy_without_last_checkpoint(&bootstrap, &changelog, &cut) >= 3);
    let output = unique("signals-b");
    create_topic(&bootstrap, &output, 1);
    let config = soak.config_for(
        "cut",
        &unique("group-b"),
        &output,
        &format!("store = \"kafka\"\ninterval = \"1h\"\ntopic = \"{cut}\"\n"),
    );
    produce_to(&bootstrap, &soak.input, 0, &events[3..]);
    soak.drain_with(&config, "restored", 4);
    let log = std::fs::read_to_string(soak.dir.path().join("restored.log")).unwrap();
    assert!(
        log.contains("records written after the last checkpoint"),
        "{log}"
    );

    // The clock and sweeps: the state equals one uninterrupted replay.
    let at = "2026-01-10T00:00:00Z";
    let restored = soak.inspect_with(&config, at);
    let replayed = replay_final(&config, &events, at, soak.dir.path());
    assert!(
        !replayed.contains_key("c-3"),
        "E3 is too late: {replayed:?}"
    );
    assert_same_state(&restored, &replayed);

    // The outputs: every signal of the events after the checkpoint (E2's,
    // the sweep before it, E3's none), none missing, none invented.
    let all = replay_outputs(&config, &events, soak.dir.path());
    let before = replay_outputs(&config, &events[..2], soak.dir.path());
    assert_eq!(all[..before.len()], before[..]);
    let expected = &all[before.len()..];
    assert!(!expected.is_empty());
    let published: Vec<String> = read_all(&bootstrap, &output, 1)
        .iter()
        .map(as_replay_line)
        .collect();
    assert_eq!(published, expected, "\n{log}");
}

#[test]
fn a_snapshot_of_the_previous_version_is_rebuilt_from_the_log() {
    // tests/fixtures/v1-snapshot.ces was written by the release before
    // scoring model v2 (other customers, another record layout). Found as
    // the newest snapshot of the partition, it is not used: the partition
    // is rebuilt from the log, and the state is exact.
    let soak = Soak::new("1h");
    let dir = soak
        .dir
        .path()
        .join("state")
        .join(&soak.group)
        .join("partition-0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-snapshot.ces"),
        dir.join("snapshot-00000000000000000001.ces"),
    )
    .unwrap();
    let events = stream(3_000, 200, 5, 41);
    produce_to(&soak.bootstrap, &soak.input, 0, &events);
    soak.drain("upgraded", events.len());
    let log = std::fs::read_to_string(soak.dir.path().join("upgraded.log")).unwrap();
    assert!(
        log.contains("another scoring model or version") && log.contains("rebuilding from the log"),
        "{log}"
    );
    let at = "2026-10-07T00:00:00Z";
    assert_same_state(
        &soak.inspect(at),
        &replay_final(&soak.config, &events, at, soak.dir.path()),
    );
}
