//! Spec section 1: both input formats and every reason code.

mod common;

use std::borrow::Cow;

use ces_stream::event::{parse, IgnoreReason, InvalidReason, ParseContext, Parsed};
use ces_stream::model::Model;
use common::*;

const MODEL: &str = r#"
[scoring.activities]
page_view = { weight = 1.0, channel = "web" }
screen_view = { weight = 1.0, channel = "app" }
purchase = { weight = 10.0, value_weight = 0.05, channel = "commerce" }

[input]
max_event_bytes = 400

[input.segment_events]
"Order Completed" = "purchase"
"#;

fn reason(m: &Model, payload: &str, ctx: ParseContext) -> Option<InvalidReason> {
    match parse(payload.as_bytes(), m, ctx) {
        Parsed::Invalid(i) => {
            assert!(!i.detail.is_empty(), "no detail for {payload}");
            Some(i.reason)
        }
        _ => None,
    }
}

fn replay_reason(m: &Model, payload: &str) -> Option<InvalidReason> {
    reason(m, payload, ParseContext::default())
}

#[test]
fn every_reason_code() {
    let m = model(MODEL);
    let ts = r#""timestamp": "2026-11-20T10:15:00Z""#;
    let cases: Vec<(String, InvalidReason)> = vec![
        (
            format!(
                r#"{{"customer_id": "c-1", "type": "page_view", {ts}, "pad": "{}"}}"#,
                "x".repeat(400)
            ),
            InvalidReason::TooLarge,
        ),
        (
            r#"{"customer_id": "c-1", "type": "#.into(),
            InvalidReason::InvalidJson,
        ),
        (
            r#"{"customer_id": "c-1"} trailing"#.into(),
            InvalidReason::InvalidJson,
        ),
        ("".into(), InvalidReason::InvalidJson),
        (
            r#"[{"customer_id": "c-1"}]"#.into(),
            InvalidReason::NotAnObject,
        ),
        (r#""c-1""#.into(), InvalidReason::NotAnObject),
        ("42".into(), InvalidReason::NotAnObject),
        ("null".into(), InvalidReason::NotAnObject),
        (
            format!(r#"{{"type": "page_view", {ts}}}"#),
            InvalidReason::MissingCustomerId,
        ),
        (
            format!(r#"{{"customer_id": null, "type": "page_view", {ts}}}"#),
            InvalidReason::MissingCustomerId,
        ),
        (
            format!(r#"{{"customer_id": "", "type": "page_view", {ts}}}"#),
            InvalidReason::InvalidCustomerId,
        ),
        (
            format!(r#"{{"customer_id": 42, "type": "page_view", {ts}}}"#),
            InvalidReason::InvalidCustomerId,
        ),
        (
            format!(
                r#"{{"customer_id": "{}", "type": "page_view", {ts}}}"#,
                "c".repeat(257)
            ),
            InvalidReason::InvalidCustomerId,
        ),
        (
            format!(r#"{{"customer_id": "c-1", {ts}}}"#),
            InvalidReason::MissingType,
        ),
        (
            format!(r#"{{"customer_id": "c-1", "type": 3, {ts}}}"#),
            InvalidReason::MissingType,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view"}"#.into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view", "timestamp": "2026-13-01T00:00:00Z"}"#
                .into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view", "timestamp": "2026-11-20 10:15"}"#
                .into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view", "timestamp": 1.5e12}"#.into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view", "timestamp": true}"#.into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            r#"{"customer_id": "c-1", "type": "page_view", "timestamp": 99999999999999999999}"#
                .into(),
            InvalidReason::InvalidTimestamp,
        ),
        (
            format!(r#"{{"customer_id": "c-1", "type": "purchase", {ts}, "value": -1}}"#),
            InvalidReason::InvalidValue,
        ),
        (
            format!(r#"{{"customer_id": "c-1", "type": "purchase", {ts}, "value": "49.9"}}"#),
            InvalidReason::InvalidValue,
        ),
        (
            format!(r#"{{"customer_id": "c-1", "type": "purchase", {ts}, "value": 1e400}}"#),
            InvalidReason::InvalidValue,
        ),
    ];
    for (payload, expected) in cases {
        assert_eq!(replay_reason(&m, &payload), Some(expected), "{payload}");
    }
}

#[test]
fn the_first_reason_of_the_list_wins() {
    let m = model(MODEL);
    // No customer id, no type, bad timestamp, bad value.
    let p = r#"{"timestamp": "never", "value": -3}"#;
    assert_eq!(replay_reason(&m, p), Some(InvalidReason::MissingCustomerId));
    // Bad id and no type.
    let p = r#"{"customer_id": 7, "timestamp": "never"}"#;
    assert_eq!(replay_reason(&m, p), Some(InvalidReason::InvalidCustomerId));
    // No type and bad timestamp and bad value.
    let p = r#"{"customer_id": "c", "timestamp": "never", "value": -3}"#;
    assert_eq!(replay_reason(&m, p), Some(InvalidReason::MissingType));
    // Bad timestamp and bad value, unknown activity.
    let p = r#"{"customer_id": "c", "type": "nope", "timestamp": "never", "value": -3}"#;
    assert_eq!(replay_reason(&m, p), Some(InvalidReason::InvalidTimestamp));
    // Invalid value beats unknown activity.
    let p = r#"{"customer_id": "c", "type": "nope", "timestamp": 0, "value": -3}"#;
    assert_eq!(replay_reason(&m, p), Some(InvalidReason::InvalidValue));
    // Too large beats invalid JSON.
    let p = format!("{{{}", "x".repeat(500));
    assert_eq!(replay_reason(&m, &p), Some(InvalidReason::TooLarge));
}

#[test]
fn timestamp_in_future_is_live_only_and_comes_before_invalid_value() {
    let m = model(MODEL);
    let now = T0;
    let live = ParseContext {
        fallback_timestamp: Some(now),
        now: Some(now),
    };
    let at = |t: i64, extra: &str| {
        format!(r#"{{"customer_id": "c", "type": "purchase", "timestamp": {t}{extra}}}"#)
    };
    // Default skew is 5 minutes: exactly 5 minutes ahead is accepted.
    assert_eq!(reason(&m, &at(now + 300_000, ""), live), None);
    assert_eq!(
        reason(&m, &at(now + 300_001, ""), live),
        Some(InvalidReason::TimestampInFuture)
    );
    assert_eq!(
        reason(&m, &at(now + 300_001, r#", "value": -1"#), live),
        Some(InvalidReason::TimestampInFuture)
    );
    assert_eq!(replay_reason(&m, &at(now + 300_001, "")), None);
    // Live mode falls back to the message timestamp.
    match parse(br#"{"customer_id": "c", "type": "page_view"}"#, &m, live) {
        Parsed::Event(e) => assert_eq!(e.timestamp, now),
        other => panic!("{other:?}"),
    }
}

#[test]
fn valid_but_unusable_events_are_ignored_not_invalid() {
    let m = model(MODEL);
    let p = r#"{"customer_id": "c", "type": "webinar", "timestamp": 0}"#;
    assert_eq!(
        parse(p.as_bytes(), &m, ParseContext::default()),
        Parsed::Ignored(IgnoreReason::UnknownActivity)
    );
    for kind in ["identify", "group", "alias"] {
        let p = format!(r#"{{"userId": "u", "type": "{kind}", "traits": {{"a": 1}}}}"#);
        assert_eq!(
            parse(p.as_bytes(), &m, ParseContext::default()),
            Parsed::Ignored(IgnoreReason::NotAnActivity),
            "{kind}"
        );
    }
}

#[test]
fn native_fields() {
    let m = model(MODEL);
    let p = r#"{"event_id": "e-1", "customer_id": "c-\"42\"", "type": "purchase",
        "timestamp": "2026-11-20T11:15:00+01:00", "channel": "web", "value": 49.9,
        "attributes": {"segment": "smb", "nested": [1, {"x": null}]}, "extra": {"deep": [true]}}"#;
    let Parsed::Event(e) = parse(p.as_bytes(), &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.customer_id, "c-\"42\"");
    assert_eq!(e.activity, m.activity("purchase").unwrap());
    assert_eq!(e.timestamp, T0 + 10 * HOUR + 15 * 60_000);
    assert_eq!(e.value, 49.9);
    assert_eq!(e.channel, m.channel("web"));
    assert_eq!(e.event_id.as_deref(), Some("e-1"));
    assert_eq!(e.segment.as_deref(), Some("smb"));

    // Plain strings are borrowed from the payload, not copied.
    let p = br#"{"customer_id": "c-1", "type": "page_view", "timestamp": 5, "channel": "tv", "value": null}"#;
    let Parsed::Event(e) = parse(p, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert!(matches!(e.customer_id, Cow::Borrowed("c-1")));
    assert_eq!(e.timestamp, 5);
    assert_eq!(e.channel, None, "unconfigured channels are ignored");
    assert_eq!(e.value, 0.0);
}

#[test]
fn segment_fields() {
    let m = model(MODEL);
    let p =
        br#"{"type": "track", "event": "Order Completed", "userId": "u-1", "anonymousId": "a-1",
        "messageId": "m-1", "timestamp": "2026-11-20T00:00:00Z",
        "properties": {"revenue": 120.5, "value": 3}, "context": {"ip": "1.2.3.4"}}"#;
    let Parsed::Event(e) = parse(p, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.customer_id, "u-1");
    assert_eq!(e.activity, m.activity("purchase").unwrap());
    assert_eq!(e.timestamp, T0);
    assert_eq!(e.value, 120.5);
    assert_eq!(e.event_id.as_deref(), Some("m-1"));

    // Empty userId falls back to anonymousId; value falls back to properties.value.
    let p = br#"{"type": "track", "event": "purchase", "userId": "", "anonymousId": "a-1",
        "timestamp": 0, "properties": {"value": 3}}"#;
    let Parsed::Event(e) = parse(p, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.customer_id, "a-1");
    assert_eq!(e.value, 3.0);

    let page = br#"{"type": "page", "anonymousId": "a-2", "timestamp": 0, "name": "Home"}"#;
    let Parsed::Event(e) = parse(page, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.activity, m.activity("page_view").unwrap());
    let screen = br#"{"type": "screen", "userId": "u", "timestamp": 0}"#;
    let Parsed::Event(e) = parse(screen, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.activity, m.activity("screen_view").unwrap());

    let bad = [
        (
            r#"{"type": "track", "userId": "u", "timestamp": 0}"#,
            InvalidReason::MissingType,
        ),
        (
            r#"{"type": "purchase", "userId": "u", "timestamp": 0}"#,
            InvalidReason::MissingType,
        ),
        (
            r#"{"event": "Order Completed", "userId": "u", "timestamp": 0}"#,
            InvalidReason::MissingType,
        ),
        (
            r#"{"type": "track", "event": "x", "userId": "", "timestamp": 0}"#,
            InvalidReason::MissingCustomerId,
        ),
        (
            r#"{"type": "track", "event": "x", "userId": 5, "anonymousId": 6, "timestamp": 0}"#,
            InvalidReason::InvalidCustomerId,
        ),
        (
            r#"{"type": "track", "event": "purchase", "userId": "u", "timestamp": 0, "properties": {"revenue": "12"}}"#,
            InvalidReason::InvalidValue,
        ),
        (
            r#"{"type": "track", "event": "purchase", "userId": "u", "timestamp": 0, "properties": {"revenue": null, "value": -2}}"#,
            InvalidReason::InvalidValue,
        ),
    ];
    for (p, r) in bad {
        assert_eq!(replay_reason(&m, p), Some(r), "{p}");
    }
}

#[test]
fn forced_formats() {
    let native = model(&MODEL.replace(
        "[input]\nmax_event_bytes = 400\n",
        "[input]\nmax_event_bytes = 400\nformat = \"native\"\n",
    ));
    let seg = br#"{"type": "page", "userId": "u", "timestamp": 0}"#;
    assert_eq!(
        replay_reason(&native, std::str::from_utf8(seg).unwrap()),
        Some(InvalidReason::MissingCustomerId)
    );
    let segment = model(&MODEL.replace(
        "[input]\nmax_event_bytes = 400\n",
        "[input]\nmax_event_bytes = 400\nformat = \"segment\"\n",
    ));
    let nat = r#"{"customer_id": "c", "type": "page_view", "timestamp": 0}"#;
    assert_eq!(
        replay_reason(&segment, nat),
        Some(InvalidReason::MissingCustomerId)
    );
}

#[test]
fn duplicate_keys_take_the_last_value() {
    let m = model(MODEL);
    let p = br#"{"customer_id": "a", "customer_id": "b", "type": "page_view", "timestamp": 0}"#;
    let Parsed::Event(e) = parse(p, &m, ParseContext::default()) else {
        panic!("not parsed")
    };
    assert_eq!(e.customer_id, "b");
}
