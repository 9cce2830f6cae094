//! The HTTP server of `ces-stream run` against a running instance on the
//! mock cluster: every endpoint, not-ready, 401 and 404; the customer API
//! agrees with the output topic; every metric the Grafana dashboard and
//! the alert rules use exists; the files under deploy/ parse.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ces_stream::config::Settings;
use common::kafka::*;
use rdkafka::mocking::MockCluster;

/// A minimal HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may be chunked: keep the JSON or text part.
    (status, dechunk(&body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

fn start(
    config: &str,
) -> (
    tokio::runtime::Runtime,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
) {
    let settings = Settings::from_toml(config, Path::new("test.toml")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let _ = ces_stream::service::run_on(settings, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    (runtime, addr, tx)
}

const MODEL: &str = r#"
[scoring.activities]
buy = { weight = 20.0, channel = "shop" }
visit = { weight = 1.0, channel = "web" }
[signals]
min_delta = 4.5
"#;

#[test]
fn not_ready_until_consuming_and_health_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the pipeline cannot start.
    let config = format!(
        "{MODEL}\n[kafka]\nbrokers = \"127.0.0.1:1\"\ninput_topics = [\"in\"]\n[snapshot]\ndir = \"{}\"\n",
        dir.path().display()
    );
    let (_runtime, addr, _stop) = start(&config);
    let (status, body) = get(addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    // Not ready from the first answer on; the reasons settle once the
    // pipeline has given up on the unreachable broker.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let (status, body) = get(addr, "/readyz", None);
        assert_eq!(status, 503, "{body}");
        if body.contains("not running") || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    let reasons = v["reasons"].to_string();
    assert!(
        reasons.contains("not running") && reasons.contains("no partitions"),
        "{reasons}"
    );
}

fn metric_names_used_in_deploy() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut exprs = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("compose/grafana/dashboards/ces-stream.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        // Rows have no targets.
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("kubernetes/prometheusrule.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    let plain: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("compose/alerts.yml")).unwrap())
            .unwrap();
    assert_eq!(
        plain["groups"], rules["spec"]["groups"],
        "compose alerts match the PrometheusRule"
    );
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut word = String::new();
        for c in e.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' {
                word.push(c);
            } else {
                if word.starts_with("ces_") || word.starts_with("process_") {
                    let base = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_count")
                        .trim_end_matches("_sum")
                        .to_string();
                    names.insert(base);
                }
                word.clear();
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    names
}

/// An operator with several deployments picks the data source, the job and
/// instances; every query follows, and lag and throughput can be read per
/// instance.
#[test]
fn the_dashboard_follows_its_datasource_job_and_instance_variables() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/compose/grafana/dashboards/ces-stream.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    let mut per_instance = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let Some(targets) = panel["targets"].as_array() else {
            assert_eq!(panel["type"], "row");
            continue;
        };
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{expr}");
            // Every metric selector of the query, not just one of them.
            let selectors = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("ces_") || w.starts_with("process_"))
                .count();
            let scoped = expr
                .matches("job=\"$job\", instance=~\"$instance\"")
                .count();
            assert_eq!(selectors, scoped, "{expr}");
            if expr.contains("by (instance") {
                per_instance.insert(
                    expr.split(['(', '{', '['])
                        .find(|w| w.starts_with("ces_"))
                        .unwrap()
                        .to_string(),
                );
            }
        }
    }
    for needed in [
        "ces_consumer_lag_messages",
        "ces_events_consumed_total",
        "ces_outputs_total",
    ] {
        assert!(per_instance.contains(needed), "{needed}: {per_instance:?}");
    }
}

#[test]
fn every_file_under_deploy_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            match path.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") => {
                    for doc in serde_yaml::Deserializer::from_str(&text) {
                        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc);
                        assert!(v.is_ok(), "{}: {v:?}", path.display());
                    }
                }
                Some("json") => {
                    assert!(
                        serde_json::from_str::<serde_json::Value>(&text).is_ok(),
                        "{}",
                        path.display()
                    );
                }
                Some("toml") => {
                    Settings::from_toml(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                }
                _ => continue,
            }
            checked += 1;
        }
    }
    // The ces-stream config inside the ConfigMap is valid too.
    let cm: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    // Its references resolve as in the pod: the user from the
    // environment, the password from the mounted Secret.
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("password");
    std::fs::write(&password, "kafka-password\n").unwrap();
    let text = cm["data"]["config.toml"]
        .as_str()
        .unwrap()
        .replace("/etc/ces-stream/kafka/password", password.to_str().unwrap());
    let settings = Settings::from_toml_with_env(&text, Path::new("configmap"), |var| {
        (var == "KAFKA_USERNAME").then(|| "ces".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let options = &settings.kafka.as_ref().unwrap().options;
    assert!(options.contains(&("sasl.username".into(), "ces".into())));
    assert!(options.contains(&("sasl.password".into(), "kafka-password".into())));
    assert!(checked >= 10, "{checked}");
}

#[test]
fn endpoints_on_a_running_instance() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    // The mock cluster serves no CreateTopics: the members topic too is
    // created here.
    for (t, p) in [
        ("in", 2),
        ("out", 2),
        ("dead", 1),
        ("ces-stream-members", 1),
    ] {
        cluster.create_topic(t, p, 1).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let token_var = format!("CES_TEST_TOKEN_{}", std::process::id());
    std::env::set_var(&token_var, "s3cret");
    let config = format!(
        "{MODEL}\n[kafka]\nbrokers = \"{bootstrap}\"\ninput_topics = [\"in\"]\noutput_topic = \"out\"\ndead_letter_topic = \"dead\"\ncommit_interval = \"100ms\"\n[kafka.consumer_options]\n\"session.timeout.ms\" = 3000\n\"fetch.wait.max.ms\" = 10\n[snapshot]\ndir = \"{}\"\n[http]\napi_token_env = \"{token_var}\"\n[metrics]\nsegments = [\"smb\"]\n",
        dir.path().display()
    );
    let (runtime, addr, stop) = start(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(addr, "/readyz", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{}",
            get(addr, "/readyz", None).1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let now =
        ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis()).to_string();
    let mut events = Vec::new();
    for c in 0..10 {
        for kind in ["buy", "buy", "visit"] {
            let id = format!("h-{c}");
            events.push((id.clone(), serde_json::json!({"customer_id": id, "type": kind, "timestamp": now, "attributes": {"segment": "smb"}}).to_string()));
        }
    }
    eprintln!("ready; producing");
    produce(&bootstrap, "in", &events);
    eprintln!("produced");
    let out = consume_until(&bootstrap, "out", 2, Duration::from_secs(30), |m| {
        m.iter()
            .filter(|m| json(m)["score"].as_f64().unwrap_or(0.0) > 45.0)
            .count()
            >= 10
    });

    eprintln!("consumed {}", out.len());
    // The customer API: the live state, from the owning partition.
    let (status, body) = get(addr, "/v1/customers/h-3", Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["customer_id"], "h-3");
    assert!(v["partition"].as_i64().is_some());
    let published = out
        .iter()
        .rfind(|m| key(m) == "h-3")
        .map(json)
        .expect("h-3 published");
    assert!(
        (v["score"].as_f64().unwrap() - published["score"].as_f64().unwrap()).abs() <= 1.0,
        "api {v} vs topic {published}"
    );
    assert_eq!(v["tier"], published["tier"]);
    assert!(v["contributions"]["buy"].as_f64().unwrap() > 39.0);
    assert_eq!(v["at_risk"], false);
    assert!(v["last_event_at"].as_str().is_some() && v["peak_score"].as_f64().is_some());

    assert_eq!(get(addr, "/v1/customers/h-3", None).0, 401);
    assert_eq!(get(addr, "/v1/customers/h-3", Some("wrong")).0, 401);
    assert_eq!(get(addr, "/v1/tiers", None).0, 401);
    let (status, body) = get(addr, "/v1/customers/nobody", Some("s3cret"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown customer"));
    assert_eq!(get(addr, "/v1/nothing/here", Some("s3cret")).0, 404);
    assert_eq!(get(addr, "/nope", None).0, 404);

    let (status, body) = get(addr, "/v1/tiers", Some("s3cret"));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["customers"], 10);
    let sum: u64 = v["tiers"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(sum, 10);

    // Metrics: after a short run every name the dashboard and the alerts
    // use is in the registry.
    // Gauges are scanned every 10 s and statistics come every 10 s: wait
    // for both rather than for a fixed time (the machine may be busy).
    let deadline = Instant::now() + Duration::from_secs(40);
    let (status, text) = loop {
        let (status, text) = get(addr, "/metrics", None);
        let complete = text
            .contains("ces_segment_tier_customers{segment=\"smb\",tier=\"somewhat_engaged\"} 10")
            && text.contains("ces_consumer_lag_messages{");
        if complete || Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(status, 200);
    let missing: Vec<String> = metric_names_used_in_deploy()
        .into_iter()
        .filter(|n| !text.contains(&format!("# TYPE {n} ")))
        .collect();
    assert!(missing.is_empty(), "missing metrics {missing:?}");
    assert!(
        text.contains("ces_events_consumed_total{topic=\"in\"} 30"),
        "{text}"
    );
    assert!(
        text.contains("ces_segment_tier_customers{segment=\"smb\",tier=\"somewhat_engaged\"} 10"),
        "per-segment tiers"
    );
    assert!(
        text.contains("ces_consumer_lag_messages{"),
        "lag from librdkafka statistics"
    );

    stop.send(()).unwrap();
    runtime.shutdown_timeout(Duration::from_secs(20));
}
