//! What routing costs a customer-API caller, on the broker the tests use
//! (Apache Kafka; `CES_TEST_BROKER=tansu` for the second broker); see
//! scripts/bench-routing.sh.
//!
//! Two `ces-stream run` instances share a group over an input topic of 4
//! partitions; CUSTOMERS customers get one event each. Then REQUESTS
//! `GET /v1/customers/{id}` for random customers, all sent to the first
//! instance, one at a time on a fresh connection (as a sidecar or a CRM
//! plug-in would): the share it had to forward, and the latency of local
//! and forwarded answers (p50, p99), each answer classified by the
//! `X-Ces-Instance` header naming the instance that computed it.
//!
//! Usage: bench_routing [CUSTOMERS] [REQUESTS]   (default 10,000 and 1,000;
//! CES_BIN overrides the binary)

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

mod common;
use common::{ces_bin, client, create_topics, free_port, send_waiting, Broker};

const PARTITIONS: i32 = 4;

struct Instance {
    child: Child,
    addr: String,
}

impl Instance {
    fn start(dir: &Path, bootstrap: &str, name: &str) -> Instance {
        let addr = format!("127.0.0.1:{}", free_port());
        let model =
            std::fs::read_to_string("config/default.toml").expect("run from the repository root");
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{model}\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"bench\"\ninput_topics = [\"in\"]\noutput_topic = \"out\"\ndead_letter_topic = \"dead\"\n[kafka.consumer_options]\n\"fetch.wait.max.ms\" = 10\n[http]\nlisten = \"{addr}\"\n[snapshot]\nstore = \"none\"\n"
            ),
        )
        .unwrap();
        let child = Command::new(ces_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("start ces-stream run");
        Instance { child, addr }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// One GET on a fresh connection: (status, the answering instance, body).
fn get(addr: &str, path: &str) -> (u16, String, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let instance = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-ces-instance: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, instance, body.to_string())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let customers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let bootstrap = broker.bootstrap.clone();
    create_topics(
        &bootstrap,
        &[("in", PARTITIONS), ("out", PARTITIONS), ("dead", 1)],
    );
    let client = client(&bootstrap);

    let a = Instance::start(dir.path(), &bootstrap, "a");
    let b = Instance::start(dir.path(), &bootstrap, "b");
    let producer: ThreadedProducer<DefaultProducerContext> = client
        .clone()
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let now =
        ces_stream::timestamp::format_rfc3339(ces_stream::timestamp::now_millis()).to_string();
    for c in 0..customers {
        let id = format!("cust-{c}");
        let v =
            format!(r#"{{"customer_id":"{id}","type":"purchase","value":20,"timestamp":"{now}"}}"#);
        let record = BaseRecord::to("in")
            .key(id.as_bytes())
            .payload(v.as_bytes());
        send_waiting(&producer, record);
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    // Both instances up, the group settled, every customer scored: the
    // whole group counted by either, and the last customer answered.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (sa, _, ta) = get(&a.addr, "/v1/tiers");
        let (sb, _, tb) = get(&b.addr, "/v1/tiers");
        let whole = |t: &str| {
            serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| {
                v["customers"].as_u64() == Some(customers)
                    && v["complete"] == true
                    && v["instances"].as_array().is_some_and(|i| i.len() == 2)
            })
        };
        if sa == 200 && sb == 200 && whole(&ta) && whole(&tb) {
            break;
        }
        assert!(Instant::now() < deadline, "never settled:\n{ta}\n{tb}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let me = format!("http://{}", a.addr);
    let mut local = Vec::new();
    let mut forwarded = Vec::new();
    let mut other = 0;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..requests {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let id = format!("cust-{}", seed % customers);
        let t = Instant::now();
        let (status, instance, _) = get(&a.addr, &format!("/v1/customers/{id}"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match (status, instance == me) {
            (200, true) => local.push(ms),
            (200, false) => forwarded.push(ms),
            _ => other += 1,
        }
    }
    local.sort_by(f64::total_cmp);
    forwarded.sort_by(f64::total_cmp);
    println!(
        "routing: {requests} requests to one of 2 instances ({customers} customers, {PARTITIONS} partitions)"
    );
    println!(
        "  forwarded {:.1}% ({} of {}), not 200: {other}",
        100.0 * forwarded.len() as f64 / requests as f64,
        forwarded.len(),
        requests
    );
    let (lp50, lp99) = (percentile(&local, 0.5), percentile(&local, 0.99));
    let (fp50, fp99) = (percentile(&forwarded, 0.5), percentile(&forwarded, 0.99));
    println!("  local     p50 {lp50:.2} ms  p99 {lp99:.2} ms");
    println!("  forwarded p50 {fp50:.2} ms  p99 {fp99:.2} ms");
    println!(
        "  forwarded/local: p50 {:.2}x  p99 {:.2}x",
        fp50 / lp50,
        fp99 / lp99
    );
    drop(a);
    drop(b);
    drop(broker);
}
