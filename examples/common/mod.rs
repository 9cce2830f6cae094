//! What the end-to-end benchmarks share: the broker (the tests' own
//! harness, `tests/common/broker.rs`: Apache Kafka by default, tansu with
//! `CES_TEST_BROKER=tansu`), its topics, the binary measured, free ports and
//! CPU seconds. Not an example of its own (no `main.rs`).

#![allow(dead_code)] // each benchmark uses part of it

use std::path::PathBuf;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

#[path = "../../tests/common/broker.rs"]
mod broker;
#[allow(unused_imports)] // each benchmark uses part of it
pub use broker::{free_port, Broker};
#[path = "../../tests/common/produce.rs"]
mod produce;
#[allow(unused_imports)] // each benchmark uses part of it
pub use produce::send_waiting;

/// The `ces-stream` binary measured: `$CES_BIN`, else the release build.
pub fn ces_bin() -> PathBuf {
    std::env::var("CES_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/release/ces-stream"))
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
