//! Criterion benchmarks of the scoring core on realistic ~200-byte events:
//! the serde_json parse-only baseline (the same lines into a plain struct),
//! ces-stream's parser, and parse + apply + evaluate + encode through the
//! engine.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use ces_stream::config::Settings;
use ces_stream::engine::{Engine, Signal};
use ces_stream::event::{parse, ParseContext, Parsed};
use ces_stream::output::Encoder;
use ces_stream::synth::{Synth, SynthEvent, SynthOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "../examples/common/parse_baseline.rs"]
mod baseline;

fn lines(n: u64, customers: u64) -> Vec<Vec<u8>> {
    let mut synth = Synth::new(SynthOptions {
        customers,
        ..SynthOptions::default()
    });
    let mut ev = SynthEvent::default();
    let start = 1_795_132_800_000;
    (0..n)
        .map(|i| {
            synth.next(start + i as i64 * 20, i as f64 / n as f64, &mut ev);
            ev.payload.clone()
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let model = Arc::new(
        Settings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .expect("default config")
            .model,
    );
    let input = lines(20_000, 10_000);
    let bytes: usize = input.iter().map(Vec::len).sum();
    eprintln!(
        "{} events, {} bytes on average",
        input.len(),
        bytes / input.len()
    );

    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(input.len() as u64));
    g.bench_function("serde_json_struct_baseline", |b| {
        b.iter(|| {
            for l in &input {
                let _ = black_box(baseline::parse_line(l));
            }
        })
    });
    g.bench_function("parse", |b| {
        b.iter(|| {
            for l in &input {
                black_box(parse(l, &model, ParseContext::default()));
            }
        })
    });
    g.bench_function("parse_apply_encode", |b| {
        let encoder = Encoder::new(&model);
        let mut out = Vec::with_capacity(1 << 16);
        // The same events go through again at every iteration: without
        // de-duplication they are applied (late, at the watermark) and
        // evaluated each time, instead of being ignored as retries after
        // the first pass, which measured little more than the parser.
        let mut apply_model = (*model).clone();
        apply_model.input.dedup_depth = 0;
        let model = Arc::new(apply_model);
        // A warm engine: every customer already known, as in steady state.
        let mut engine = Engine::new(Arc::clone(&model));
        let mut sink = |s: &Signal<'_>| encoder.encode(s, &mut out);
        for l in &input {
            if let Parsed::Event(e) = parse(l, &model, ParseContext::default()) {
                let _ = engine.process_replay(&e, &mut sink);
            }
        }
        b.iter(|| {
            for l in &input {
                if let Parsed::Event(e) = parse(l, &model, ParseContext::default()) {
                    let mut sink = |s: &Signal<'_>| encoder.encode(s, &mut out);
                    let _ = black_box(engine.process_replay(&e, &mut sink));
                }
            }
            out.clear();
        })
    });
    g.finish();
}

criterion_group!(engine, benches);
criterion_main!(engine);
