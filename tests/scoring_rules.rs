//! Spec sections 2-6, one rule at a time, through `replay`.
//!
//! Most tests use linear normalization (`score = raw`) and events at one
//! instant or whole half-lives apart, so that expected scores are exact.

mod common;

use common::*;
use serde_json::json;

/// Linear scores, a one-day half-life, and sweeps far apart unless a test
/// sets them.
fn linear(extra: &str) -> String {
    format!(
        r#"
[scoring]
half_life = "1d"
[scoring.normalization]
kind = "linear"
max = 100.0
[scoring.activities]
visit = {{ weight = 1.0, cap = 15.0, channel = "web" }}
buy = {{ weight = 10.0, value_weight = 0.5, channel = "shop" }}
big = {{ weight = 41.0, channel = "shop" }}
unsub = {{ weight = -15.0, channel = "mail" }}
nps = {{ weight = -10.0, value_weight = 2.0, channel = "feedback" }}
noop = {{ channel = "web" }}
{extra}
"#
    )
}

const NO_SWEEPS: &str = "[signals]\nsweep_interval = \"100000d\"\n";
const EVERY_EVAL: &str = "[signals]\nsweep_interval = \"100000d\"\nmin_delta = 0.0\n";

fn scores(outputs: &[serde_json::Value]) -> Vec<f64> {
    of_kind(outputs, "score_changed")
        .iter()
        .map(|o| f(&o["score"]))
        .collect()
}

#[test]
fn caps_bound_an_activity_contribution() {
    let m = model(&linear(NO_SWEEPS));
    let lines: Vec<_> = (0..20).map(|_| ev("c", "visit", T0)).collect();
    let (out, _, summary) = replay_lines(&m, &lines);
    assert_eq!(summary.accepted, 20);
    assert_eq!(scores(&out), [5.0, 10.0, 15.0]);
    assert_eq!(out.last().unwrap()["contributions"], json!({"visit": 15.0}));
}

#[test]
fn value_weight_adds_points_per_unit_of_value() {
    let m = model(&linear(EVERY_EVAL));
    let (out, _, _) = replay_lines(
        &m,
        &[ev_with(
            "c",
            "buy",
            T0,
            json!({"value": 20, "event_id": "e-9"}),
        )],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(f(&out[0]["score"]), 20.0);
    assert_eq!(out[0]["contributions"], json!({"buy": 20.0}));
    assert_eq!(out[0]["event_id"], "e-9");
    assert_eq!(out[0]["cause"], "event");
}

#[test]
fn negative_weights_subtract_and_the_raw_value_floors_at_zero() {
    let m = model(&linear(EVERY_EVAL));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "unsub", T0),
            ev_with("c", "buy", T0, json!({"value": 20})),
            ev_with("c", "nps", T0, json!({"value": 0})),
        ],
    );
    assert_eq!(scores(&out), [0.0, 5.0, 0.0]);
    assert_eq!(
        out[1]["contributions"],
        json!({"buy": 20.0, "unsub": -15.0})
    );
    assert_eq!(
        out[2]["contributions"],
        json!({"buy": 20.0, "unsub": -15.0, "nps": -10.0})
    );
}

#[test]
fn decay_halves_points_every_half_life() {
    let m = model(&linear(EVERY_EVAL));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev_with("c", "buy", T0, json!({"value": 20})),
            ev("c", "visit", T0 + DAY),
            ev("c", "visit", T0 + 3 * DAY),
        ],
    );
    // 20 -> 10 + 1 -> 2.5 + 0.25 + 1
    assert_eq!(scores(&out), [20.0, 11.0, 3.75]);
    assert_eq!(out[2]["contributions"], json!({"buy": 2.5, "visit": 1.25}));
    assert_eq!(out[2]["at"], "2026-11-23T00:00:00.000Z");
}

