//! Broker faults, as Apache Kafka's own system tests bounce brokers: while
//! events flow, the broker (Apache Kafka, one of its own per test, whatever
//! `CES_TEST_BROKER` says: tansu cannot come back with its data) is stopped
//! and started again, killed -9 and started again, frozen for longer than
//! the consumer's session timeout; the changelog is really compacted by the
//! log cleaner before a crash. ces-stream is never restarted for a broker
//! fault. Each test ends as the crash soaks do: what a restart restores
//! equals one uninterrupted replay per partition, and the output and
//! dead-letter topics hold every message of those replays and none other
//! (duplicates counted: outputs are at-least-once).

mod common;

use std::time::{Duration, Instant};

use common::kafka::*;
use common::soak::*;
use rdkafka::message::Message;

const PARTITIONS: i32 = 4;
/// The soak streams span 12 days from START: the state is compared at
/// the end of the 13th.
const AT: &str = "2026-10-14T00:00:00Z";

/// Waits until the instance has consumed `more` events beyond what it had
/// consumed when called: it works (again).
fn wait_consuming(instance: &mut Instance, more: f64, what: &str) {
    let from = instance.metric("ces_events_consumed_total");
    instance.wait_until(what, Duration::from_secs(120), |i| {
        i.metric("ces_events_consumed_total") >= from + more
    });
}

/// Drains, stops the instance with SIGTERM (a clean exit within its
/// shutdown_timeout), and compares with one replay per partition.
fn finish(soak: &Soak, mut instance: Instance, per_partition: &[Vec<(String, Option<String>)>]) {
    let started = Instant::now();
    soak.wait_drained(&soak.config, &mut instance, &ends(per_partition));
    eprintln!("drained in {:?}", started.elapsed());
    let signalled = Instant::now();
    let status = instance
        .terminate(Duration::from_secs(60))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", instance.log_text());
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "the stop took {:?}, shutdown_timeout is 20s",
        signalled.elapsed()
    );
    if std::env::var_os("CES_TEST_LOGS").is_some() {
        eprintln!("{}", soak.logs());
    }
    let started = Instant::now();
    let found = soak.compare_with_replays(per_partition, AT);
    eprintln!("{found:?}, compared in {:?}", started.elapsed());
}

#[test]
fn the_broker_stopped_then_killed_mid_stream_ces_stream_reconnects_and_loses_nothing() {
    let mut broker = Broker::apache_kafka(&[]);
    let soak = Soak::on(
        &broker.bootstrap,
        PARTITIONS,
        "store = \"kafka\"\ninterval = \"500ms\"\n",
        |m| m,
    );
    let per_partition = soak_stream(16_000, 400, 12, 71, PARTITIONS);
    let mut instance = soak.start("a");
    instance.wait_assigned(Duration::from_secs(60));
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        160,
        Duration::from_millis(100),
    );
    wait_consuming(&mut instance, 1_000.0, "events flow");

    // A clean stop (controlled shutdown), down for longer than the
    // session timeout (ces-stream drops its partitions as lost, with
    // outputs still unacknowledged), and a start on the same log dirs. The
    // partitions come back restored from earlier snapshots and process
    // the same offsets again while the first outputs are acknowledged.
    // (The loss comes session.timeout.ms after the stop, unless something
    // holds the consumer's polling thread: a snapshot's checkpoint waiting
    // for the broker did, for 60 s.)
    let lost = instance.losses();
    let stopping = Instant::now();
    broker.stop();
    eprintln!("broker stopped in {:?}", stopping.elapsed());
    instance.wait_until(
        "partitions lost while the broker is down",
        Duration::from_secs(60),
        |i| i.losses() > lost,
    );
    broker.restart();
    wait_consuming(
        &mut instance,
        1_000.0,
        "consuming after the broker's restart",
    );
    // A crash of the broker: kill -9, then the same.
    broker.kill();
    broker.restart();
    wait_consuming(&mut instance, 1_000.0, "consuming after the broker's crash");

    producer
        .join()
        .expect("the producer survives the broker's restarts");
    finish(&soak, instance, &per_partition);
}

