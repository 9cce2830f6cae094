//! Output events as JSON (spec section 6), written by hand into a reused
//! buffer: one output per few events is the steady state, so this is on the
//! hot path. Names the model fixes (tiers, activities) are escaped once.

use crate::engine::{Signal, SignalKind};
use crate::model::Model;
use crate::timestamp::{format_rfc3339, Millis};

/// The `schema` field of every output event.
pub const SCHEMA: &str = "ces.v1";

/// Rounds to 2 decimals, as every score in the output is.
#[inline]
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Encodes signals of one model as JSON.
#[derive(Debug, Clone)]
pub struct Encoder {
    tiers: Vec<String>,
    activities: Vec<String>,
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let plain = s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn json_str(s: &str) -> String {
    let mut v = Vec::new();
    push_json_str(&mut v, s);
    String::from_utf8(v).unwrap_or_default()
}

/// Appends a number rounded to 2 decimals, written as the shortest
/// decimal that reads back as the rounded value (`63.2`, `55.0`, `0.07`).
#[inline]
pub fn push_score(out: &mut Vec<u8>, x: f64) {
    let cents = (x * 100.0).round();
    if cents.abs() < 1e15 {
        // Exact in i64 and in f64: print the digits directly instead of
        // running the general float formatter.
        let c = cents as i64;
        if c < 0 {
            out.push(b'-');
        }
        let c = c.unsigned_abs();
        out.extend_from_slice(itoa::Buffer::new().format(c / 100).as_bytes());
        out.push(b'.');
        let frac = (c % 100) as u8;
        out.push(b'0' + frac / 10);
        if frac % 10 != 0 {
            out.push(b'0' + frac % 10);
        }
    } else {
        out.extend_from_slice(ryu::Buffer::new().format(cents / 100.0).as_bytes());
    }
}

#[inline]
pub fn push_time(out: &mut Vec<u8>, t: Millis) {
    out.push(b'"');
    out.extend_from_slice(format_rfc3339(t).as_bytes());
    out.push(b'"');
}

impl Encoder {
    pub fn new(model: &Model) -> Encoder {
        Encoder {
            tiers: model.tiers.iter().map(|t| json_str(&t.name)).collect(),
            activities: model.activities.iter().map(|a| json_str(&a.name)).collect(),
        }
    }

    fn tier(&self, tier: u8) -> &[u8] {
        self.tiers
            .get(usize::from(tier))
            .map_or(b"null".as_slice(), |s| s.as_bytes())
    }

    /// Appends the JSON object of `signal` to `out` (no newline).
    pub fn encode(&self, signal: &Signal<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"schema\":\"ces.v1\",\"kind\":\"");
        out.extend_from_slice(signal.kind.name().as_bytes());
        out.extend_from_slice(b"\",\"customer_id\":");
        push_json_str(out, signal.customer_id);
        out.extend_from_slice(b",\"at\":");
        push_time(out, signal.at);
        if let SignalKind::CustomerErased = signal.kind {
            out.push(b'}');
            return;
        }
        out.extend_from_slice(b",\"score\":");
        push_score(out, signal.score);
        match signal.kind {
            SignalKind::ScoreChanged {
                previous_score,
                previous_tier,
                cause,
                event_id,
                contributions,
            } => {
                out.extend_from_slice(b",\"previous_score\":");
                push_score(out, previous_score);
                out.extend_from_slice(b",\"tier\":");
                out.extend_from_slice(self.tier(signal.tier));
                out.extend_from_slice(b",\"previous_tier\":");
                out.extend_from_slice(self.tier(previous_tier));
                out.extend_from_slice(b",\"cause\":\"");
                out.extend_from_slice(cause.as_str().as_bytes());
                out.push(b'"');
                if let Some(id) = event_id {
                    out.extend_from_slice(b",\"event_id\":");
                    push_json_str(out, id);
                }
                out.extend_from_slice(b",\"contributions\":{");
                let mut first = true;
                for (c, name) in contributions.iter().zip(&self.activities) {
                    if c.abs() >= 0.005 {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        out.extend_from_slice(name.as_bytes());
                        out.push(b':');
                        push_score(out, *c);
                    }
                }
                out.extend_from_slice(b"}}");
            }
            SignalKind::ChurnRisk {
                peak_score,
                reasons,
                last_event_at,
            } => {
                out.extend_from_slice(b",\"peak_score\":");
                push_score(out, peak_score);
                out.extend_from_slice(b",\"tier\":");
                out.extend_from_slice(self.tier(signal.tier));
                out.extend_from_slice(b",\"level\":\"");
                out.extend_from_slice(if signal.tier == 0 {
                    b"high".as_slice()
                } else {
                    b"medium".as_slice()
                });
                out.extend_from_slice(b"\",\"reasons\":[");
                for (i, r) in reasons.names().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.push(b'"');
                    out.extend_from_slice(r.as_bytes());
                    out.push(b'"');
                }
                out.extend_from_slice(b"],\"last_event_at\":");
                push_time(out, last_event_at);
                out.push(b'}');
            }
            SignalKind::ChurnRiskCleared => {
                out.extend_from_slice(b",\"tier\":");
                out.extend_from_slice(self.tier(signal.tier));
                out.push(b'}');
            }
            SignalKind::CustomerErased => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Cause, Reasons};

