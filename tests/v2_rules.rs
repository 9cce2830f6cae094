//! The rules v2 of the spec adds, one at a time, through `replay`:
//! de-duplication (section 1), erasure requests (sections 1 and 6), tier
//! hysteresis (section 5, step 1) and forgetting idle customers (section 8),
//! with their edge cases.
//!
//! As in `scoring_rules.rs`, linear normalization (`score = raw`) and
//! events at one instant keep the expected numbers exact.

mod common;

use std::sync::Arc;

use ces_stream::event::{self, InvalidReason, Parsed};
use ces_stream::model::Model;
use common::*;
use serde_json::{json, Value};

/// Linear scores, a one-day half-life; `extra` adds or overrides sections.
fn linear(extra: &str) -> String {
    format!(
        r#"
[scoring]
half_life = "1d"
{forget}
[scoring.normalization]
kind = "linear"
max = 100.0
[scoring.activities]
visit = {{ weight = 1.0, channel = "web" }}
half = {{ weight = 0.5, channel = "web" }}
drop = {{ weight = -0.5, channel = "web" }}
big = {{ weight = 41.0, channel = "shop" }}
huge = {{ weight = 80.0, channel = "shop" }}
{extra}
"#,
        forget = if extra.contains("FORGET") {
            "forget_after = \"2h\""
        } else {
            ""
        },
        extra = extra.replace("FORGET", ""),
    )
}

const EVERY_EVAL: &str = "[signals]\nsweep_interval = \"100000d\"\nmin_delta = 0.0\n";

fn scores(outputs: &[Value]) -> Vec<f64> {
    of_kind(outputs, "score_changed")
        .iter()
        .map(|o| f(&o["score"]))
        .collect()
}

fn with_id(customer: &str, kind: &str, t: i64, id: &str) -> String {
    ev_with(customer, kind, t, json!({ "event_id": id }))
}

fn dedup(depth: usize) -> Arc<Model> {
    model(&linear(&format!(
        "{EVERY_EVAL}[input]\ndedup_depth = {depth}\n"
    )))
}

// --- De-duplication ---------------------------------------------------------

#[test]
fn a_repeated_event_id_is_a_duplicate_and_changes_nothing() {
    let m = dedup(4);
    let (out, dead, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "b"),
        ],
    );
    assert!(dead.is_empty());
    assert_eq!(summary.accepted, 2);
    assert_eq!(
        summary.ignored_count(event::IgnoreReason::Duplicate),
        1,
        "{summary:?}"
    );
    assert_eq!(scores(&out), [1.0, 2.0]);
}

#[test]
fn only_the_last_depth_ids_are_remembered() {
    // Depth 2: after a, b, c the customer remembers c and b; a counts again.
    let m = dedup(2);
    let (out, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "b"),
            with_id("c", "visit", T0, "c"),
            with_id("c", "visit", T0, "b"), // duplicate
            with_id("c", "visit", T0, "c"), // duplicate
            with_id("c", "visit", T0, "a"), // beyond the depth: accepted
        ],
    );
    assert_eq!(summary.accepted, 4);
    assert_eq!(summary.ignored_count(event::IgnoreReason::Duplicate), 2);
    assert_eq!(scores(&out), [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn a_duplicate_is_not_remembered_again() {
    // Depth 2: a, b, a (duplicate), c leaves [c, b]: a is accepted again.
    // Had the duplicate been remembered, the memory would be [c, a].
    let m = dedup(2);
    let (_, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "b"),
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "c"),
            with_id("c", "visit", T0, "a"),
        ],
    );
    assert_eq!(summary.accepted, 4);
    assert_eq!(summary.ignored_count(event::IgnoreReason::Duplicate), 1);
}

#[test]
fn events_without_an_id_are_never_duplicates_and_depth_0_turns_it_off() {
    let m = dedup(4);
    let (_, _, summary) = replay_lines(&m, &[ev("c", "visit", T0), ev("c", "visit", T0)]);
    assert_eq!(summary.accepted, 2);
    let m = dedup(0);
    let (out, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0, "a"),
        ],
    );
    assert_eq!(summary.accepted, 2);
    assert_eq!(scores(&out), [1.0, 2.0]);
}