#[test]
fn late_events_count_as_if_on_time() {
    let m = model(&linear(EVERY_EVAL));
    let in_order = [
        ev_with("c", "buy", T0, json!({"value": 20})),
        ev("c", "visit", T0 + DAY),
    ];
    let reversed = [in_order[1].clone(), in_order[0].clone()];
    let (a, _, _) = replay_lines(&m, &in_order);
    let (b, _, _) = replay_lines(&m, &reversed);
    assert_eq!(a.last().unwrap()["score"], b.last().unwrap()["score"]);
    assert_eq!(f(&b[1]["score"]), 11.0);
    // The late event is evaluated at the clock (the watermark), not at its own time.
    assert_eq!(b[1]["at"], "2026-11-21T00:00:00.000Z");
}

#[test]
fn diversity_multiplies_by_the_channels_active_in_the_window() {
    let m = model(&linear(&format!(
        "{EVERY_EVAL}[scoring.diversity]\nwindow = \"10d\"\nbonus_per_channel = 0.5\nmax_channels = 2\n"
    )));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "visit", T0),                               // web: 1
            ev("c", "buy", T0),                                 // + shop: (1 + 10) * 1.5
            ev_with("c", "nps", T0, json!({"value": 10})),      // 3 channels, max 2
            ev("d", "visit", T0),                               // d: web
            ev("d", "unsub", T0),                               // negative: mail does not count
            ev_with("d", "buy", T0, json!({"channel": "web"})), // own channel: still only web
        ],
    );
    assert_eq!(scores(&out), [1.0, 16.5, 31.5, 1.0, 0.0, 0.0]);
    let m2 = model(&linear(&format!(
        "{EVERY_EVAL}[scoring.diversity]\nwindow = \"10d\"\nbonus_per_channel = 0.5\nmax_channels = 2\n"
    )));
    // d: 1 + 10 - 15 = -4 -> 0 whatever the bonus; give d a second channel instead.
    let (out, _, _) = replay_lines(
        &m2,
        &[
            ev("d", "visit", T0),
            ev_with("d", "buy", T0, json!({"channel": "mail"})),
        ],
    );
    assert_eq!(scores(&out), [1.0, 16.5]);
}

#[test]
fn diversity_window_is_inclusive_and_measured_from_the_latest_positive_event() {
    let cfg = linear(&format!(
        "{EVERY_EVAL}[scoring.diversity]\nwindow = \"2d\"\nbonus_per_channel = 1.0\nmax_channels = 4\n"
    ));
    let m = model(&cfg);
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev_with("c", "buy", T0, json!({"value": 20})), // shop at T0: 20
            ev("c", "visit", T0 + 2 * DAY),                // shop still within 2d: (5 + 1) * 2
            ev("c", "noop", T0 + 2 * DAY + 1),             // shop out of the window: x1
        ],
    );
    let s = scores(&out);
    assert_eq!(s[0], 20.0);
    assert_eq!(s[1], 12.0);
    assert_close(s[2], 6.0);
}

#[test]
fn diversity_window_longer_than_49_days_is_exact() {
    // Windows that do not fit the compact u32 channel ages use wide times.
    let cfg = linear(&format!(
        "{EVERY_EVAL}[scoring.diversity]\nwindow = \"60d\"\nbonus_per_channel = 1.0\nmax_channels = 4\n"
    ));
    let cfg = cfg.replace("half_life = \"1d\"", "half_life = \"10000d\"");
    let m = model(&cfg);
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "big", T0),
            ev("c", "visit", T0 + 60 * DAY),
            ev("c", "noop", T0 + 60 * DAY + 1),
        ],
    );
    let s = scores(&out);
    assert!(s[1] > 80.0, "{s:?}"); // (41 + 1) * 2, slightly decayed
    assert!(s[2] < 45.0, "{s:?}"); // shop left the window
}

