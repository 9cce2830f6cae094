//! Property tests of the scoring core: order independence, invalid events
//! leave no trace, scores stay within [0, 100]; and for v2, retries within
//! the de-duplication depth leave no trace, and with tier hysteresis a
//! score moving within h of a bound never changes the tier. Sweeps that
//! skip quiet customers emit exactly what evaluating everyone emits.

mod common;

use std::sync::Arc;

use ces_stream::engine::Engine;
use ces_stream::model::Model;
use ces_stream::replay;
use common::*;
use proptest::prelude::*;
use serde_json::json;

const ACTIVITIES: [&str; 8] = [
    "page_view",
    "purchase",
    "renewal",
    "unsubscribe",
    "nps_response",
    "support_ticket",
    "social_share",
    "webinar", // not configured
];

#[derive(Debug, Clone)]
struct Ev {
    customer: u8,
    activity: usize,
    offset: i64,
    value: Option<f64>,
    channel: Option<&'static str>,
}

impl Ev {
    fn line(&self) -> String {
        let mut v = json!({
            "customer_id": format!("c{}", self.customer),
            "type": ACTIVITIES[self.activity],
            "timestamp": T0 + self.offset,
        });
        if let Some(x) = self.value {
            v["value"] = json!(x);
        }
        if let Some(c) = self.channel {
            v["channel"] = json!(c);
        }
        v.to_string()
    }
}

fn event() -> impl Strategy<Value = Ev> {
    (
        0u8..6,
        0..ACTIVITIES.len(),
        // Within 20 days: never too late under the default 30d lateness.
        0i64..20 * DAY,
        prop::option::of(prop_oneof![0.0..20.0f64, 0.0..1e6f64]),
        prop::option::of(prop::sample::select(vec!["web", "email", "social", "tv"])),
    )
        .prop_map(|(customer, activity, offset, value, channel)| Ev {
            customer,
            activity,
            offset,
            value,
            channel,
        })
}

/// Ways to break a valid event so that it must be dead-lettered.
fn corrupt(line: &str, how: u8) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    match how % 8 {
        0 => return line[..line.len() / 2].to_string(),
        1 => return format!("[{line}]"),
        2 => {
            v.as_object_mut().unwrap().remove("customer_id");
        }
        3 => v["customer_id"] = json!(""),
        4 => v["type"] = json!(null),
        5 => v["timestamp"] = json!("2026-02-30T00:00:00Z"),
        6 => v["value"] = json!(-0.5),
        _ => v["value"] = json!("12"),
    }
    v.to_string()
}

fn run(model: &Arc<Model>, lines: &[String]) -> (Engine, Vec<u8>) {
    let mut out = Vec::new();
    let (engine, _) = replay::replay(
        Arc::clone(model),
        lines.join("\n").as_bytes(),
        &mut out,
        None,
        None,
    )
    .unwrap();
    (engine, out)
}