#[test]
fn native_and_segment_ids_share_one_namespace_per_customer() {
    let mut toml = linear(EVERY_EVAL);
    toml.push_str("[input.segment_events]\n\"Visited\" = \"visit\"\n");
    let m = model(&toml);
    let segment = |user: &str, id: &str| {
        json!({"type": "track", "event": "Visited", "userId": user, "messageId": id,
               "timestamp": T0})
        .to_string()
    };
    let (_, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "x"),
            segment("c", "x"),     // the same id for the same customer
            segment("other", "x"), // another customer remembers nothing
        ],
    );
    assert_eq!(summary.accepted, 2);
    assert_eq!(summary.ignored_count(event::IgnoreReason::Duplicate), 1);
}

#[test]
fn a_duplicate_that_would_have_crossed_a_sweep_boundary_sweeps_nothing() {
    // Hourly sweeps. The retry of `a` carries a timestamp three hours
    // later: as a duplicate it moves no watermark, so no sweep runs, and
    // the next on-time event is not too late either.
    let m = model(&linear(
        "[signals]\nsweep_interval = \"1h\"\nmin_delta = 0.0\n[input]\nmax_lateness = \"1h\"\n",
    ));
    let (out, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0 + 3 * HOUR, "a"),
            with_id("d", "visit", T0 + 30 * 60_000, "b"),
        ],
    );
    assert_eq!(summary.ignored_count(event::IgnoreReason::Duplicate), 1);
    assert_eq!(summary.ignored_count(event::IgnoreReason::TooLate), 0);
    assert_eq!(summary.accepted, 2);
    assert!(
        out.iter().all(|o| o["cause"] != "decay"),
        "a sweep ran: {out:?}"
    );
}

#[test]
fn too_late_and_unknown_activity_come_before_duplicate() {
    let m = model(&linear(&format!(
        "{EVERY_EVAL}[input]\nmax_lateness = \"1h\"\n"
    )));
    let (_, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "visit", T0 - 2 * HOUR, "old"),
            with_id("c", "visit", T0, "a"),
            with_id("c", "visit", T0 - 2 * HOUR, "old"), // too late first
            with_id("c", "unheard_of", T0, "a"),         // unknown first
        ],
    );
    assert_eq!(summary.ignored_count(event::IgnoreReason::TooLate), 1);
    assert_eq!(
        summary.ignored_count(event::IgnoreReason::UnknownActivity),
        1
    );
    assert_eq!(summary.ignored_count(event::IgnoreReason::Duplicate), 0);
}

// --- Erasure requests --------------------------------------------------------

#[test]
fn erasing_a_known_customer_emits_customer_erased_at_the_watermark() {
    let m = model(&linear(EVERY_EVAL));
    let (out, dead, summary) = replay_lines(
        &m,
        &[
            with_id("c", "big", T0, "a"),
            ev("d", "visit", T0 + HOUR),
            json!({"erase": "c"}).to_string(),
            json!({"erase": "never-seen"}).to_string(),
        ],
    );
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(summary.erasures, 2);
    let erased = of_kind(&out, "customer_erased");
    assert_eq!(erased.len(), 1, "{out:?}");
    assert_eq!(
        *erased[0],
        json!({"schema": "ces.v1", "kind": "customer_erased", "customer_id": "c",
               "at": "2026-11-20T01:00:00.000Z"})
    );
    assert_eq!(summary.customers, 1);
}

#[test]
fn an_erased_customer_starts_anew_and_its_ids_are_forgotten() {
    let m = dedup(4);
    let (out, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "big", T0, "a"),
            json!({"erase": "c"}).to_string(),
            with_id("c", "visit", T0, "a"), // not a duplicate any more
        ],
    );
    assert_eq!(summary.accepted, 2);
    let changed = of_kind(&out, "score_changed");
    // The new customer starts from a score of 0 and the lowest tier.
    assert_eq!(f(&changed[1]["previous_score"]), 0.0);
    assert_eq!(changed[1]["previous_tier"], "very_disengaged");
    assert_eq!(f(&changed[1]["score"]), 1.0);
}