#[test]
fn saturating_normalization() {
    let m = model(
        "[scoring.activities]\nbig = { weight = 40.0 }\n[signals]\nmin_delta = 0.0\nsweep_interval = \"100000d\"\n",
    );
    let (out, _, _) = replay_lines(&m, &[ev("c", "big", T0), ev("c", "big", T0)]);
    assert_eq!(scores(&out), [50.0, 75.0]);
}

#[test]
fn linear_normalization_stops_at_100() {
    let m = model(&linear(EVERY_EVAL));
    let lines: Vec<_> = (0..3).map(|_| ev("c", "big", T0)).collect();
    let (out, _, _) = replay_lines(&m, &lines);
    assert_eq!(scores(&out), [41.0, 82.0, 100.0]);
    assert_eq!(out[2]["tier"], "very_engaged");
}

#[test]
fn tier_bounds_are_exclusive() {
    let m = model(&linear(EVERY_EVAL));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev_with("a", "buy", T0, json!({"value": 60})), // exactly 40
            ev("b", "big", T0),                            // 41
            ev_with("c", "buy", T0, json!({"value": 130})), // exactly 75
            ev_with("d", "buy", T0, json!({"value": 130.02})), // 75.01
        ],
    );
    let tiers: Vec<_> = out.iter().map(|o| o["tier"].as_str().unwrap()).collect();
    assert_eq!(
        tiers,
        [
            "very_disengaged",
            "somewhat_engaged",
            "somewhat_engaged",
            "very_engaged"
        ]
    );
    assert_eq!(scores(&out), [40.0, 41.0, 75.0, 75.01]);
}

#[test]
fn min_delta_or_a_tier_change_emits() {
    let m = model(&linear(NO_SWEEPS));
    let mut lines = vec![ev("c", "buy", T0)]; // 10: emitted
    lines.extend((0..4).map(|_| ev("c", "visit", T0))); // 11..14: below min_delta
    lines.push(ev("c", "visit", T0)); // 15: exactly min_delta
    lines.push(ev_with("c", "buy", T0, json!({"value": 30}))); // 40: tier unchanged, +25
    lines.push(ev("c", "noop", T0)); // nothing changes
    let (out, _, _) = replay_lines(&m, &lines);
    assert_eq!(scores(&out), [10.0, 15.0, 40.0]);
    assert_eq!(out[1]["previous_score"], 10.0);

    // A tier change emits even below min_delta: 39 -> 41 crosses 40.
    let m = model(&linear(NO_SWEEPS));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev_with("c", "buy", T0, json!({"value": 58})), // 39
            ev("c", "visit", T0),                          // 40: same tier, +1
            ev("c", "visit", T0),                          // 41: tier change, +2
        ],
    );
    assert_eq!(scores(&out), [39.0, 41.0]);
    assert_eq!(out[1]["previous_tier"], "very_disengaged");
    assert_eq!(out[1]["tier"], "somewhat_engaged");
}

#[test]
fn churn_risk_for_lowest_tier_then_cleared() {
    let m = model(&linear(NO_SWEEPS));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "big", T0),       // 41: engaged
            ev("c", "unsub", T0 + 5), // 26: lowest tier after being engaged
            ev("c", "big", T0 + 9),   // 67: back
        ],
    );
    let risk = of_kind(&out, "churn_risk");
    assert_eq!(risk.len(), 1);
    let r = risk[0];
    assert_eq!(r["reasons"], json!(["lowest_tier"]));
    assert_eq!(r["level"], "high");
    assert_eq!(r["tier"], "very_disengaged");
    assert_close(f(&r["score"]), 26.0);
    assert_close(f(&r["peak_score"]), 41.0);
    assert_eq!(r["last_event_at"], "2026-11-20T00:00:00.005Z");
    let cleared = of_kind(&out, "churn_risk_cleared");
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0]["tier"], "somewhat_engaged");
    assert_close(f(&cleared[0]["score"]), 67.0);
    // Order within one evaluation: score_changed first, then churn signals.
    let kinds: Vec<_> = out.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "score_changed",
            "score_changed",
            "churn_risk",
            "score_changed",
            "churn_risk_cleared"
        ]
    );
}