#[test]
fn the_broker_frozen_past_the_session_timeout_partitions_come_back_and_nothing_is_lost() {
    let broker = Broker::apache_kafka(&[]);
    let soak = Soak::on(
        &broker.bootstrap,
        PARTITIONS,
        "interval = \"500ms\"\n",
        |m| m,
    );
    let per_partition = soak_stream(12_000, 400, 12, 73, PARTITIONS);
    let mut instance = soak.start("a");
    instance.wait_assigned(Duration::from_secs(60));
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        120,
        Duration::from_millis(100),
    );
    wait_consuming(&mut instance, 1_000.0, "events flow");
    let lost = instance.losses();
    let assigned = instance.assignments();

    // SIGSTOP for longer than session.timeout.ms (6 s in the soak's config):
    // the consumer's session expires on both sides.
    broker.pause();
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(10) {
        // The instance stays up and answers while the broker is frozen.
        assert!(
            instance.child.try_wait().unwrap().is_none(),
            "{}",
            instance.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    broker.resume();

    // The partitions were lost with the session and given back.
    instance.wait_until(
        "partitions lost and assigned again",
        Duration::from_secs(120),
        |i| {
            i.losses() > lost
                && i.assignments() > assigned
                && i.metric("ces_assigned_partitions") == PARTITIONS as f64
        },
    );
    wait_consuming(
        &mut instance,
        1_000.0,
        "consuming after the broker came back",
    );
    let started = Instant::now();
    producer.join().expect("the producer survives the freeze");
    eprintln!("produced {:?} later", started.elapsed());
    finish(&soak, instance, &per_partition);
}

#[test]
fn a_changelog_compacted_by_the_log_cleaner_then_a_kill_9_restores_exactly_or_rebuilds() {
    // The log cleaner runs every 200 ms here; the changelog rolls a segment
    // every 100 ms and is cleaned at once (no compaction lag, any dirty
    // ratio), so that records a restore could want are gone.
    let broker = Broker::apache_kafka(&[("log.cleaner.backoff.ms", "200")]);
    let soak = Soak::on(
        &broker.bootstrap,
        PARTITIONS,
        "store = \"kafka\"\ninterval = \"300ms\"\n\
         [snapshot.topic_config]\n\
         \"min.compaction.lag.ms\" = 0\n\
         \"segment.ms\" = 100\n\
         \"min.cleanable.dirty.ratio\" = 0.01\n\
         \"delete.retention.ms\" = 100\n",
        |m| m,
    );
    let changelog = format!("{}-state", soak.group);
    let per_partition = soak_stream(16_000, 300, 12, 79, PARTITIONS);
    let mut instance = soak.start("a");
    instance.wait_assigned(Duration::from_secs(60));
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        200,
        Duration::from_millis(100),
    );
    wait_consuming(&mut instance, 1_000.0, "events flow");

    // Wait for the cleaner: in every changelog partition, fewer records
    // remain below the end offset (read first) than offsets were written.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ends: Vec<i64> = (0..PARTITIONS)
            .map(|p| end_offset(&soak.bootstrap, &changelog, p))
            .collect();
        let records = read_all(&soak.bootstrap, &changelog, PARTITIONS);
        let compacted = (0..PARTITIONS).all(|p| {
            let end = ends[p as usize];
            let held = records
                .iter()
                .filter(|m| m.partition() == p && m.offset() < end)
                .count() as i64;
            held < end
        });
        if compacted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changelog was never compacted:\n{}",
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    instance.signal("KILL");
    let _ = instance.child.wait();
    let mut instance = soak.start("b");
    // Each partition was restored from the compacted changelog, or found a
    // record missing and was rebuilt from the input.
    instance.wait_assigned(Duration::from_secs(60));
    producer.join().expect("the producer");
    soak.wait_drained(&soak.config, &mut instance, &ends(&per_partition));
    let restored = instance.metric("ces_snapshot_restored_customers_total");
    let rebuilt = instance.metric_with("ces_snapshot_failures_total", "kind=\"compacted\"");
    assert!(
        restored > 0.0 || rebuilt > 0.0,
        "neither restored nor rebuilt:\n{}",
        instance.log_text()
    );
    eprintln!("after the crash: {restored} customers restored, {rebuilt} partitions rebuilt from the input (compacted)");
    finish(&soak, instance, &per_partition);
}
