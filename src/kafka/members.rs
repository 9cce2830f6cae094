//! Which instance of the group owns which partition, so that any instance
//! can answer for any customer (the HTTP API forwards to the owner).
//!
//! Every instance publishes its claim, the input partitions it owns and
//! the HTTP address it answers on (`[http] advertised_url`), to a small
//! compacted topic, `<group_id>-members`, keyed by that address: at every
//! change of its assignment and every few seconds, and a tombstone when it
//! stops. Every instance reads the topic to its end and keeps on reading.
//! The consumer group stays the source of truth: an instance claims only
//! what the group assigned it, as it holds it; a claim not renewed within
//! the lease (a crashed instance) is ignored, and a partition claimed by
//! none or by two (mid-rebalance) has no owner for a moment: the API
//! answers 503 with `Retry-After` then, never a wrong 404. No extra
//! service: only the brokers the group already uses.
//!
//! A claim is fresh while this instance received it less than the lease
//! ago, so clocks need not agree; the sender's time only keeps out, when
//! an instance starts and reads the topic from its beginning, the claims
//! of instances long gone (older than [`STALE_MS`] by our clock).
//!
//! The same thread keeps the input topic's partition count, which the
//! partitioner needs, fresh from the cluster's metadata.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::partition::Partitions;
use crate::timestamp::{now_millis, Millis};

/// How often an instance renews its claim.
const HEARTBEAT: Duration = Duration::from_secs(3);
/// A claim not renewed for this long is ignored (its instance is gone).
const LEASE: Duration = Duration::from_secs(12);
/// A claim whose sender's time is this far behind ours is ignored even
/// when just read: it was left by an instance long gone. Generous, so that
/// clock skew never hides a live instance.
const STALE_MS: Millis = 120_000;
/// How often an instance looks at its assignment for changes.
const WATCH: Duration = Duration::from_millis(100);
/// How often the input topic's partition count is refreshed.
const METADATA: Duration = Duration::from_secs(30);

/// Why the members topic cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("members topic {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
}

/// One instance's claim, as published.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Claim {
    url: String,
    partitions: Vec<i32>,
    at: Millis,
}

/// Who owns a partition now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Another instance, at this HTTP address.
    Remote(String),
    /// None, two, or this very instance by an older claim: no one to ask.
    Unknown,
}

/// A claim as received.
#[derive(Debug, Clone)]
struct Received {
    claim: Claim,
    at: Instant,
}

/// The group's members as this instance reads them.
pub struct Members {
    /// This instance's address.
    pub url: String,
    claims: RwLock<HashMap<String, Received>>,
    /// The input topic's partitions; 0 until known.
    input_partitions: AtomicI32,
}