    fn model() -> Model {
        crate::config::Settings::from_toml(
            "[scoring.activities]\npurchase = { weight = 10.0 }\npage_view = { weight = 1.0 }\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap()
        .model
    }

    fn encode(s: &Signal<'_>) -> serde_json::Value {
        let mut out = Vec::new();
        Encoder::new(&model()).encode(s, &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn score_changed_matches_the_spec_shape() {
        let v = encode(&Signal {
            customer_id: "c-\"42\"",
            at: 1_795_169_700_000,
            score: 63.2049,
            tier: 1,
            kind: SignalKind::ScoreChanged {
                previous_score: 55.0,
                previous_tier: 1,
                cause: Cause::Event,
                event_id: Some("e-1"),
                contributions: &[30.1249, 0.004],
            },
        });
        assert_eq!(
            v,
            serde_json::json!({"schema": "ces.v1", "kind": "score_changed", "customer_id": "c-\"42\"",
                "at": "2026-11-20T10:15:00.000Z", "score": 63.2, "previous_score": 55.0,
                "tier": "somewhat_engaged", "previous_tier": "somewhat_engaged", "cause": "event",
                "event_id": "e-1", "contributions": {"purchase": 30.12}})
        );
    }

    #[test]
    fn scores_print_like_the_rounded_float() {
        for x in [
            0.0, 0.004, 0.005, 0.07, 0.1, 1.0, 55.0, 63.2049, 63.205, 99.999, 100.0, -15.0, -0.07,
            1234.5678, 1e13, 3.4e38, -3.4e38, 12.995,
        ] {
            let mut out = Vec::new();
            push_score(&mut out, x);
            let text = String::from_utf8(out).unwrap();
            let back: f64 = text.parse().unwrap();
            assert_eq!(back, round2(x), "{x} printed as {text}");
            let mut ryu = ryu::Buffer::new();
            if round2(x).abs() < 1e13 {
                assert_eq!(text, ryu.format(round2(x)), "{x}");
            }
        }
    }

    #[test]
    fn churn_signals_match_the_spec_shape() {
        let v = encode(&Signal {
            customer_id: "c-42",
            at: 0,
            score: 22.0,
            tier: 0,
            kind: SignalKind::ChurnRisk {
                peak_score: 64.0,
                reasons: Reasons::SCORE_DROP,
                last_event_at: 0,
            },
        });
        assert_eq!(v["level"], "high");
        assert_eq!(v["reasons"], serde_json::json!(["score_drop"]));
        assert_eq!(v["last_event_at"], "1970-01-01T00:00:00.000Z");
        let v = encode(&Signal {
            customer_id: "c-42",
            at: 0,
            score: 45.0,
            tier: 1,
            kind: SignalKind::ChurnRiskCleared,
        });
        assert_eq!(
            v,
            serde_json::json!({"schema": "ces.v1", "kind": "churn_risk_cleared", "customer_id": "c-42",
                "at": "1970-01-01T00:00:00.000Z", "score": 45.0, "tier": "somewhat_engaged"})
        );
        let v = encode(&Signal {
            customer_id: "c-42",
            at: 0,
            score: 0.0,
            tier: 0,
            kind: SignalKind::CustomerErased,
        });
        assert_eq!(
            v,
            serde_json::json!({"schema": "ces.v1", "kind": "customer_erased", "customer_id": "c-42",
                "at": "1970-01-01T00:00:00.000Z"})
        );
    }
}
