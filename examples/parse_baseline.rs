//! The parse-only baseline of `scripts/bench-replay.sh`: reads a JSONL file
//! and parses every line with serde_json into a plain struct, nothing else.
//! Usage: parse_baseline FILE

use std::io::BufRead;

#[path = "common/parse_baseline.rs"]
mod baseline;

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).expect("usage: parse_baseline FILE");
    let started = std::time::Instant::now();
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut line = Vec::new();
    let (mut parsed, mut failed) = (0u64, 0u64);
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        match baseline::parse_line(&line) {
            Ok(e) => {
                parsed += 1;
                std::hint::black_box(e);
            }
            Err(_) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "baseline: {} lines in {secs:.2}s ({:.0} lines/s), {failed} not parsed",
        parsed + failed,
        (parsed + failed) as f64 / secs
    );
    Ok(())
}
