//! The parse-only baseline the engine is measured against: what a plain
//! serde_json consumer would parse an event line into. Shared by
//! `examples/parse_baseline.rs` (bench-replay.sh) and `benches/engine.rs`.

use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)] // parsed, never read: the cost of parsing is the point
pub struct Baseline {
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

/// Parses one line into the baseline struct.
#[inline]
pub fn parse_line(line: &[u8]) -> serde_json::Result<Baseline> {
    serde_json::from_slice(line)
}