impl Members {
    /// Starts a thread that creates the topic if needed, then publishes
    /// this instance's claims and reads everyone's until `stop`; the last
    /// thing it does is withdraw the claim. Returns at once: until the
    /// thread is connected no one is known, and requests for other
    /// instances' partitions answer 503 (the service must not wait for the
    /// cluster to serve its health endpoints).
    pub fn start(
        client: ClientConfig,
        topic: String,
        input_topic: String,
        url: String,
        partitions: Partitions,
        stop: Arc<AtomicBool>,
    ) -> Result<(Arc<Members>, std::thread::JoinHandle<()>), std::io::Error> {
        let members = Arc::new(Members {
            url,
            claims: RwLock::new(HashMap::new()),
            input_partitions: AtomicI32::new(0),
        });
        let me = Arc::clone(&members);
        let thread = std::thread::Builder::new()
            .name("ces-members".into())
            .spawn(move || {
                let mut failures = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    match me.connect(&client, &topic, &input_topic) {
                        Ok((producer, consumer)) => {
                            me.run(&producer, &consumer, &topic, &input_topic, &partitions, &stop);
                            return;
                        }
                        Err(e) => {
                            // Every failure at debug, one in 30 (about one
                            // a minute) where an operator looks.
                            if failures % 30 == 0 {
                                tracing::warn!(error = %e, "cannot join the members topic yet: requests for other instances' customers answer 503");
                            } else {
                                tracing::debug!(error = %e, "cannot join the members topic yet");
                            }
                            failures += 1;
                            let until = Instant::now() + Duration::from_secs(2);
                            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                                std::thread::sleep(WATCH);
                            }
                        }
                    }
                }
            })?;
        Ok((members, thread))
    }

    /// Creates the topic unless it exists, and the clients that use it.
    fn connect(
        &self,
        client: &ClientConfig,
        topic: &str,
        input_topic: &str,
    ) -> Result<(BaseProducer, BaseConsumer), MembersError> {
        ensure_topic(client, topic)?;
        tracing::debug!(topic, "members topic ready");
        let err = |source| MembersError::Kafka {
            topic: topic.to_string(),
            source,
        };
        let producer: BaseProducer = client.clone().set("linger.ms", "0").create().map_err(err)?;
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(err)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(err)?;
        consumer.assign(&tpl).map_err(err)?;
        self.refresh_count(&consumer, input_topic);
        Ok((producer, consumer))
    }

    /// The input topic's partition count, from the cluster's metadata.
    fn refresh_count(&self, consumer: &BaseConsumer, input_topic: &str) {
        let count = consumer
            .fetch_metadata(Some(input_topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == input_topic && t.error().is_none())
                    .map(|t| t.partitions().len() as i32)
            });
        match count {
            Some(n) if n > 0 => self.input_partitions.store(n, Ordering::Relaxed),
            _ => tracing::warn!(
                topic = input_topic,
                "cannot read the input topic's partition count"
            ),
        }
    }

    /// The input topic's partition count, if known.
    pub fn input_partitions(&self) -> Option<i32> {
        Some(self.input_partitions.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    fn run(
        &self,
        producer: &BaseProducer,
        consumer: &BaseConsumer,
        topic: &str,
        input_topic: &str,
        partitions: &Partitions,
        stop: &AtomicBool,
    ) {
        let mut published: Option<(BTreeSet<i32>, Instant)> = None;
        let mut counted = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if counted.elapsed() >= METADATA {
                self.refresh_count(consumer, input_topic);
                counted = Instant::now();
            }
            let owned: BTreeSet<i32> = partitions.numbers().into_iter().collect();
            let due = match &published {
                Some((p, at)) => *p != owned || at.elapsed() >= HEARTBEAT,
                None => true,
            };
            if due {
                let claim = Claim {
                    url: self.url.clone(),
                    partitions: owned.iter().copied().collect(),
                    at: now_millis(),
                };
                if let Ok(value) = serde_json::to_vec(&claim) {
                    let record = BaseRecord::to(topic).key(&self.url).payload(&value);
                    if producer.send(record).is_ok() {
                        published = Some((owned, Instant::now()));
                    }
                }
            }
            producer.poll(Duration::ZERO);
            // Read whatever arrived; wait at most until the next look at
            // the assignment.
            let mut wait = WATCH;
            while let Some(m) = consumer.poll(wait) {
                wait = Duration::ZERO;
                let Ok(m) = m else { continue };
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                let mut claims = self.claims.write();
                match m
                    .payload()
                    .and_then(|v| serde_json::from_slice::<Claim>(v).ok())
                {
                    Some(claim) if now_millis() - claim.at < STALE_MS => {
                        let at = Instant::now();
                        claims.insert(key.to_string(), Received { claim, at });
                    }
                    _ => {
                        claims.remove(key);
                    }
                }
            }
        }
        // Leaving: a tombstone, so that no one waits for the lease.
        let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(&self.url);
        let _ = producer.send(record);
        let _ = producer.flush(Duration::from_secs(1));
    }

    /// The owner of `partition` by the fresh claims of the others.
    pub fn owner(&self, partition: i32) -> Owner {
        let claims = self.claims.read();
        let mut owners = claims
            .values()
            .filter(|r| r.at.elapsed() < LEASE && r.claim.partitions.contains(&partition));
        match (owners.next(), owners.next()) {
            (Some(r), None) if r.claim.url != self.url => Owner::Remote(r.claim.url.clone()),
            _ => Owner::Unknown,
        }
    }

    /// The other instances with a fresh claim, sorted.
    pub fn others(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .claims
            .read()
            .values()
            .filter(|r| r.at.elapsed() < LEASE && r.claim.url != self.url)
            .map(|r| r.claim.url.clone())
            .collect();
        urls.sort();
        urls
    }
}

/// Creates the members topic (one partition, compacted) unless it exists.
fn ensure_topic(client: &ClientConfig, topic: &str) -> Result<(), MembersError> {
    let err = |source| MembersError::Kafka {
        topic: topic.to_string(),
        source,
    };
    // Most starts find it: a metadata request (that creates nothing) spares
    // the admin request, which not every cluster serves.
    let probe: BaseConsumer = client
        .clone()
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(err)?;
    let exists = probe
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(err)?
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if exists {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(err)?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    // The admin API is async, and the service may call this from inside its
    // runtime: a runtime of its own on a thread of its own.
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| KafkaError::AdminOpCreation(e.to_string()))
                .and_then(|rt| {
                    rt.block_on(admin.create_topics(
                        [&new],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                    ))
                })
        })
        .join()
        .unwrap_or_else(|_| Err(KafkaError::AdminOpCreation("admin thread panicked".into())))
    })
    .map_err(err)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(err(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(url: &str, claims: &[(&str, &[i32], Duration)]) -> Members {
        let now = Instant::now();
        Members {
            url: url.to_string(),
            claims: RwLock::new(
                claims
                    .iter()
                    .map(|(u, p, age)| {
                        let claim = Claim {
                            url: u.to_string(),
                            partitions: p.to_vec(),
                            at: now_millis(),
                        };
                        let at = now.checked_sub(*age).unwrap_or(now);
                        (u.to_string(), Received { claim, at })
                    })
                    .collect(),
            ),
            input_partitions: AtomicI32::new(4),
        }
    }

    #[test]
    fn a_partition_has_an_owner_only_when_exactly_one_fresh_claim_names_it() {
        let m = members(
            "http://me",
            &[
                ("http://me", &[0], Duration::ZERO),
                ("http://a", &[1, 2], Duration::from_secs(1)),
                ("http://b", &[2, 3], Duration::from_millis(500)),
                ("http://gone", &[4], LEASE + Duration::from_millis(1)),
            ],
        );
        assert_eq!(m.owner(1), Owner::Remote("http://a".into()));
        assert_eq!(m.owner(3), Owner::Remote("http://b".into()));
        assert_eq!(m.owner(2), Owner::Unknown, "two claims: mid-rebalance");
        assert_eq!(m.owner(4), Owner::Unknown, "an expired claim");
        assert_eq!(m.owner(5), Owner::Unknown, "no claim");
        assert_eq!(m.owner(0), Owner::Unknown, "not another instance");
        assert_eq!(m.others(), ["http://a", "http://b"]);
    }
}