fn final_scores(engine: &Engine, at: i64) -> Vec<(String, f64, u8)> {
    let mut v: Vec<_> = (0..6)
        .filter_map(|c| engine.view(&format!("c{c}"), at))
        .map(|view| (view.customer_id, view.score, view.tier))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A model where every rule of section 5 is close at hand: small deltas,
/// hysteresis, a short churn lookback and inactivity, a diversity window
/// of two days, forgetting after ten days.
const TIGHT: &str = r#"
[scoring]
half_life = "3d"
forget_after = "10d"
[scoring.normalization]
kind = "saturating"
half_score_at = 20.0
[scoring.activities]
page_view = { weight = 1.0, cap = 6.0, channel = "web" }
purchase = { weight = 10.0, value_weight = 0.05, cap = 30.0, channel = "commerce" }
renewal = { weight = 25.0, channel = "commerce" }
unsubscribe = { weight = -15.0, channel = "email" }
nps_response = { weight = -10.0, value_weight = 2.0, channel = "feedback" }
support_ticket = { weight = -3.0, channel = "support" }
social_share = { weight = 5.0, cap = 20.0, channel = "social" }
[scoring.diversity]
window = "2d"
bonus_per_channel = 0.1
max_channels = 4
[signals]
min_delta = 0.5
sweep_interval = "1h"
tier_hysteresis = 1.5
[signals.churn]
lookback = "2d"
drop_ratio = 0.3
min_peak = 10.0
inactivity = "4d"
"#;

fn run_sweeping_everyone(model: &Arc<Model>, lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut engine = Engine::new(Arc::clone(model)).evaluating_every_sweep();
    replay::replay_into(
        &mut engine,
        lines.join("\n").as_bytes(),
        &mut out,
        None,
        None,
    )
    .unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn skipping_quiet_customers_changes_no_output(
        mut events in prop::collection::vec(event(), 1..80),
        tight in any::<bool>(),
    ) {
        // In time order, so that the watermark crosses many boundaries.
        events.sort_by_key(|e| e.offset);
        let m = if tight { model(TIGHT) } else { default_model() };
        let lines: Vec<String> = events.iter().map(Ev::line).collect();
        let (_, skipping) = run(&m, &lines);
        let everyone = run_sweeping_everyone(&m, &lines);
        prop_assert_eq!(
            String::from_utf8_lossy(&skipping),
            String::from_utf8_lossy(&everyone)
        );
    }

    #[test]
    fn final_scores_do_not_depend_on_event_order(
        events in prop::collection::vec(event(), 1..60),
        seed in any::<u64>(),
    ) {
        let m = default_model();
        let lines: Vec<String> = events.iter().map(Ev::line).collect();
        let mut shuffled = lines.clone();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let at = T0 + 21 * DAY;
        let (a, _) = run(&m, &lines);
        let (b, _) = run(&m, &shuffled);
        let (sa, sb) = (final_scores(&a, at), final_scores(&b, at));
        prop_assert_eq!(sa.len(), sb.len());
        for (x, y) in sa.iter().zip(&sb) {
            prop_assert_eq!(&x.0, &y.0);
            prop_assert!((x.1 - y.1).abs() < 1e-3, "{} vs {}", x.1, y.1);
        }
    }

    #[test]
    fn invalid_events_change_nothing(
        events in prop::collection::vec(event(), 1..40),
        bad in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..10),
    ) {
        let m = default_model();
        let lines: Vec<String> = events.iter().map(Ev::line).collect();
        let mut mixed = lines.clone();
        for (at, how) in &bad {
            let source = &lines[at.index(lines.len())];
            let pos = at.index(mixed.len() + 1);
            mixed.insert(pos, corrupt(source, *how));
        }
        let (a, out_a) = run(&m, &lines);
        let (b, out_b) = run(&m, &mixed);
        prop_assert_eq!(String::from_utf8(out_a).unwrap(), String::from_utf8(out_b).unwrap());
        let at = T0 + 25 * DAY;
        prop_assert_eq!(final_scores(&a, at), final_scores(&b, at));
        prop_assert_eq!(a.watermark(), b.watermark());
    }

    #[test]
    fn scores_stay_within_0_and_100(
        events in prop::collection::vec(event(), 1..80),
        huge in prop::collection::vec((0u8..6, prop_oneof![Just(1e12f64), Just(1e300f64), Just(f64::MAX), 1e30..1e40f64]), 0..4),
    ) {
        let m = default_model();
        let mut lines: Vec<String> = events.iter().map(Ev::line).collect();
        for (c, v) in huge {
            lines.push(json!({"customer_id": format!("c{c}"), "type": "purchase", "timestamp": T0, "value": v}).to_string());
            lines.push(json!({"customer_id": format!("c{c}"), "type": "nps_response", "timestamp": T0, "value": v}).to_string());
        }
        let (engine, out) = run(&m, &lines);
        for o in parse_jsonl(&out) {
            let s = f(&o["score"]);
            prop_assert!((0.0..=100.0).contains(&s), "{o}");
            if let Some(p) = o.get("previous_score") {
                prop_assert!((0.0..=100.0).contains(&f(p)), "{o}");
            }
        }
        for (_, s, _) in final_scores(&engine, T0 + 40 * DAY) {
            prop_assert!((0.0..=100.0).contains(&s));
        }
    }

    #[test]
    fn retries_within_the_dedup_depth_change_no_output(
        events in prop::collection::vec(event(), 1..60),
        retries in prop::collection::vec((any::<prop::sample::Index>(), 0usize..4), 1..15),
    ) {
        // Every event carries an id; a retry is a copy of one, sent again
        // after at most 3 later lines: fewer than the default depth (4) of
        // events of its customer come in between.
        let m = default_model();
        let lines: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut v: serde_json::Value = serde_json::from_str(&e.line()).unwrap();
                v["event_id"] = json!(format!("e-{i}"));
                v.to_string()
            })
            .collect();
        let mut after: Vec<Vec<String>> = vec![Vec::new(); lines.len()];
        for (at, delay) in &retries {
            let i = at.index(lines.len());
            let j = (i + delay).min(lines.len() - 1);
            after[j].push(lines[i].clone());
        }
        let mut with_retries = Vec::new();
        for (line, extra) in lines.iter().zip(&after) {
            with_retries.push(line.clone());
            with_retries.extend(extra.iter().cloned());
        }
        let (a, out_a) = run(&m, &lines);
        let (b, out_b) = run(&m, &with_retries);
        prop_assert_eq!(String::from_utf8(out_a).unwrap(), String::from_utf8(out_b).unwrap());
        let at = T0 + 25 * DAY;
        prop_assert_eq!(final_scores(&a, at), final_scores(&b, at));
        prop_assert_eq!(a.watermark(), b.watermark());
    }

    #[test]
    fn a_score_within_h_of_a_bound_never_changes_the_tier(
        moves in prop::collection::vec(any::<bool>(), 1..120),
        from_above in any::<bool>(),
    ) {
        // Linear scores in steps of 0.5 at one instant; bound 40, h = 2.
        // From above (42.5, somewhat_engaged) the score then wanders in
        // [38.5, 42.5]; from below (37.5, very_disengaged) in [37.5, 42].
        let m = model(r#"
[scoring.normalization]
kind = "linear"
max = 100.0
[scoring.activities]
up = { weight = 0.5 }
down = { weight = -0.5 }
[signals]
sweep_interval = "100000d"
min_delta = 0.0
tier_hysteresis = 2.0
"#);
        let (start, low, high) = if from_above { (85, 77, 85) } else { (75, 75, 84) };
        let mut lines: Vec<String> = (0..start).map(|_| ev("c", "up", T0)).collect();
        let mut halves = start;
        for up in moves {
            let next = if up { halves + 1 } else { halves - 1 };
            if (low..=high).contains(&next) {
                halves = next;
                lines.push(ev("c", if up { "up" } else { "down" }, T0));
            }
        }
        let (_, out) = run(&m, &lines);
        let outputs = parse_jsonl(&out);
        let expected = if from_above { "somewhat_engaged" } else { "very_disengaged" };
        for o in &outputs[start..] {
            prop_assert_eq!(o["kind"].as_str(), Some("score_changed"), "{}", o);
            prop_assert_eq!(o["tier"].as_str(), Some(expected), "{}", o);
            prop_assert_eq!(o["previous_tier"].as_str(), Some(expected), "{}", o);
        }
    }
}
