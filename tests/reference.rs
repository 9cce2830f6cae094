//! Differential test: the engine against `scripts/reference_replay.py`, an
//! independent and deliberately naive Python implementation of the spec,
//! on generated streams (personas, late events, malformed lines). Outputs
//! must agree event by event to 0.01 points, dead letters line by line.
//! Needs python3 >= 3.11 (tomllib).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use ces_stream::synth::{Synth, SynthEvent, SynthOptions};

const DAY: i64 = 86_400_000;

fn generate(path: &Path, events: u64, customers: u64, seed: u64, span: i64, shuffle: bool) {
    let mut synth = Synth::new(SynthOptions {
        customers,
        seed,
        malformed: 0.01,
        segment: 0.2,
    });
    let mut ev = SynthEvent::default();
    let start = 1_788_220_800_000; // 2026-09-01
    let mut lines = Vec::new();
    for i in 0..events {
        let mut t = start + span * i as i64 / events as i64;
        if shuffle && i % 7 == 0 {
            // Some events arrive up to two days late.
            t -= (i as i64 * 7919) % (2 * DAY);
        }
        synth.next(t, i as f64 / events as f64, &mut ev);
        lines.push(ev.payload.clone());
    }
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        f.write_all(&l).unwrap();
        f.write_all(b"\n").unwrap();
    }
}

fn compare(config: &Path, events: u64, customers: u64, seed: u64, span: i64, shuffle: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    generate(&input, events, customers, seed, span, shuffle);
    let ours = tmp.path().join("ours.jsonl");
    let ours_dead = tmp.path().join("ours-dead.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .arg("replay")
        .arg("--config")
        .arg(config)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&ours)
        .arg("--dead-letter")
        .arg(&ours_dead)
        .output()
        .unwrap();
    assert!(status.status.success());
    let reference = Command::new("python3")
        .arg(root.join("scripts/reference_replay.py"))
        .arg(config)
        .arg(&input)
        .output()
        .expect("python3 is needed for the reference implementation");
    assert!(
        reference.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let theirs = tmp.path().join("theirs.jsonl");
    std::fs::write(&theirs, &reference.stdout).unwrap();
    let cmp = Command::new("python3")
        .arg(root.join("scripts/compare_outputs.py"))
        .arg(&theirs)
        .arg(&ours)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "outputs differ from the reference:\n{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // Dead letters: same lines, same reasons.
    let ours_dead: Vec<(u64, String)> = std::fs::read_to_string(&ours_dead)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["line"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let theirs_dead: Vec<(u64, String)> = String::from_utf8_lossy(&reference.stderr)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["line"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!ours_dead.is_empty());
    assert_eq!(ours_dead, theirs_dead);
}

#[test]
fn default_model_agrees_with_the_reference() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    compare(&config, 12_000, 250, 11, 25 * DAY, true);
}

#[test]
fn other_settings_agree_with_the_reference() {
    // Linear scores, a long diversity window (wide channel times), more
    // tiers, quarter-hour sweeps and a short lookback.
    let tmp = tempfile::tempdir().unwrap();
    let default =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    let mut text = String::new();
    let mut skip = false;
    for line in default.lines() {
        // Drop the sections replaced below.
        if line.starts_with('[') {
            skip = matches!(
                line,
                "[scoring.normalization]"
                    | "[scoring.diversity]"
                    | "[[tiers]]"
                    | "[signals]"
                    | "[signals.churn]"
            );
        }
        if !skip {
            text.push_str(line);
            text.push('\n');
        }
    }
    text = text.replace("half_life = \"14d\"", "half_life = \"3d\"");
    text.push_str(
        r#"
[scoring.normalization]
kind = "linear"
max = 80.0

[scoring.diversity]
window = "60d"
bonus_per_channel = 0.25
max_channels = 3

[[tiers]]
name = "dormant"
[[tiers]]
name = "low"
above = 20.0
[[tiers]]
name = "mid"
above = 50.0
[[tiers]]
name = "high"
above = 80.0

[signals]
sweep_interval = "15m"
min_delta = 3.0

[signals.churn]
lookback = "5d"
min_peak = 30.0
drop_ratio = 0.3
inactivity = "4d"
"#,
    );
    let config = tmp.path().join("other.toml");
    std::fs::write(&config, text).unwrap();
    compare(&config, 8_000, 150, 23, 20 * DAY, true);
}
