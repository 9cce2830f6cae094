//! Snapshot benchmark (see scripts/bench-snapshot.sh): at N customers with
//! the default model, the time and size of a snapshot written whole, the
//! longest pause a copy-on-write snapshot causes (one chunk copied and
//! written), and the time to restore from the local store.
//!
//! Usage: bench_snapshot [CUSTOMERS...]   (default 1000000 10000000)

use std::sync::Arc;
use std::time::{Duration, Instant};

use ces_stream::config::Settings;
use ces_stream::engine::{Engine, Signal};
use ces_stream::event::Event;
use ces_stream::metrics::Metrics;
use ces_stream::partition::PartitionState;
use ces_stream::snapshot::local::LocalStore;
use ces_stream::snapshot::{fingerprint, header_for};

fn build(model: &Arc<ces_stream::model::Model>, customers: u64) -> Engine {
    let mut engine = Engine::new(Arc::clone(model));
    let start = 1_790_812_800_000i64;
    let activities = model.activities.len() as u64;
    let mut sink = |_: &Signal<'_>| {};
    // Two events per customer, of different activities, spread over a day.
    for round in 0..2u64 {
        for c in 0..customers {
            let id = format!("c-{c:08}");
            let ev = Event {
                customer_id: id.as_str().into(),
                activity: ((c * 7 + round * 3) % activities) as u16,
                timestamp: start + ((round * customers + c) * 86_400_000 / (2 * customers)) as i64,
                value: (c % 100) as f64,
                channel: None,
                event_id: None,
                segment: None,
                segment_id: 0,
            };
            let _ = engine.process_replay(&ev, &mut sink);
        }
    }
    engine
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000_000, 10_000_000]
    } else {
        sizes
    };
    let model = Arc::new(
        Settings::load(std::path::Path::new("config/default.toml"))
            .expect("run from the repository root")
            .model,
    );
    let fp = fingerprint(&model);
    let metrics = Metrics::new(&model);
    for n in sizes {
        let dir = tempfile::tempdir_in(".").unwrap();
        let store = LocalStore::new(dir.path(), "bench", 3);
        let started = Instant::now();
        let engine = build(&model, n);
        println!(
            "{n} customers built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let mut state = PartitionState::from_engine(engine);

        // A whole snapshot, as on release.
        let started = Instant::now();
        let bytes = store
            .save_now(0, fp, &state, vec![("in".into(), 42)])
            .expect("snapshot written");
        let whole = started.elapsed();
        println!(
            "  whole snapshot: {:.2}s, {} bytes ({:.1} bytes/customer)",
            whole.as_secs_f64(),
            bytes,
            bytes as f64 / n as f64
        );

        // A copy-on-write snapshot in chunks, as while the stream flows:
        // the longest time the partition waits is one chunk.
        let table = state.engine.customers_mut();
        let t0 = Instant::now();
        let (customers, ids_len) = table.begin_snapshot();
        let mut longest = t0.elapsed();
        let header = header_for(
            0,
            fp,
            &state.engine,
            state.clock,
            vec![("in".into(), 43)],
            customers,
            ids_len,
        );
        let mut writer = store.begin(&header).expect("writer");
        let mut buf = Vec::new();
        let started = Instant::now();
        loop {
            let t = Instant::now();
            buf.clear();
            let done = state.engine.customers_mut().snapshot_chunk(4_096, &mut buf);
            writer.records(&buf).expect("write");
            longest = longest.max(t.elapsed());
            if done {
                break;
            }
        }
        let ids = state.engine.customers_mut().finish_snapshot();
        writer
            .finish(&ids)
            .expect("finish")
            .commit()
            .expect("commit");
        println!(
            "  chunked snapshot: {:.2}s in all, longest pause {:.2} ms",
            started.elapsed().as_secs_f64(),
            longest.as_secs_f64() * 1000.0
        );

        // Restore.
        drop(state);
        let started = Instant::now();
        let restored = store.load(0, &model, &metrics).expect("restored");
        let took = started.elapsed().max(Duration::from_micros(1));
        println!(
            "  restore: {:.2}s, {:.0} customers/s (goal >= 1,000,000/s)",
            took.as_secs_f64(),
            restored.engine.customers().len() as f64 / took.as_secs_f64()
        );
    }
}
