//! `[kafka] guarantee = "exactly_once"` against Apache Kafka's transaction
//! coordinator (the test binary's shared broker, or one of the test's own
//! when the broker itself is killed). Each test ends as the crash soaks do,
//! but stricter: what a restart restores equals one uninterrupted replay
//! per partition, and a `read_committed` reader of the output and
//! dead-letter topics finds every message of those replays **exactly
//! once**, none missing, none extra, no duplicate.

mod common;

use std::time::{Duration, Instant};

use common::kafka::*;
use common::soak::*;

const PARTITIONS: i32 = 4;
/// The soak streams span 12 days from START: the state is compared at
/// the end of the 13th.
const AT: &str = "2026-10-14T00:00:00Z";

/// Waits until the group's committed offsets reach the end of every input
/// partition (in exactly_once mode, offsets are committed by the
/// transaction that holds the outputs of the events before them).
fn wait_committed(soak: &Soak, per_partition: &[Vec<(String, Option<String>)>]) {
    let deadline = Instant::now() + Duration::from_secs(240);
    for (p, end) in ends(per_partition).into_iter().enumerate() {
        while committed(&soak.bootstrap, &soak.group, &soak.input, p as i32) != Some(end) {
            assert!(
                Instant::now() < deadline,
                "partition {p} not committed to {end}:\n{}",
                soak.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Stops every instance with SIGTERM, then compares: the state exact, every
/// expected message exactly once.
fn finish(
    soak: &Soak,
    instances: &mut [Instance],
    per_partition: &[Vec<(String, Option<String>)>],
) {
    wait_committed(soak, per_partition);
    for instance in instances.iter_mut() {
        let status = instance.terminate(Duration::from_secs(60)).expect("stops");
        assert!(status.success(), "{}", instance.log_text());
    }
    if std::env::var_os("CES_TEST_LOGS").is_some() {
        eprintln!("{}", soak.logs());
    }
    let found = soak.compare_with_replays(per_partition, AT);
    eprintln!("{found:?}");
    assert_eq!(
        (found.duplicates, found.dead_duplicates),
        (0, 0),
        "duplicates on the output and dead-letter topics"
    );
    // The outputs went out in transactions: their commit markers take
    // offsets that a read_committed reader never sees.
    let offsets: i64 = (0..PARTITIONS)
        .map(|p| end_offset(&soak.bootstrap, &soak.output, p))
        .sum();
    assert!(
        offsets > (found.outputs + found.duplicates) as i64,
        "no transaction markers on the output topic: {offsets} offsets for {} messages",
        found.outputs
    );
}

/// Two instances, ten kill -9s of either while events (with retries and
/// erasure requests) flow, then SIGTERM.
fn kill_soak(snapshot: &str, seed: u64) {
    let soak = Soak::build(PARTITIONS, snapshot).exactly_once();
    let per_partition = soak_stream(16_000, 300, 12, seed, PARTITIONS);
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        200,
        Duration::from_millis(200),
    );
    let ids = ["a", "b"];
    let mut instances = [soak.start_as("a-0", "a"), soak.start_as("b-0", "b")];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    for round in 1..=10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill an instance that owns partitions and works on them.
        let victim = (rng >> 8) as usize % 2;
        instances[victim].wait_assigned(Duration::from_secs(90));
        std::thread::sleep(Duration::from_millis(200 + rng % 2000));
        instances[victim].signal("KILL");
        let _ = instances[victim].child.wait();
        instances[victim] = soak.start_as(&format!("{}-{round}", ids[victim]), ids[victim]);
    }
    producer.join().expect("the producer");
    finish(&soak, &mut instances, &per_partition);
}

#[test]
fn kill_9_soak_with_the_kafka_store_publishes_everything_exactly_once() {
    kill_soak("store = \"kafka\"\ninterval = \"300ms\"\n", 29);
}

#[test]
fn kill_9_soak_with_the_local_store_publishes_everything_exactly_once() {
    kill_soak("interval = \"300ms\"\nkeep = 3\n", 31);
}

/// Starts instances a and b, then freezes a (SIGSTOP) once it commits
/// transactions, until its session has expired and b owns every
/// partition, and resumes it: a comes back with its old generation, its
/// partitions lost.
fn freeze_a_past_its_session(soak: &Soak) -> (Instance, Instance) {
    let mut a = soak.start_as("a", "a");
    a.wait_assigned(Duration::from_secs(60));
    let mut b = soak.start_as("b", "b");
    b.wait_assigned(Duration::from_secs(60));
    a.wait_until("a works", Duration::from_secs(60), |a| {
        a.metric("ces_transactions_committed_total") > 0.0
    });
    a.signal("STOP");
    b.wait_until("b owns every partition", Duration::from_secs(60), |b| {
        b.metric("ces_assigned_partitions") == PARTITIONS as f64
    });
    a.signal("CONT");
    (a, b)
}

#[test]
fn a_zombie_frozen_past_its_session_is_fenced_and_duplicates_nothing() {
    // a is frozen (SIGSTOP) for longer than session.timeout.ms while it has
    // a transaction open; b takes its partitions over; a comes back with
    // its old generation: whatever it still sends or commits is fenced.
    let soak = Soak::build(PARTITIONS, "store = \"kafka\"\ninterval = \"300ms\"\n").exactly_once();
    let per_partition = soak_stream(12_000, 300, 12, 37, PARTITIONS);
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        150,
        Duration::from_millis(150),
    );
    let (mut a, b) = freeze_a_past_its_session(&soak);
    a.wait_until("a aborts what it had open", Duration::from_secs(60), |a| {
        a.metric("ces_transactions_aborted_total") > 0.0
    });
    producer.join().expect("the producer");
    finish(&soak, &mut [a, b], &per_partition);
}

/// A member whose partitions were lost (frozen past its session, as the
/// zombie above) rejoins, takes partitions again and works on them while
/// events flow: the abort of its lost transaction must not reach into the
/// transactions of its new partitions. It did: each of its workers, left
/// without partitions, kept the lost transaction's failure, and after the
/// next assignment took it for a failure of the new transaction, rewound
/// without aborting it and sent its first batch's outputs into it a second
/// time (30 duplicate outputs and 2 duplicate dead letters, in one
/// committed transaction, on a loaded CI machine).
#[test]
fn a_member_whose_partitions_were_lost_works_on_new_ones_without_duplicates() {
    let soak = Soak::build(PARTITIONS, "interval = \"300ms\"\nkeep = 3\n").exactly_once();
    let per_partition = soak_stream(12_000, 300, 12, 47, PARTITIONS);
    // The first part flows until a is frozen, the rest once a has rejoined.
    let (first, rest): (Vec<_>, Vec<_>) = per_partition
        .iter()
        .map(|events| {
            let (first, rest) = events.split_at(events.len() * 2 / 5);
            (first.to_vec(), rest.to_vec())
        })
        .unzip();
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &first,
        40,
        Duration::from_millis(150),
    );
    let (mut a, b) = freeze_a_past_its_session(&soak);
    // Once a has answered for its lost partitions (the gauge is set when
    // every worker has handed them back), a rewind could only be for a
    // failure of the transactions of the partitions it is given next.
    a.wait_until("a's partitions are lost", Duration::from_secs(90), |a| {
        a.losses() > 0.0 && a.metric("ces_assigned_partitions") == 0.0
    });
    let rewinds = a.metric("ces_partition_rewinds_total");
    a.wait_until(
        "a is given partitions again",
        Duration::from_secs(90),
        |a| a.metric("ces_assigned_partitions") > 0.0,
    );
    producer.join().expect("the producer");
    let committed = a.metric("ces_transactions_committed_total");
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &rest,
        40,
        Duration::from_millis(150),
    );
    a.wait_until(
        "a commits work on its new partitions",
        Duration::from_secs(90),
        |a| a.metric("ces_transactions_committed_total") > committed + 5.0,
    );
    assert_eq!(
        a.metric("ces_partition_rewinds_total"),
        rewinds,
        "a rewound partitions it was given after the loss, for no failure of theirs:\n{}",
        a.log_text()
    );
    producer.join().expect("the producer");
    finish(&soak, &mut [a, b], &per_partition);
}