#[test]
fn a_customer_never_engaged_is_not_at_risk() {
    let m = model(&linear(NO_SWEEPS));
    let (out, _, _) = replay_lines(&m, &[ev("c", "buy", T0), ev("c", "unsub", T0)]);
    assert!(of_kind(&out, "churn_risk").is_empty());
}

#[test]
fn churn_risk_for_a_score_drop_from_the_peak() {
    let m = model(&linear(NO_SWEEPS));
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("c", "big", T0),
            ev("c", "big", T0), // peak 82
            // 0.9 half-lives later: 82 * 2^-0.9 = 44.06 <= 82 * 0.6, still above 40.
            ev("c", "noop", T0 + 9 * DAY / 10),
        ],
    );
    let risk = of_kind(&out, "churn_risk");
    assert_eq!(risk.len(), 1, "{out:?}");
    assert_eq!(risk[0]["reasons"], json!(["score_drop"]));
    assert_eq!(risk[0]["level"], "medium");
    assert_eq!(risk[0]["tier"], "somewhat_engaged");
    assert_close(f(&risk[0]["peak_score"]), 82.0);
    assert_close(f(&risk[0]["score"]), 82.0 * (-0.9f64).exp2());
}

#[test]
fn the_peak_expires_after_the_lookback() {
    let lines = [
        ev("c", "big", T0),
        ev("c", "big", T0),
        ev("c", "noop", T0 + 9 * DAY / 10),
    ];
    let m = model(&linear(&format!(
        "{NO_SWEEPS}[signals.churn]\nlookback = \"12h\"\n"
    )));
    let (out, _, _) = replay_lines(&m, &lines);
    assert!(of_kind(&out, "churn_risk").is_empty(), "{out:?}");
}

#[test]
fn churn_risk_for_inactivity_found_by_a_sweep() {
    let cfg = linear("[signals]\nsweep_interval = \"1h\"\n[signals.churn]\ninactivity = \"2d\"\n")
        .replace("half_life = \"1d\"", "half_life = \"1000d\"");
    let m = model(&cfg);
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("a", "big", T0),
            ev("b", "visit", T0 + 2 * DAY), // sweeps a at T0 + 2d: inactive for exactly 2d
            ev("a", "noop", T0 + 2 * DAY + HOUR), // sweep, then a's event clears it
        ],
    );
    let risk = of_kind(&out, "churn_risk");
    assert_eq!(risk.len(), 1, "{out:?}");
    assert_eq!(risk[0]["customer_id"], "a");
    assert_eq!(risk[0]["reasons"], json!(["inactive"]));
    assert_eq!(risk[0]["level"], "medium");
    assert_eq!(risk[0]["at"], "2026-11-22T00:00:00.000Z");
    assert_eq!(risk[0]["last_event_at"], "2026-11-20T00:00:00.000Z");
    let cleared = of_kind(&out, "churn_risk_cleared");
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0]["at"], "2026-11-22T01:00:00.000Z");
}

