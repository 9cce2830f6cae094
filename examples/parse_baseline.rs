//! The parse-only baseline of `scripts/bench-replay.sh`: reads a JSONL file
//! and parses every line with serde_json into a plain struct, nothing else.
//! Usage: parse_baseline FILE

use std::io::BufRead;

use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Baseline {
    event_id: Option<String>,
    customer_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    timestamp: Option<String>,
    channel: Option<String>,
    value: Option<f64>,
    attributes: Option<serde::de::IgnoredAny>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    event: Option<String>,
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    properties: Option<serde::de::IgnoredAny>,
    context: Option<serde::de::IgnoredAny>,
}

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
        match serde_json::from_slice::<Baseline>(&line) {
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
