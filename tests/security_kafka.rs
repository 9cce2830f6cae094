//! Security on a real cluster (Apache Kafka): member claims that prove
//! their origin, forwarding over https verified against a CA, and
//! `ces-stream run` over SASL_SSL with SCRAM. The first two share this
//! binary's broker (topics and group of their own); SASL_SSL has a broker
//! of its own, with a TLS listener and users made for it.

mod common;

use common::broker::Broker;
use common::tls::{TestCa, TlsFront};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};

const MODEL: &str = r#"
[scoring.activities]
buy = { weight = 20.0, channel = "shop" }
"#;

const TOKEN: &str = "group-token-s3cret";

/// Topics and a group of a test's own on the shared broker.
struct Group {
    bootstrap: String,
    input: String,
    output: String,
    group: String,
    dir: tempfile::TempDir,
}

impl Group {
    fn new(partitions: i32) -> Group {
        let broker = shared();
        let g = Group {
            bootstrap: broker.bootstrap.clone(),
            input: unique("clicks"),
            output: unique("signals"),
            group: unique("group"),
            dir: tempfile::tempdir().unwrap(),
        };
        create_topic(&g.bootstrap, &g.input, partitions);
        create_topic(&g.bootstrap, &g.output, partitions);
        create_topic(&g.bootstrap, &format!("{}-dead", g.output), 1);
        g
    }

    /// A config with the API token from `CES_TEST_TOKEN`, plus `http`
    /// lines, in `dir/<name>/`.
    fn config(&self, name: &str, http: &str) -> std::path::PathBuf {
        self.config_with_token(name, "api_token_env = \"CES_TEST_TOKEN\"", http)
    }

    /// As [`Group::config`], with the token from a file (a mounted secret).
    fn config_with_token_file(&self, name: &str) -> std::path::PathBuf {
        let file = self.dir.path().join(format!("{name}-token"));
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        self.config_with_token(
            name,
            &format!("api_token_file = \"{}\"", file.display()),
            "",
        )
    }

    fn config_with_token(&self, name: &str, token: &str, http: &str) -> std::path::PathBuf {
        let kafka = format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{}"
input_topics = ["{}"]
output_topic = "{}"
dead_letter_topic = "{}-dead"
shutdown_timeout = "20s"

[kafka.consumer_options]
"fetch.wait.max.ms" = 10
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500

[http]
listen = "127.0.0.1:0"
{token}
{http}

[snapshot]
dir = "{}"
"#,
            self.bootstrap,
            self.group,
            self.input,
            self.output,
            self.output,
            self.dir.path().join("state").display()
        );
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_config(&dir, MODEL, &kafka)
    }

    fn start(&self, config: &std::path::Path, name: &str, env: &[(&str, &str)]) -> Instance {
        self.start_logging(config, name, env, "info,librdkafka=warn")
    }

    fn start_logging(
        &self,
        config: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        filter: &str,
    ) -> Instance {
        let mut vars = vec![("CES_TEST_TOKEN", TOKEN)];
        vars.extend_from_slice(env);
        Instance::start_with(
            config,
            &self.dir.path().join(format!("{name}.log")),
            filter,
            &vars,
        )
    }

    /// One `buy` per customer; waits until each has a signal out.
    fn score(&self, customers: &[String]) {
        let now = ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis());
        let events: Vec<(String, String)> = customers
            .iter()
            .map(|c| {
                let e = serde_json::json!({"customer_id": c, "type": "buy", "timestamp": now.to_string()});
                (c.clone(), e.to_string())
            })
            .collect();
        produce(&self.bootstrap, &self.input, &events);
        consume_until(
            &self.bootstrap,
            &self.output,
            2,
            Duration::from_secs(60),
            |m| {
                m.iter()
                    .map(key)
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    >= customers.len()
            },
        );
    }
}

