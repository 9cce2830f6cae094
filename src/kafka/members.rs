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
//! With a shared secret (the API token), every claim and every withdrawal
//! is signed ([`ClaimSignature`]) and a record that is not signed by the
//! group, or is older than one already taken for its key (a replay), is
//! ignored and counted (`ces_member_claims_rejected_total{reason}`): a
//! client that can only write to the topic cannot make the others forward
//! requests, and the token with them, to an address of its choosing, nor
//! withdraw a real instance's claim. Without a token nothing is signed and
//! every claim is taken, as the README's Security section says.
//!
//! The same thread keeps the input topic's partition count, which the
//! partitioner needs, fresh from the cluster's metadata.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prometheus::IntCounterVec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::kafka::claim_signature::{ClaimSignature, SIGNATURE_HEADER, WITHDRAWN_AT_HEADER};
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
/// Senders of rejected records logged by name; past this many, the rest
/// are only counted (a writer can invent any number of keys).
const MAX_SENDERS_LOGGED: usize = 64;

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

/// One record of the members topic, as read.
#[derive(Debug, Clone, Copy)]
struct Record<'a> {
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    signature: Option<&'a [u8]>,
    withdrawn_at: Option<&'a [u8]>,
}

/// What a record does to the claims.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// A claim to take (or renew), under its key.
    Claim(String, Claim),
    /// The key's claim is withdrawn.
    Withdraw(String),
    /// Nothing: a claim left long ago.
    Nothing,
}

/// Why a record was ignored: the label of `ces_member_claims_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No signature, while this instance requires one.
    Unsigned,
    /// A signature that the group's secret did not make.
    BadSignature,
    /// Signed, but not a claim or withdrawal this version can read, or a
    /// claim whose URL is not its key.
    Malformed,
    /// Signed, but older than a record already taken for its key.
    Replayed,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::Unsigned,
        Rejection::BadSignature,
        Rejection::Malformed,
        Rejection::Replayed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::BadSignature => "bad_signature",
            Rejection::Malformed => "malformed",
            Rejection::Replayed => "replayed",
        }
    }
}

/// How this instance reads the topic: the secret, and the newest sender's
/// time taken for each key (an older signed record is a replay).
struct Reader {
    signature: Option<ClaimSignature>,
    newest: HashMap<String, Millis>,
}

impl Reader {
    /// What `record` does, read at `now` (sender's clock not involved
    /// beyond [`STALE_MS`]).
    fn judge(&mut self, record: Record<'_>, now: Millis) -> Result<Verdict, Rejection> {
        let key = record.key.and_then(|k| std::str::from_utf8(k).ok());
        let Some(signature) = &self.signature else {
            // Unsigned group: every record is taken as it says.
            let Some(key) = key else {
                return Ok(Verdict::Nothing);
            };
            return Ok(
                match record
                    .payload
                    .and_then(|v| serde_json::from_slice::<Claim>(v).ok())
                {
                    Some(claim) if now - claim.at < STALE_MS => Verdict::Claim(key.into(), claim),
                    _ => Verdict::Withdraw(key.into()),
                },
            );
        };
        let mac = record.signature.ok_or(Rejection::Unsigned)?;
        let key = key.ok_or(Rejection::Malformed)?;
        let (at, claim) = match record.payload {
            Some(payload) => {
                if !signature.verify_claim(key, payload, mac) {
                    return Err(Rejection::BadSignature);
                }
                let claim: Claim =
                    serde_json::from_slice(payload).map_err(|_| Rejection::Malformed)?;
                if claim.url != key {
                    return Err(Rejection::Malformed);
                }
                (claim.at, Some(claim))
            }
            None => {
                let at: Millis = record
                    .withdrawn_at
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse().ok())
                    .ok_or(Rejection::Malformed)?;
                if !signature.verify_withdrawal(key, at, mac) {
                    return Err(Rejection::BadSignature);
                }
                (at, None)
            }
        };
        if self.newest.get(key).is_some_and(|newest| at < *newest) {
            return Err(Rejection::Replayed);
        }
        self.newest.insert(key.to_string(), at);
        Ok(match claim {
            Some(claim) if now - at < STALE_MS => Verdict::Claim(key.into(), claim),
            Some(_) => Verdict::Nothing,
            None => Verdict::Withdraw(key.into()),
        })
    }
}

/// The value of header `name`, if the message has it.
fn header<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// What the members thread needs to know.
pub struct MembersConfig {
    /// The brokers and `[kafka.options]`.
    pub client: ClientConfig,
    /// `<group_id>-members`.
    pub topic: String,
    /// Whose partition count to keep.
    pub input_topic: String,
    /// This instance's advertised URL.
    pub url: String,
    /// The group's secret, if claims are signed.
    pub signature: Option<ClaimSignature>,
}