/// A node of a three-node cluster (every topic with three replicas, two
/// in sync, as production keeps them) is killed -9 while transactions are
/// open: the transaction coordinator of the first worker's producer. The
/// others take over its transactions, partitions and groups, transactions
/// commit without it, and it comes back. Every output and dead letter
/// exactly once.
#[test]
fn a_broker_killed_in_the_middle_of_open_transactions() {
    let mut cluster = common::cluster::Cluster::apache_kafka(3);
    let bootstrap = cluster.bootstrap.clone();
    killed_in_the_middle_of_open_transactions(&bootstrap, |soak, a| {
        let victim = cluster.transaction_coordinator_of(&format!("{}-a-0", soak.group));
        cluster.nodes[victim].kill();
        commits_again(a, "transactions commit with a node down");
        cluster.nodes[victim].restart();
        commits_again(a, "transactions commit after the node's restart");
    });
}

/// The same on a lone broker, killed -9 and started again: ignored, since
/// no client can make it pass every time. When the broker restarts, its
/// transaction coordinator finishes the transactions under way while some
/// partitions have no leader yet, and Apache Kafka skips the markers of
/// those (it takes them for deleted; KAFKA-5202). One run in about 27
/// failed: the broker's log said "Couldn't find leader endpoint for
/// partitions Set(dead-…-0, signals-…-2, signals-…-0, __consumer_offsets-2)
/// ... likely deleted already and hence can be skipped" for a commit under
/// way, whose records then stayed open until the producer's next marker
/// ended them (its commit published an aborted transaction's outputs
/// twice; its abort dropped a committed one's; open offsets stalled the
/// group's committed offsets). ces-stream seals what an aborted
/// transaction touched (`src/kafka/transaction_seal.rs`); a committed one
/// left open cannot be closed by a client without publishing a record of
/// its own. Kept to reproduce it: `cargo test --test exactly_once --
/// --ignored`.
#[test]
#[ignore = "a lone broker's restart can leave transactions open (Apache Kafka skips markers of leaderless partitions, KAFKA-5202): the cluster test is the guarantee"]
fn a_lone_broker_killed_in_the_middle_of_open_transactions() {
    let mut broker = Broker::apache_kafka(&[]);
    let bootstrap = broker.bootstrap.clone();
    killed_in_the_middle_of_open_transactions(&bootstrap, |_, a| {
        broker.kill();
        broker.restart();
        commits_again(a, "transactions commit after the broker's restart");
    });
}