#[test]
fn an_erasure_moves_no_watermark_and_sweeps_nothing() {
    let m = model(&linear(
        "[signals]\nsweep_interval = \"1h\"\nmin_delta = 0.0\n",
    ));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "visit", T0),
            json!({"erase": "d"}).to_string(),
            ev("c", "visit", T0 + 10 * 60_000),
        ],
    );
    assert!(out.iter().all(|o| o["cause"] != "decay"), "{out:?}");
}

#[test]
fn malformed_erasure_requests_are_dead_lettered_in_spec_order() {
    let m = model(&linear(EVERY_EVAL));
    let long = "x".repeat(257);
    let (_, dead, summary) = replay_lines(
        &m,
        &[
            json!({"erase": ""}).to_string(),
            json!({"erase": 5}).to_string(),
            json!({"erase": null}).to_string(),
            json!({"erase": long}).to_string(),
            // An erasure whatever other keys say: not a visit of c.
            json!({"erase": 7, "customer_id": "c", "type": "visit", "timestamp": T0}).to_string(),
            r#"{"erase": "c""#.to_string(),
        ],
    );
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "invalid_customer_id",
            "invalid_customer_id",
            "invalid_customer_id",
            "invalid_customer_id",
            "invalid_customer_id",
            "invalid_json"
        ]
    );
    assert_eq!(summary.accepted, 0);
    assert_eq!(summary.erasures, 0);
}

#[test]
fn an_erase_key_wins_whatever_the_input_format() {
    let m = model(&linear(&format!(
        "{EVERY_EVAL}[input]\nformat = \"segment\"\n"
    )));
    let (out, dead, summary) = replay_lines(
        &m,
        &[
            json!({"type": "track", "event": "visit", "userId": "c", "timestamp": T0}).to_string(),
            json!({"erase": "c", "userId": "c", "type": "page"}).to_string(),
        ],
    );
    assert!(dead.is_empty());
    assert_eq!(summary.erasures, 1);
    assert_eq!(of_kind(&out, "customer_erased").len(), 1);
}

#[test]
fn kafka_tombstones_are_erasure_requests_by_key() {
    match event::parse_tombstone(Some(b"c-42")) {
        Parsed::Erase(id) => assert_eq!(id, "c-42"),
        other => panic!("{other:?}"),
    }
    let reason = |p: Parsed<'_>| match p {
        Parsed::Invalid(i) => i.reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        reason(event::parse_tombstone(None)),
        InvalidReason::MissingCustomerId
    );
    assert_eq!(
        reason(event::parse_tombstone(Some(b""))),
        InvalidReason::InvalidCustomerId
    );
    assert_eq!(
        reason(event::parse_tombstone(Some(b"caf\xe9"))),
        InvalidReason::InvalidCustomerId
    );
    assert_eq!(
        reason(event::parse_tombstone(Some(&[b'x'; 257][..]))),
        InvalidReason::InvalidCustomerId
    );
}

// --- Tier hysteresis ---------------------------------------------------------

fn hysteresis(h: f64) -> Arc<Model> {
    model(&linear(&format!(
        "[signals]\nsweep_interval = \"100000d\"\nmin_delta = 0.0\ntier_hysteresis = {h}\n"
    )))
}

/// `n` events of `kind` for customer c at T0.
fn repeat(kind: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| ev("c", kind, T0)).collect()
}