/// A server that counts whoever connects to it and what they send: the
/// address a forger wants requests sent to.
struct Trap {
    addr: String,
    connections: Arc<AtomicUsize>,
    received: Arc<parking_lot::Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl Trap {
    fn start() -> Trap {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(parking_lot::Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (connections.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 4096];
                        if let Ok(n) = stream.read(&mut buf) {
                            r.lock().push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Trap {
            addr,
            connections,
            received,
            stop,
        }
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Asks `addr` for every customer; the statuses seen.
fn ask_all(addr: &str, customers: &[String]) -> HashMap<u16, usize> {
    let auth = [("Authorization", "Bearer group-token-s3cret")];
    let mut statuses = HashMap::new();
    for c in customers {
        let (status, _, body) = http_get_with(addr, &format!("/v1/customers/{c}"), &auth);
        if status == 200 {
            assert!(body.contains(&format!("\"customer_id\":\"{c}\"")), "{body}");
        }
        *statuses.entry(status).or_default() += 1;
    }
    statuses
}

/// Waits until both instances answer 200 for every customer.
fn wait_all_answer(addrs: &[&str], customers: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all: Vec<_> = addrs.iter().map(|a| ask_all(a, customers)).collect();
        if all.iter().all(|s| s.get(&200) == Some(&customers.len())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every customer answers: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_forged_member_claim_never_receives_a_request_nor_the_token() {
    let g = Group::new(2);
    // The same token, from the environment for a and from a file for b:
    // each verifies the other's claims.
    let mut a = g.start(&g.config("a", ""), "a", &[]);
    a.wait_assigned(Duration::from_secs(30));
    let mut b = g.start(&g.config_with_token_file("b"), "b", &[]);
    b.wait_assigned(Duration::from_secs(60));
    a.wait_until("a gives a partition up", Duration::from_secs(30), |a| {
        a.revocations() >= 1.0
    });
    let customers: Vec<String> = (0..40).map(|c| format!("c-{c}")).collect();
    g.score(&customers);
    wait_all_answer(&[&a.http, &b.http], &customers);

    // The forger can write to the members topic, and knows the protocol:
    // a claim of every partition for its own address, unsigned or with a
    // made-up signature, and tombstones (bare, or with a made-up
    // signature) of the real instances' claims, again and again.
    let trap = Trap::start();
    let evil = format!("http://{}", trap.addr);
    let members_topic = format!("{}-members", g.group);
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(&g.bootstrap).create().unwrap();
    let forge = |round: u64| {
        let claim = format!(
            r#"{{"url":"{evil}","partitions":[0,1],"at":{}}}"#,
            ces_stream::timestamp::now_millis()
        );
        let made_up = [round as u8; 32];
        let at = ces_stream::timestamp::now_millis().to_string();
        let signed = || {
            OwnedHeaders::new()
                .insert(Header {
                    key: "ces-signature",
                    value: Some(&made_up[..]),
                })
                .insert(Header {
                    key: "ces-withdrawn-at",
                    value: Some(at.as_bytes()),
                })
        };
        let mut record = BaseRecord::to(&members_topic).key(&evil).payload(&claim);
        if round % 2 == 1 {
            record = record.headers(signed());
        }
        send_waiting(&producer, record);
        for real in [&a.http, &b.http] {
            let key = format!("http://{real}");
            let mut tombstone: BaseRecord<'_, str, [u8]> = BaseRecord::to(&members_topic).key(&key);
            if round % 2 == 1 {
                tombstone = tombstone.headers(signed());
            }
            send_waiting(&producer, tombstone);
        }
        flush_sent(&producer, Duration::from_secs(10));
    };

    // Under attack, every customer keeps answering 200 from either
    // instance, until each has rejected a good many forged records and a
    // few of the real claims' renewals (every 3 s) have come and gone.
    let began = Instant::now();
    let mut round = 0;
    let mut seen: HashMap<u16, usize> = HashMap::new();
    while began.elapsed() < Duration::from_secs(8)
        || a.metric("ces_member_claims_rejected_total") < 30.0
        || b.metric("ces_member_claims_rejected_total") < 30.0
    {
        forge(round);
        round += 1;
        for addr in [&a.http, &b.http] {
            for (status, n) in ask_all(addr, &customers) {
                *seen.entry(status).or_default() += n;
            }
        }
        assert_eq!(
            trap.connections.load(Ordering::SeqCst),
            0,
            "a request reached the forger's address (answers {seen:?}): {}",
            trap.received.lock()
        );
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "rejections not counted: {}\n{}",
            a.metrics_text(),
            a.log_text()
        );
    }
    assert_eq!(
        trap.connections.load(Ordering::SeqCst),
        0,
        "a request reached the forger's address: {}",
        trap.received.lock()
    );
    assert!(!trap.received.lock().contains(TOKEN));
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        [200],
        "every answer a 200 all through the attack: {seen:?}"
    );
    for instance in [&a, &b] {
        let metrics = instance.metrics_text();
        for reason in ["unsigned", "bad_signature"] {
            assert!(
                metric_series(
                    &metrics,
                    "ces_member_claims_rejected_total",
                    &format!("reason=\"{reason}\"")
                ) > 0.0,
                "{reason} not counted:\n{metrics}"
            );
        }
        // Logged once per sender, not once per record.
        let log = instance.log_text();
        let warnings = log
            .lines()
            .filter(|l| l.contains("ignoring a member claim") && l.contains(&trap.addr))
            .count();
        assert_eq!(warnings, 1, "{log}");
    }
    eprintln!(
        "{round} forging rounds; answers {seen:?}; rejected by a: {}, by b: {}",
        a.metric("ces_member_claims_rejected_total"),
        b.metric("ces_member_claims_rejected_total")
    );
    assert!(a.terminate(Duration::from_secs(30)).unwrap().success());
    assert!(b.terminate(Duration::from_secs(30)).unwrap().success());
}

/// The owner named by an answer's `x-ces-instance` header.
fn answered_by(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("x-ces-instance: "))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn forwarding_over_https_trusts_the_configured_ca_and_nothing_else() {
    let g = Group::new(2);
    // Both instances behind TLS fronts with certificates of the group's
    // CA; a trusts that CA, b an unrelated one (a misconfiguration, or a
    // man in the middle from b's point of view).
    let group_ca = TestCa::new("ces-stream test group CA");
    let other_ca = TestCa::new("some other CA");
    let group_ca_file = group_ca.write(g.dir.path(), "group-ca.pem");
    let other_ca_file = other_ca.write(g.dir.path(), "other-ca.pem");
    let leaf = group_ca.leaf(&["localhost", "127.0.0.1"]);
    let http_a = format!("127.0.0.1:{}", common::broker::free_port());
    let http_b = format!("127.0.0.1:{}", common::broker::free_port());
    let front_a = TlsFront::start(&leaf, http_a.clone());
    let front_b = TlsFront::start(&leaf, http_b.clone());
    let url_a = format!("https://localhost:{}", front_a.port);
    let url_b = format!("https://localhost:{}", front_b.port);
    let config_a = g.config(
        "a",
        &format!("forward_ca_file = \"{}\"", group_ca_file.display()),
    );
    let config_b = g.config(
        "b",
        &format!("forward_ca_file = \"{}\"", other_ca_file.display()),
    );
    // Every log line at every level: the token, which travels with each
    // forwarded request, must be in none.
    let mut a = g.start_logging(
        &config_a,
        "a",
        &[
            ("CES_HTTP_LISTEN", &http_a),
            ("CES_HTTP_ADVERTISED_URL", &url_a),
        ],
        "trace",
    );
    a.wait_assigned(Duration::from_secs(30));
    let mut b = g.start(
        &config_b,
        "b",
        &[
            ("CES_HTTP_LISTEN", &http_b),
            ("CES_HTTP_ADVERTISED_URL", &url_b),
        ],
    );
    b.wait_assigned(Duration::from_secs(60));
    a.wait_until("a gives a partition up", Duration::from_secs(30), |a| {
        a.revocations() >= 1.0
    });
    let customers: Vec<String> = (0..40).map(|c| format!("c-{c}")).collect();
    g.score(&customers);

    // a answers for everyone, b's customers through b's https front.
    let auth = [("Authorization", "Bearer group-token-s3cret")];
    let deadline = Instant::now() + Duration::from_secs(60);
    let owners = loop {
        let answers: Vec<(u16, String)> = customers
            .iter()
            .map(|c| {
                let (status, head, _) =
                    http_get_with(&a.http, &format!("/v1/customers/{c}"), &auth);
                (status, answered_by(&head))
            })
            .collect();
        if answers.iter().all(|(status, _)| *status == 200) {
            break answers
                .into_iter()
                .map(|(_, owner)| owner)
                .collect::<Vec<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "a does not answer for everyone: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let by_b = owners.iter().filter(|o| **o == url_b).count();
    assert!(
        by_b > 0 && owners.iter().all(|o| *o == url_a || *o == url_b),
        "{owners:?}"
    );
    assert!(a.metric_with("ces_api_routed_requests_total", "outcome=\"forwarded\"") >= by_b as f64);

    // b refuses a's certificate: b's own customers answer, a's are 503,
    // counted as failed; never an answer over an unverified connection.
    for (c, owner) in customers.iter().zip(&owners) {
        let (status, head, body) = http_get_with(&b.http, &format!("/v1/customers/{c}"), &auth);
        if *owner == url_b {
            assert_eq!(status, 200, "{c}: {body}");
        } else {
            assert_eq!(status, 503, "{c}: {head} {body}");
            assert!(body.contains("cannot be reached"), "{body}");
        }
    }
    let failed = b.metric_with("ces_api_routed_requests_total", "outcome=\"failed\"");
    assert_eq!(
        failed as usize,
        customers.len() - by_b,
        "{}",
        b.metrics_text()
    );
    assert_eq!(
        b.metric_with("ces_api_routed_requests_total", "outcome=\"forwarded\""),
        0.0
    );
    assert!(a.terminate(Duration::from_secs(30)).unwrap().success());
    assert!(b.terminate(Duration::from_secs(30)).unwrap().success());
    let log = a.log_text();
    // Traced, the forwarding client (reqwest, hyper, rustls) included.
    let traced = |target: &str| {
        log.lines()
            .filter(|l| l.contains(" TRACE ") && l.contains(target))
            .count()
    };
    assert!(
        traced("reqwest") > 0 && traced("hyper") > 0 && traced("rustls") > 0,
        "not traced: {log}"
    );
    assert!(!log.contains(TOKEN), "the token is in a's trace log");
}

/// Waits for the process to exit by itself; its status and log.
fn exits_within(instance: &mut Instance, timeout: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = instance.child.try_wait().unwrap() {
            return (status, instance.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "still running after {timeout:?} (a hang, not a clear error):\n{}",
            instance.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_over_sasl_ssl_with_scram_and_clear_errors_for_a_wrong_password_or_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ces-stream test cluster CA");
    let other_ca = TestCa::new("not the cluster's CA");
    let ca_file = ca.write(dir.path(), "cluster-ca.pem");
    let other_ca_file = other_ca.write(dir.path(), "other-ca.pem");
    // The broker advertises 127.0.0.1: its certificate must name it.
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let keystore = dir.path().join("broker-keystore.pem");
    std::fs::write(&keystore, format!("{}{}", leaf.key_pem, leaf.cert_pem)).unwrap();
    let password = "scram-Pa55word;with=odd]chars";
    let broker = Broker::apache_kafka_sasl_ssl(common::broker::SaslSsl {
        keystore,
        users: vec![("ces".into(), password.into())],
    });
    let secure = broker.sasl_ssl_bootstrap.clone().unwrap();
    // The test's own clients use the PLAINTEXT listener.
    let (input, output, group) = (unique("clicks"), unique("signals"), unique("group"));
    create_topic(&broker.bootstrap, &input, 2);
    create_topic(&broker.bootstrap, &output, 2);
    create_topic(&broker.bootstrap, &format!("{output}-dead"), 1);
    // The password as Kubernetes mounts a Secret: a file.
    let password_file = dir.path().join("kafka-password");
    let config = |name: &str, password: &str, ca: &std::path::Path| {
        std::fs::write(password_file.with_extension(name), format!("{password}\n")).unwrap();
        let kafka = format!(
            r#"
[kafka]
brokers = "{secure}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dead_letter_topic = "{output}-dead"
shutdown_timeout = "20s"

[kafka.options]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "${{CES_TEST_KAFKA_USER}}"
"sasl.password" = "${{file:{}}}"
"ssl.ca.location" = "{}"

[http]
listen = "127.0.0.1:0"

[snapshot]
dir = "{}"
"#,
            password_file.with_extension(name).display(),
            ca.display(),
            dir.path().join("state").display()
        );
        let dir = dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_config(&dir, MODEL, &kafka)
    };
    let env = [("CES_TEST_KAFKA_USER", "ces")];
    let log = |name: &str| dir.path().join(format!("{name}.log"));

    // Right password, trusted CA: consumes, scores, produces, commits.
    let mut instance = Instance::start_with(
        &config("good", password, &ca_file),
        &log("good"),
        "trace",
        &env,
    );
    instance.wait_assigned(Duration::from_secs(60));
    let now = ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis());
    let customers: Vec<String> = (0..20).map(|c| format!("c-{c}")).collect();
    let events: Vec<(String, String)> = customers
        .iter()
        .map(|c| {
            let e =
                serde_json::json!({"customer_id": c, "type": "buy", "timestamp": now.to_string()});
            (c.clone(), e.to_string())
        })
        .collect();
    produce(&broker.bootstrap, &input, &events);
    let outputs = consume_until(
        &broker.bootstrap,
        &output,
        2,
        Duration::from_secs(60),
        |m| {
            m.iter()
                .map(key)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == customers.len()
        },
    );
    assert!(
        outputs.iter().all(|m| json(m)["kind"] == "score_changed"),
        "{outputs:?}"
    );
    let status = instance.terminate(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{}", instance.log_text());
    let committed: i64 = (0..2)
        .map(|p| committed(&broker.bootstrap, &group, &input, p).unwrap_or(0))
        .sum();
    assert_eq!(
        committed,
        customers.len() as i64,
        "every event's offset committed over SASL_SSL"
    );
    let traced = instance.log_text();
    assert!(traced.contains(" TRACE "), "traced");
    assert!(!traced.contains(password), "the password is in the log");
    // The members thread (a client of its own) is in over SASL_SSL too.
    assert!(
        !traced.contains("cannot join the members topic"),
        "{traced}"
    );

    // A wrong password: the start stops at once, saying what to check.
    let began = Instant::now();
    let mut wrong = Instance::start_with(
        &config("wrong", "not-the-password", &ca_file),
        &log("wrong"),
        "info",
        &env,
    );
    let (status, text) = exits_within(&mut wrong, Duration::from_secs(25));
    assert!(!status.success());
    assert!(
        text.contains("refused") && text.contains("sasl.password"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    eprintln!(
        "wrong password: exit after {:?}: {}",
        began.elapsed(),
        text.lines().last().unwrap_or_default()
    );

    // A certificate the configured CA did not sign: likewise.
    let began = Instant::now();
    let mut untrusted = Instance::start_with(
        &config("untrusted", password, &other_ca_file),
        &log("untrusted"),
        "info",
        &env,
    );
    let (status, text) = exits_within(&mut untrusted, Duration::from_secs(25));
    assert!(!status.success());
    assert!(
        text.contains("ssl.ca.location") && text.contains("certificate"),
        "{text}"
    );
    eprintln!(
        "untrusted certificate: exit after {:?}: {}",
        began.elapsed(),
        text.lines().last().unwrap_or_default()
    );
}
