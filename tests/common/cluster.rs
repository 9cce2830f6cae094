//! A cluster of Apache Kafka nodes for the tests whose guarantee needs
//! one: three KRaft nodes, each broker and controller at once (a quorum of
//! three voters), every topic with three replicas and two in sync, as a
//! production cluster keeps them. A node killed -9 leaves the others
//! leading its partitions and coordinating its groups and transactions.
//!
//! A single broker cannot give that: when it restarts, its transaction
//! coordinator finishes the transactions that were under way while some
//! partitions have no leader yet, and Apache Kafka skips the markers of
//! such partitions, taking them for deleted (KAFKA-5202): their records
//! stay open until the producer's next marker, which may end them the
//! other way (see `src/kafka/transaction_seal.rs`).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use super::broker::{free_port, Broker};

/// The nodes of one cluster; killed and removed on drop.
pub struct Cluster {
    /// Every node's client listener, comma-separated.
    pub bootstrap: String,
    pub nodes: Vec<Broker>,
}

impl Cluster {
    /// Starts `size` nodes and waits until every one is in the metadata.
    pub fn apache_kafka(size: u32) -> Cluster {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let replicas = size.to_string();
        let in_sync = (size / 2 + 1).min(size).to_string();
        let overrides: Vec<(&str, &str)> = vec![
            ("default.replication.factor", &replicas),
            ("min.insync.replicas", &in_sync),
            ("offsets.topic.replication.factor", &replicas),
            ("transaction.state.log.replication.factor", &replicas),
            ("transaction.state.log.min.isr", &in_sync),
            (
                "share.coordinator.state.topic.replication.factor",
                &replicas,
            ),
            ("share.coordinator.state.topic.min.isr", &in_sync),
            // A killed node is fenced, and its partitions led by others,
            // within seconds rather than the default 9 s.
            ("broker.heartbeat.interval.ms", "500"),
            ("broker.session.timeout.ms", "3000"),
            ("replica.lag.time.max.ms", "5000"),
        ];
        let mut nodes: Vec<Broker> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, controller))| {
                Broker::cluster_node(i as u32 + 1, *port, *controller, &voters, &overrides)
            })
            .collect();
        for node in &mut nodes {
            node.spawn_node();
        }
        for node in &mut nodes {
            if let Err(why) = node.wait_ready(Duration::from_secs(120)) {
                panic!("a node of the cluster did not start: {why}");
            }
        }
        let bootstrap = nodes
            .iter()
            .map(|n| n.bootstrap.clone())
            .collect::<Vec<_>>()
            .join(",");
        let cluster = Cluster { bootstrap, nodes };
        cluster.wait_for_brokers(size as usize, Duration::from_secs(60));
        cluster
    }

    /// Waits until the metadata lists `n` brokers.
    pub fn wait_for_brokers(&self, n: usize, timeout: Duration) {
        let client = self.metadata_client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(metadata) = client.fetch_metadata(None, Duration::from_secs(1)) {
                if metadata.brokers().len() >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not list {n} brokers within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index in [`Self::nodes`] of the transaction coordinator of
    /// `transactional_id`: the leader of its `__transaction_state`
    /// partition (Kafka's `TransactionStateManager.partitionFor`: the id's
    /// Java `String.hashCode`, its absolute value, modulo the partitions).
    pub fn transaction_coordinator_of(&self, transactional_id: &str) -> usize {
        let partitions = self
            .metadata_client()
            .fetch_metadata(Some("__transaction_state"), Duration::from_secs(10))
            .expect("metadata")
            .topics()[0]
            .partitions()
            .len() as i32;
        let hash = transactional_id.encode_utf16().fold(0i32, |h, unit| {
            h.wrapping_mul(31).wrapping_add(i32::from(unit))
        });
        let abs = if hash == i32::MIN { 0 } else { hash.abs() };
        self.leader_of("__transaction_state", abs % partitions)
    }

    /// The index in [`Self::nodes`] of the leader of `topic`'s `partition`.
    pub fn leader_of(&self, topic: &str, partition: i32) -> usize {
        let metadata = self
            .metadata_client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let leader = metadata.topics()[0]
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .expect("the partition");
        (leader - 1) as usize
    }

    fn metadata_client(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("a metadata client")
    }
}
