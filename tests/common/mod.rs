//! Helpers shared by the integration tests of the scoring core.
#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod kafka;
pub mod produce;
pub mod soak;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

use ces_stream::config::Settings;
use ces_stream::model::Model;
use ces_stream::replay::{self, Summary};
use serde_json::Value;

pub const DAY: i64 = 86_400_000;
pub const HOUR: i64 = 3_600_000;
/// 2026-11-20T00:00:00Z, a whole day (and hour) boundary.
pub const T0: i64 = 1_795_132_800_000;

pub fn model(toml: &str) -> Arc<Model> {
    match Settings::from_toml(toml, Path::new("test.toml")) {
        Ok(s) => Arc::new(s.model),
        Err(e) => panic!("test config refused: {e}"),
    }
}

pub fn default_model() -> Arc<Model> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    Arc::new(Settings::load(&path).expect("default config").model)
}

/// A native event as one JSONL line.
pub fn ev(customer: &str, kind: &str, t: i64) -> String {
    serde_json::json!({"customer_id": customer, "type": kind, "timestamp": t}).to_string()
}

/// A native event with extra fields merged in.
pub fn ev_with(customer: &str, kind: &str, t: i64, extra: Value) -> String {
    let mut v = serde_json::json!({"customer_id": customer, "type": kind, "timestamp": t});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v.to_string()
}

/// Replays lines; returns the outputs, the dead letters and the summary.
pub fn replay_lines(model: &Arc<Model>, lines: &[String]) -> (Vec<Value>, Vec<Value>, Summary) {
    let input = lines.join("\n");
    let mut out = Vec::new();
    let mut dead = Vec::new();
    let (_, summary) = replay::replay(
        Arc::clone(model),
        input.as_bytes(),
        &mut out,
        Some(&mut dead),
        None,
    )
    .expect("replay");
    (parse_jsonl(&out), parse_jsonl(&dead), summary)
}

pub fn parse_jsonl(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}")))
        .collect()
}

pub fn of_kind<'a>(outputs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    outputs.iter().filter(|o| o["kind"] == kind).collect()
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

pub fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 0.005 + 1e-9,
        "expected {expected}, got {actual}"
    );
}

/// `100 * (1 - 2^(-raw / 40))`, the default normalization.
pub fn saturating(raw: f64) -> f64 {
    100.0 * (1.0 - (-raw / 40.0).exp2())
}
