use ces_stream::event::{parse, ParseContext, Parsed};
use std::io::BufRead;
use std::sync::Arc;
fn main() {
    let model = Arc::new(
        ces_stream::config::Settings::load(std::path::Path::new("config/default.toml"))
            .unwrap()
            .model,
    );
    let path = std::env::args().nth(1).unwrap();
    let stage: u32 = std::env::args().nth(2).unwrap().parse().unwrap();
    let f = std::fs::File::open(path).unwrap();
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut line = Vec::new();
    let mut engine = ces_stream::engine::Engine::new(model.clone());
    let t = std::time::Instant::now();
    let mut n = 0u64;
    let mut outs = 0u64;
    let enc = ces_stream::output::Encoder::new(&model);
    let mut buf = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).unwrap() == 0 {
            break;
        }
        n += 1;
        if stage == 0 {
            continue;
        }
        if let Parsed::Event(e) = parse(&line, &model, ParseContext::default()) {
            if stage == 1 {
                std::hint::black_box(&e);
                continue;
            }
            if stage == 2 {
                let _ = engine.customers_mut().find_or_insert(&e.customer_id, || {
                    ces_stream::customers::NewCustomer {
                        last_event_at: 0,
                        peak_at: 0,
                    }
                });
                continue;
            }
            if stage == 3 {
                let _ = engine.process_replay(&e, &mut |_s: &ces_stream::engine::Signal<'_>| {
                    outs += 1;
                });
                continue;
            }
            let _ = engine.process_replay(&e, &mut |s: &ces_stream::engine::Signal<'_>| {
                outs += 1;
                buf.clear();
                enc.encode(s, &mut buf);
            });
        }
    }
    eprintln!(
        "stage {stage}: {n} lines {outs} outs in {:?} = {:.0} ns/line",
        t.elapsed(),
        t.elapsed().as_nanos() as f64 / n as f64
    );
}
