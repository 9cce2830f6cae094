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
    /// Tier names as JSON strings.
    tiers: Vec<Name>,
    /// Activity names as object keys: `"name":`.
    activities: Vec<Name>,
}

/// Bytes of a [`Name`] copied as one fixed block.
const NAME_BLOCK: usize = 48;

/// A text the model fixes, encoded once, ready to append: as a padded
/// block when short (a fixed-size copy, see [`extend_block`]), else as is
/// in `long`.
#[derive(Debug, Clone)]
struct Name {
    block: [u8; NAME_BLOCK],
    len: usize,
    long: Box<[u8]>,
}

impl Name {
    fn new(bytes: Vec<u8>) -> Name {
        let mut block = [0u8; NAME_BLOCK];
        let len = bytes.len();
        if len <= NAME_BLOCK {
            block[..len].copy_from_slice(&bytes);
        }
        // Only a name too long for the block is kept apart.
        let long = if len > NAME_BLOCK {
            bytes.into_boxed_slice()
        } else {
            Box::default()
        };
        Name { block, len, long }
    }

    #[inline(always)]
    fn push(&self, out: &mut Vec<u8>) {
        if self.len <= NAME_BLOCK {
            extend_block(out, &self.block, self.len);
        } else {
            out.extend_from_slice(&self.long);
        }
    }
}

/// Appends `s` as a JSON string literal.
#[inline]
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Without a branch per byte: the check vectorizes.
    let special = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !special {
        out.reserve(s.len() + 2);
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
    let y = x * 100.0;
    if y.abs() < 999_999_999.0 {
        // `y.round()` without the call to libm's round (x86_64's baseline
        // has no rounding instruction): truncate, then away from zero
        // from a half on. Exact: below 2^52, `y - trunc(y)` is.
        let t = y as i64;
        let rest = y - t as f64;
        let cents = t + i64::from(rest >= 0.5) - i64::from(rest <= -0.5);
        // Every score and contribution: below ten million (the bound keeps
        // the rounded cents within 9 digits), written digit
        // by digit into a fixed block (no formatter, no copy call).
        let c = cents;
        let neg = c < 0;
        let c = c.unsigned_abs() as u32;
        let (mut int, frac) = (c / 100, (c % 100) as usize);
        let digits = match int {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            1_000..=9_999 => 4,
            10_000..=99_999 => 5,
            100_000..=999_999 => 6,
            _ => 7,
        };
        let mut b = [b'-'; 12];
        let start = usize::from(neg);
        for k in (start..start + digits).rev() {
            b[k] = b'0' + (int % 10) as u8;
            int /= 10;
        }
        let dot = start + digits;
        b[dot] = b'.';
        b[dot + 1..dot + 3].copy_from_slice(&crate::timestamp::DIGIT_PAIRS[frac]);
        // `55.0`, not `55.00`; `0.07` keeps both digits.
        let len = dot + if frac % 10 == 0 { 2 } else { 3 };
        extend_block(out, &b, len);
        return;
    }
    let cents = y.round();
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

/// Appends the first `len` bytes of `block`: the whole block is copied
/// (a fixed size: a move or two, where a slice of variable length is a
/// call to memcpy) and the vector's length then set past the `len` bytes.
#[inline(always)]
fn extend_block<const N: usize>(out: &mut Vec<u8>, block: &[u8; N], len: usize) {
    let len = len.min(N);
    out.reserve(N);
    // SAFETY: `reserve` made room for N more bytes past the length, which
    // `block`, another object, cannot overlap; the first `len` of them
    // (len <= N) are then initialised.
    unsafe {
        std::ptr::copy_nonoverlapping(block.as_ptr(), out.as_mut_ptr().add(out.len()), N);
        out.set_len(out.len() + len);
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
            tiers: model
                .tiers
                .iter()
                .map(|t| Name::new(json_str(&t.name).into_bytes()))
                .collect(),
            activities: model
                .activities
                .iter()
                .map(|a| Name::new(format!("{}:", json_str(&a.name)).into_bytes()))
                .collect(),
        }
    }

    #[inline]
    fn push_tier(&self, out: &mut Vec<u8>, tier: u8) {
        match self.tiers.get(usize::from(tier)) {
            Some(name) => name.push(out),
            None => out.extend_from_slice(b"null"),
        }
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
                self.push_tier(out, signal.tier);
                out.extend_from_slice(b",\"previous_tier\":");
                self.push_tier(out, previous_tier);
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
                        name.push(out);
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
                self.push_tier(out, signal.tier);
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
                self.push_tier(out, signal.tier);
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
    fn scores_of_every_magnitude_print_like_ryu() {
        // Every number of cents near each power of ten up to the fast
        // path's bound and past it, and fractions that round either way.
        let mut xs = Vec::new();
        for p in 0..12 {
            let base = 10f64.powi(p);
            for d in -120i32..120 {
                xs.push((base + f64::from(d)) / 100.0);
                xs.push(-(base + f64::from(d)) / 100.0);
            }
        }
        for i in 0..20_000 {
            xs.push(f64::from(i) * 0.0137 - 120.0);
        }
        for x in xs {
            let mut out = Vec::new();
            push_score(&mut out, x);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(
                text.parse::<f64>().unwrap(),
                round2(x),
                "{x} printed as {text}"
            );
            if round2(x).abs() < 1e13 {
                let expected = ryu::Buffer::new().format(round2(x)).to_string();
                // ryu writes -0.0 for a negative zero; scores have no sign there.
                let expected = if expected == "-0.0" {
                    "0.0".to_string()
                } else {
                    expected
                };
                assert_eq!(text, expected, "{x}");
            }
        }
    }

    #[test]
    fn names_longer_than_the_copy_block_are_written_whole() {
        // Activity names on both sides of the 48-byte block (with quotes
        // and colon), and one with a character JSON must escape.
        let names = [
            "a".repeat(45),
            "b".repeat(46),
            "c".repeat(47),
            "d".repeat(80),
            "e\"f".to_string(),
        ];
        let mut toml = String::from("[scoring.activities]\n");
        for n in &names {
            toml.push_str(&format!(
                "{} = {{ weight = 1.0 }}\n",
                serde_json::to_string(n).unwrap()
            ));
        }
        let model = crate::config::Settings::from_toml(&toml, std::path::Path::new("t.toml"))
            .unwrap()
            .model;
        let contributions: Vec<f64> = (0..names.len()).map(|i| i as f64 + 1.0).collect();
        let mut out = Vec::new();
        Encoder::new(&model).encode(
            &Signal {
                customer_id: "c-1",
                at: 0,
                score: 10.0,
                tier: 0,
                kind: SignalKind::ScoreChanged {
                    previous_score: 0.0,
                    previous_tier: 0,
                    cause: Cause::Event,
                    event_id: None,
                    contributions: &contributions,
                },
            },
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for (i, a) in model.activities.iter().enumerate() {
            assert_eq!(
                v["contributions"][&*a.name],
                serde_json::json!(i as f64 + 1.0),
                "{}",
                a.name
            );
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