#[test]
fn sweeps_run_once_per_crossed_boundary_over_known_customers() {
    let m = model(&linear(
        "[signals]\nsweep_interval = \"1h\"\nmin_delta = 0.0\n",
    ));
    let min = 60_000;
    let (out, _, _) = replay_lines(
        &m,
        &[
            ev("a", "visit", T0 + 30 * min),
            ev("b", "visit", T0 + HOUR - 1), // same interval: no sweep
            ev("c", "visit", T0 + HOUR),     // boundary: sweep a and b at T0+1h
            ev("d", "visit", T0 + 5 * HOUR + 30 * min), // four boundaries: one sweep at T0+5h
            ev("e", "visit", T0 + 2 * HOUR), // late: no sweep
            ev("f", "visit", T0 + 5 * HOUR + 59 * min), // same interval: no sweep
        ],
    );
    let sweeps: Vec<(String, String)> = out
        .iter()
        .filter(|o| o["cause"] == "decay")
        .map(|o| {
            (
                o["customer_id"].as_str().unwrap().to_string(),
                o["at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let at1 = "2026-11-20T01:00:00.000Z".to_string();
    let at5 = "2026-11-20T05:00:00.000Z".to_string();
    assert_eq!(
        sweeps,
        [
            ("a".into(), at1.clone()),
            ("b".into(), at1),
            ("a".into(), at5.clone()),
            ("b".into(), at5.clone()),
            ("c".into(), at5),
        ]
    );
    // Events are evaluated at the watermark.
    let e = out.iter().find(|o| o["customer_id"] == "e").unwrap();
    assert_eq!(e["at"], "2026-11-20T05:30:00.000Z");
    // Decay outputs carry no event_id.
    assert!(out
        .iter()
        .filter(|o| o["cause"] == "decay")
        .all(|o| o.get("event_id").is_none()));
}

#[test]
fn too_late_and_unknown_events_are_counted_and_do_not_move_the_watermark() {
    let m = model(&linear(
        "[signals]\nsweep_interval = \"1h\"\nmin_delta = 0.0\n[input]\nmax_lateness = \"1d\"\n",
    ));
    let (out, dead, summary) = replay_lines(
        &m,
        &[
            ev("a", "visit", T0 + 5 * DAY),
            ev("a", "webinar", T0 + 100 * DAY), // unknown: ignored
            ev_with("a", "buy", T0 + 100 * DAY, json!({"value": -1})), // invalid
            ev("a", "visit", T0 + 4 * DAY - 1), // too late
            ev("a", "visit", T0 + 4 * DAY),     // exactly at the limit: accepted
        ],
    );
    assert_eq!(summary.accepted, 2);
    assert_eq!(
        summary.ignored_count(ces_stream::event::IgnoreReason::UnknownActivity),
        1
    );
    assert_eq!(
        summary.ignored_count(ces_stream::event::IgnoreReason::TooLate),
        1
    );
    assert_eq!(summary.invalid_total(), 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["line"], 3);
    assert_eq!(dead[0]["reason"], "invalid_value");
    // No sweep ran: the watermark never passed T0 + 5d.
    assert!(out.iter().all(|o| o["cause"] == "event"), "{out:?}");
    assert_eq!(out.len(), 2);
    assert_eq!(out[1]["at"], "2026-11-25T00:00:00.000Z");
}

#[test]
fn dead_letters_keep_line_numbers_and_payloads() {
    let m = model(&linear(NO_SWEEPS));
    let lines = [
        ev("a", "visit", T0),
        String::new(),
        "   ".to_string(),
        "{not json".to_string(),
        "[1,2]".to_string(),
        r#"{"customer_id": "\u00e9", "type": 1}"#.to_string(),
    ];
    let (_, dead, summary) = replay_lines(&m, &lines);
    assert_eq!(summary.lines, 6);
    assert_eq!(summary.events, 4);
    let got: Vec<_> = dead
        .iter()
        .map(|d| (d["line"].as_u64().unwrap(), d["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (4, "invalid_json"),
            (5, "not_an_object"),
            (6, "missing_type")
        ]
    );
    assert_eq!(dead[0]["payload"], "{not json");
    assert_eq!(dead[2]["payload"], lines[5]);
    assert!(dead[0]["detail"].as_str().unwrap().contains("line 1"));
}

#[test]
fn crlf_line_endings_are_accepted() {
    let m = model(&linear(NO_SWEEPS));
    let lines = [format!("{}\r", ev("a", "big", T0)), "\r".to_string()];
    let (out, _, summary) = replay_lines(&m, &lines);
    assert_eq!(summary.accepted, 1);
    assert_eq!(summary.events, 1);
    assert_eq!(out.len(), 1);
}