fn tiers(outputs: &[Value]) -> Vec<(f64, String)> {
    of_kind(outputs, "score_changed")
        .iter()
        .map(|o| (f(&o["score"]), o["tier"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn hysteresis_moves_up_only_past_the_bound_plus_h() {
    // Bound 40, h = 2: 41 and 42 stay very_disengaged, 42.5 moves up.
    let m = hysteresis(2.0);
    let mut lines = repeat("visit", 42);
    lines.push(ev("c", "half", T0));
    let (out, _, _) = replay_lines(&m, &lines);
    let t = tiers(&out);
    assert_eq!(t[40], (41.0, "very_disengaged".into()));
    assert_eq!(t[41], (42.0, "very_disengaged".into()));
    assert_eq!(t[42], (42.5, "somewhat_engaged".into()));
}

#[test]
fn hysteresis_moves_down_only_past_the_bound_minus_h() {
    // From somewhat_engaged at 43: 39, 38.5 stay; 38 (38 + 2 <= 40) moves down.
    let m = hysteresis(2.0);
    let mut lines = repeat("visit", 43);
    lines.extend(repeat("drop", 8)); // 39.0
    lines.push(ev("c", "drop", T0)); // 38.5
    lines.push(ev("c", "drop", T0)); // 38.0
    let (out, _, _) = replay_lines(&m, &lines);
    let t = tiers(&out);
    let n = t.len();
    assert_eq!(t[n - 3], (39.0, "somewhat_engaged".into()));
    assert_eq!(t[n - 2], (38.5, "somewhat_engaged".into()));
    assert_eq!(t[n - 1], (38.0, "very_disengaged".into()));
}

#[test]
fn hysteresis_applies_at_the_first_evaluation() {
    // A new customer's emitted tier is the lowest: 41 is not enough.
    let m = hysteresis(2.0);
    let (out, _, _) = replay_lines(&m, &[ev("c", "big", T0)]);
    assert_eq!(tiers(&out), [(41.0, "very_disengaged".into())]);
    let m = hysteresis(0.5);
    let (out, _, _) = replay_lines(&m, &[ev("c", "big", T0)]);
    assert_eq!(tiers(&out), [(41.0, "somewhat_engaged".into())]);
}

#[test]
fn churn_rules_and_state_dumps_use_the_hysteresis_tier() {
    // Engaged at 43, back down to 39: still somewhat_engaged, so no
    // lowest_tier churn signal (without hysteresis there would be one).
    let with = hysteresis(2.0);
    let without = hysteresis(0.0);
    let mut lines = repeat("visit", 43);
    lines.extend(repeat("drop", 8));
    let (out, _, _) = replay_lines(&with, &lines);
    assert!(of_kind(&out, "churn_risk").is_empty(), "{out:?}");
    let (out, _, _) = replay_lines(&without, &lines);
    assert_eq!(of_kind(&out, "churn_risk").len(), 1);

    // The final state names the hysteresis tier too.
    let input = lines.join("\n");
    let (engine, _) = ces_stream::replay::replay(
        Arc::clone(&with),
        input.as_bytes(),
        std::io::sink(),
        None,
        None,
    )
    .unwrap();
    let view = engine.view("c", T0).unwrap();
    assert_eq!(view.score, 39.0);
    assert_eq!(with.tier_name(view.tier), "somewhat_engaged");
}

// --- Forgetting idle customers -----------------------------------------------

/// Hourly sweeps, every evaluation emitted, customers forgotten after 2h.
fn forgetting() -> Arc<Model> {
    model(&linear(
        "FORGET[signals]\nsweep_interval = \"1h\"\nmin_delta = 0.0\n[signals.churn]\ninactivity = \"2h\"\n",
    ))
}

#[test]
fn a_sweep_forgets_customers_silent_for_forget_after_exactly() {
    let m = forgetting();
    // c's last event is at T0. The sweep at T0+1h keeps it; the sweep at
    // T0+2h (T - last = 2h, not less) evaluates it, then removes it.
    // d's last event is 1 ms later: kept at T0+2h.
    let (out, _, summary) = replay_lines(
        &m,
        &[
            ev("c", "huge", T0),
            ev("d", "huge", T0 + 1),
            ev("e", "visit", T0 + HOUR),
            ev("e", "visit", T0 + 2 * HOUR),
        ],
    );
    assert_eq!(summary.forgotten, 1);
    assert_eq!(summary.customers, 2);
    // Evaluated as usual before the removal: its decay signal and its
    // inactivity churn signal at T0+2h are there.
    let at = "2026-11-20T02:00:00.000Z";
    let c_at: Vec<&Value> = out
        .iter()
        .filter(|o| o["customer_id"] == "c" && o["at"] == at)
        .collect();
    assert_eq!(c_at[0]["kind"], "score_changed");
    assert_eq!(c_at[0]["cause"], "decay");
    assert_eq!(c_at[1]["kind"], "churn_risk");
    assert_eq!(c_at[1]["reasons"], json!(["inactive"]));
}

#[test]
fn a_forgotten_customer_starts_anew() {
    let m = forgetting();
    let (out, _, summary) = replay_lines(
        &m,
        &[
            with_id("c", "big", T0, "a"),
            ev("e", "visit", T0 + 2 * HOUR),
            with_id("c", "visit", T0 + 2 * HOUR, "a"), // memory gone: accepted
        ],
    );
    assert_eq!(summary.forgotten, 1);
    assert_eq!(summary.accepted, 3);
    let last = of_kind(&out, "score_changed")
        .last()
        .copied()
        .unwrap()
        .clone();
    assert_eq!(last["customer_id"], "c");
    assert_eq!(f(&last["previous_score"]), 0.0);
    assert_eq!(f(&last["score"]), 1.0);
    // Its old churn state is gone too: no churn_risk_cleared for it.
    assert!(of_kind(&out, "churn_risk_cleared").is_empty());
}

#[test]
fn forgetting_keeps_the_other_customers_intact() {
    // Many customers, every other one silent: after the removals (each
    // moves the last record into the freed place) the survivors' state is
    // what it would be had the others never existed.
    let m = forgetting();
    let mut lines = Vec::new();
    let mut survivors = Vec::new();
    for i in 0..200 {
        let id = format!("customer-with-a-long-id-{i}");
        lines.push(ev(&id, "big", T0));
        if i % 2 == 1 {
            survivors.push(id);
        }
    }
    for id in &survivors {
        lines.push(ev(id, "visit", T0 + 90 * 60_000));
    }
    lines.push(ev("tick", "visit", T0 + 2 * HOUR));
    let (_, _, summary) = replay_lines(&m, &lines);
    assert_eq!(summary.forgotten, 100);

    let input = lines.join("\n");
    let (engine, _) = ces_stream::replay::replay(
        Arc::clone(&m),
        input.as_bytes(),
        std::io::sink(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(engine.customers().len(), 101);
    for id in &survivors {
        let v = engine.view(id, T0 + 2 * HOUR).expect("survivor kept");
        // 41 at T0 and 1 at T0+90m, both seen from T0+2h.
        let expected = 41.0 * 0.5f64.powf(2.0 / 24.0) + 0.5f64.powf(0.5 / 24.0);
        assert_close(v.score, expected);
    }
    for i in (0..200).step_by(2) {
        assert!(engine
            .view(&format!("customer-with-a-long-id-{i}"), T0)
            .is_none());
    }
}

#[test]
fn quiet_customers_are_still_forgotten_on_time() {
    // Fully decayed customers are skipped by sweeps (nothing can change
    // for them), but not the sweep that must forget them.
    let m = model(&linear("FORGET[signals]\nsweep_interval = \"10m\"\n"));
    let mut lines = vec![ev("c", "visit", T0)];
    for k in 1..=13 {
        lines.push(ev("tick", "visit", T0 + k * 10 * 60_000));
    }
    let (_, _, summary) = replay_lines(&m, &lines);
    // Sweeps up to T0+1h50 keep c; the one at T0+2h forgets it.
    assert_eq!(summary.forgotten, 1);
    let (_, _, summary) = replay_lines(&m, &lines[..12]);
    assert_eq!(summary.forgotten, 0);
}

// --- Values ------------------------------------------------------------------

#[test]
fn values_above_1e12_are_invalid() {
    let m = model(&linear(EVERY_EVAL));
    let (_, dead, summary) = replay_lines(
        &m,
        &[
            r#"{"customer_id":"c","type":"visit","timestamp":1795132800000,"value":1e12}"#.into(),
            r#"{"customer_id":"c","type":"visit","timestamp":1795132800000,"value":1000000000001}"#
                .into(),
            r#"{"customer_id":"c","type":"visit","timestamp":1795132800000,"value":1e40}"#.into(),
        ],
    );
    assert_eq!(summary.accepted, 1);
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["invalid_value", "invalid_value"]);
}