/// The clients of the members thread.
#[derive(Clone, Copy)]
struct Clients<'a> {
    producer: &'a BaseProducer,
    consumer: &'a BaseConsumer,
    topic: &'a str,
    input_topic: &'a str,
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
        config: MembersConfig,
        partitions: Partitions,
        rejected: IntCounterVec,
        stop: Arc<AtomicBool>,
    ) -> Result<(Arc<Members>, std::thread::JoinHandle<()>), std::io::Error> {
        let MembersConfig {
            client,
            topic,
            input_topic,
            url,
            signature,
        } = config;
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
                            let mut reader = Reader {
                                signature,
                                newest: HashMap::new(),
                            };
                            let clients = Clients {
                                producer: &producer,
                                consumer: &consumer,
                                topic: &topic,
                                input_topic: &input_topic,
                            };
                            me.run(clients, &mut reader, &rejected, &partitions, &stop);
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
        clients: Clients<'_>,
        reader: &mut Reader,
        rejected: &IntCounterVec,
        partitions: &Partitions,
        stop: &AtomicBool,
    ) {
        let Clients {
            producer,
            consumer,
            topic,
            input_topic,
        } = clients;
        let mut published: Option<(BTreeSet<i32>, Instant)> = None;
        let mut counted = Instant::now();
        let mut senders_logged: HashSet<String> = HashSet::new();
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
            if due && self.publish(producer, topic, &owned, reader.signature.as_ref()) {
                published = Some((owned, Instant::now()));
            }
            producer.poll(Duration::ZERO);
            // Read whatever arrived; wait at most until the next look at
            // the assignment.
            let mut wait = WATCH;
            while let Some(m) = consumer.poll(wait) {
                wait = Duration::ZERO;
                let Ok(m) = m else { continue };
                let record = Record {
                    key: m.key(),
                    payload: m.payload(),
                    signature: header(&m, SIGNATURE_HEADER),
                    withdrawn_at: header(&m, WITHDRAWN_AT_HEADER),
                };
                match reader.judge(record, now_millis()) {
                    Ok(Verdict::Claim(key, claim)) => {
                        let at = Instant::now();
                        self.claims.write().insert(key, Received { claim, at });
                    }
                    Ok(Verdict::Withdraw(key)) => {
                        self.claims.write().remove(&key);
                    }
                    Ok(Verdict::Nothing) => {}
                    Err(why) => {
                        rejected.with_label_values(&[why.label()]).inc();
                        let sender = String::from_utf8_lossy(m.key().unwrap_or_default());
                        if senders_logged.len() < MAX_SENDERS_LOGGED
                            && senders_logged.insert(sender.to_string())
                        {
                            tracing::warn!(
                                topic,
                                sender = %sender,
                                offset = m.offset(),
                                reason = why.label(),
                                "ignoring a member claim the group did not sign: no request is forwarded on its word (further ones from this sender are only counted)"
                            );
                        }
                    }
                }
            }
        }
        // Leaving: a tombstone, so that no one waits for the lease.
        let at = now_millis();
        let at_text = at.to_string();
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(&self.url);
        if let Some(signature) = &reader.signature {
            let mac = signature.sign_withdrawal(&self.url, at);
            record = record.headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: WITHDRAWN_AT_HEADER,
                        value: Some(at_text.as_bytes()),
                    })
                    .insert(Header {
                        key: SIGNATURE_HEADER,
                        value: Some(&mac[..]),
                    }),
            );
        }
        let _ = producer.send(record);
        let _ = producer.flush(Duration::from_secs(1));
    }

    /// Sends this instance's claim to `owned`, signed if the group signs.
    fn publish(
        &self,
        producer: &BaseProducer,
        topic: &str,
        owned: &BTreeSet<i32>,
        signature: Option<&ClaimSignature>,
    ) -> bool {
        let claim = Claim {
            url: self.url.clone(),
            partitions: owned.iter().copied().collect(),
            at: now_millis(),
        };
        let Ok(value) = serde_json::to_vec(&claim) else {
            return false;
        };
        let mut record = BaseRecord::to(topic).key(&self.url).payload(&value);
        if let Some(signature) = signature {
            let mac = signature.sign_claim(&self.url, &value);
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: SIGNATURE_HEADER,
                value: Some(&mac[..]),
            }));
        }
        producer.send(record).is_ok()
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

    fn signed_reader() -> (Reader, ClaimSignature) {
        let group = ClaimSignature::new(b"group token");
        let reader = Reader {
            signature: Some(group.clone()),
            newest: HashMap::new(),
        };
        (reader, group)
    }

    fn claim_payload(url: &str, partitions: &[i32], at: Millis) -> Vec<u8> {
        serde_json::to_vec(&Claim {
            url: url.into(),
            partitions: partitions.to_vec(),
            at,
        })
        .unwrap()
    }

    fn claim_record<'a>(
        key: &'a str,
        payload: &'a [u8],
        signature: Option<&'a [u8]>,
    ) -> Record<'a> {
        Record {
            key: Some(key.as_bytes()),
            payload: Some(payload),
            signature,
            withdrawn_at: None,
        }
    }

    #[test]
    fn a_signing_group_takes_only_claims_its_secret_signed() {
        let (mut reader, group) = signed_reader();
        let now = 1_000_000;
        let real = claim_payload("http://a", &[1], now);
        let mac = group.sign_claim("http://a", &real);
        assert!(matches!(
            reader.judge(claim_record("http://a", &real, Some(&mac)), now),
            Ok(Verdict::Claim(key, _)) if key == "http://a"
        ));
        // A forger who can write to the topic but has no secret.
        let forged = claim_payload("http://evil", &[1], now);
        let guess = ClaimSignature::new(b"guess").sign_claim("http://evil", &forged);
        assert_eq!(
            reader.judge(claim_record("http://evil", &forged, None), now),
            Err(Rejection::Unsigned)
        );
        assert_eq!(
            reader.judge(claim_record("http://evil", &forged, Some(&guess)), now),
            Err(Rejection::BadSignature)
        );
        // A real signature moved onto another key or payload.
        assert_eq!(
            reader.judge(claim_record("http://evil", &real, Some(&mac)), now),
            Err(Rejection::BadSignature)
        );
        // Signed under another key than its URL (only a member could).
        let renamed = group.sign_claim("http://b", &real);
        assert_eq!(
            reader.judge(claim_record("http://b", &real, Some(&renamed)), now),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn withdrawals_must_be_signed_and_newer_than_the_claim() {
        let (mut reader, group) = signed_reader();
        let now = 1_000_000;
        let claim = claim_payload("http://a", &[1], now);
        let mac = group.sign_claim("http://a", &claim);
        reader
            .judge(claim_record("http://a", &claim, Some(&mac)), now)
            .unwrap();
        let tombstone = |at: Millis, signature: Option<&[u8]>| -> Result<Verdict, Rejection> {
            let at_text = at.to_string();
            let record = Record {
                key: Some(b"http://a"),
                payload: None,
                signature,
                withdrawn_at: Some(at_text.as_bytes()),
            };
            let mut copy = Reader {
                signature: reader.signature.clone(),
                newest: reader.newest.clone(),
            };
            copy.judge(record, now)
        };
        assert_eq!(
            tombstone(now + 5, None),
            Err(Rejection::Unsigned),
            "a bare tombstone"
        );
        let forged = ClaimSignature::new(b"guess").sign_withdrawal("http://a", now + 5);
        assert_eq!(
            tombstone(now + 5, Some(&forged)),
            Err(Rejection::BadSignature)
        );
        // An old signed withdrawal (from this URL's previous life) replayed.
        let old = group.sign_withdrawal("http://a", now - 60_000);
        assert_eq!(
            tombstone(now - 60_000, Some(&old)),
            Err(Rejection::Replayed)
        );
        let real = group.sign_withdrawal("http://a", now + 5);
        assert_eq!(
            tombstone(now + 5, Some(&real)),
            Ok(Verdict::Withdraw("http://a".into()))
        );
        // And an older claim replayed after it is refused as well.
        let earlier = claim_payload("http://a", &[1], now - 3_000);
        let earlier_mac = group.sign_claim("http://a", &earlier);
        assert_eq!(
            reader.judge(claim_record("http://a", &earlier, Some(&earlier_mac)), now),
            Err(Rejection::Replayed)
        );
    }

    #[test]
    fn without_a_secret_every_claim_is_taken_as_before() {
        let mut reader = Reader {
            signature: None,
            newest: HashMap::new(),
        };
        let now = 1_000_000;
        let claim = claim_payload("http://a", &[1], now);
        assert!(matches!(
            reader.judge(claim_record("http://a", &claim, None), now),
            Ok(Verdict::Claim(..))
        ));
        let stale = claim_payload("http://a", &[1], now - STALE_MS);
        assert_eq!(
            reader.judge(claim_record("http://a", &stale, None), now),
            Ok(Verdict::Withdraw("http://a".into()))
        );
    }
}