/// One instance with transactions committing on `bootstrap`, then
/// `faults` (while events keep coming), then the exactly-once comparison.
fn killed_in_the_middle_of_open_transactions(
    bootstrap: &str,
    faults: impl FnOnce(&Soak, &mut Instance),
) {
    let soak = Soak::on(
        bootstrap,
        PARTITIONS,
        "store = \"kafka\"\ninterval = \"300ms\"\n",
        |m| m,
    )
    .exactly_once();
    let per_partition = soak_stream(12_000, 300, 12, 41, PARTITIONS);
    let mut a = soak.start_as("a", "a");
    a.wait_assigned(Duration::from_secs(60));
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        150,
        Duration::from_millis(100),
    );
    a.wait_until("transactions commit", Duration::from_secs(60), |a| {
        a.metric("ces_transactions_committed_total") > 5.0
    });
    faults(&soak, &mut a);
    producer
        .join()
        .expect("the producer survives the broker's kill and restart");
    finish(&soak, &mut [a], &per_partition);
}

/// Waits until `a` commits five more transactions.
fn commits_again(a: &mut Instance, what: &str) {
    let before = a.metric("ces_transactions_committed_total");
    a.wait_until(what, Duration::from_secs(120), |a| {
        a.metric("ces_transactions_committed_total") > before + 5.0
    });
}

#[test]
fn a_member_joining_and_leaving_with_transactions_open() {
    let soak = Soak::build(PARTITIONS, "interval = \"300ms\"\nkeep = 3\n").exactly_once();
    let per_partition = soak_stream(12_000, 300, 12, 43, PARTITIONS);
    let producer = produce_in_rounds(
        &soak.bootstrap,
        &soak.input,
        &per_partition,
        150,
        Duration::from_millis(150),
    );
    let mut a = soak.start_as("a", "a");
    a.wait_assigned(Duration::from_secs(60));
    let mut b = soak.start_as("b", "b");
    b.wait_assigned(Duration::from_secs(60));
    let mut c = soak.start_as("c", "c");
    c.wait_until(
        "c commits its partitions' work",
        Duration::from_secs(90),
        |c| c.metric("ces_transactions_committed_total") > 0.0,
    );
    let status = c.terminate(Duration::from_secs(60)).expect("c stops");
    assert!(status.success(), "{}", c.log_text());
    producer.join().expect("the producer");
    finish(&soak, &mut [a, b], &per_partition);
}
