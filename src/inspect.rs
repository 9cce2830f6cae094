//! Per-customer state as JSONL, for operators and for comparisons:
//! `ces-stream inspect` prints what the snapshot store would restore,
//! `ces-stream replay --final-state` what a replay ends with, in the same
//! form, so that the two can be compared line by line.

use std::io::{self, Write};

use crate::engine::{CustomerView, Engine};
use crate::model::Model;
use crate::output::{push_json_str, push_score, push_time};
use crate::timestamp::Millis;

/// Writes one customer's state at a time as a JSON line.
pub fn write_view(out: &mut Vec<u8>, model: &Model, view: &CustomerView, partition: Option<i32>) {
    out.extend_from_slice(b"{\"customer_id\":");
    push_json_str(out, &view.customer_id);
    if let Some(p) = partition {
        out.extend_from_slice(b",\"partition\":");
        out.extend_from_slice(itoa::Buffer::new().format(p).as_bytes());
    }
    out.extend_from_slice(b",\"at\":");
    push_time(out, view.at);
    out.extend_from_slice(b",\"score\":");
    push_score(out, view.score);
    out.extend_from_slice(b",\"tier\":");
    push_json_str(out, model.tier_name(view.tier));
    out.extend_from_slice(b",\"contributions\":{");
    let mut first = true;
    for (c, a) in view.contributions.iter().zip(&model.activities) {
        if c.abs() >= 0.005 {
            if !first {
                out.push(b',');
            }
            first = false;
            push_json_str(out, &a.name);
            out.push(b':');
            push_score(out, *c);
        }
    }
    out.extend_from_slice(b"},\"at_risk\":");
    out.extend_from_slice(if view.at_risk { b"true" } else { b"false" });
    out.extend_from_slice(b",\"peak_score\":");
    push_score(out, view.peak_score);
    out.extend_from_slice(b",\"last_event_at\":");
    push_time(out, view.last_event_at);
    out.extend_from_slice(b"}\n");
}

/// Writes every customer of an engine at `at`.
pub fn write_engine(
    out: &mut impl Write,
    engine: &Engine,
    at: Millis,
    partition: Option<i32>,
) -> io::Result<u64> {
    let model = engine.model();
    let mut buf = Vec::with_capacity(1 << 16);
    let n = engine.customers().len();
    for slot in 0..n as crate::customers::Slot {
        let view = engine.view_slot(slot, at);
        write_view(&mut buf, model, &view, partition);
        if buf.len() > 1 << 15 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    Ok(n as u64)
}
