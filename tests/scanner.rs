//! The event scanner (the fast path of `event::parse`) against the
//! serde_json path on generated and mutated events: the same result, the
//! same reason and the same error wording, for valid and invalid texts;
//! and the hostile corpus: invalid UTF-8 anywhere, numbers beyond f64
//! range where the model does not read.

mod common;

use ces_stream::event::{parse, parse_with_serde, InvalidReason, ParseContext, Parsed};
use common::*;
use proptest::prelude::*;

const MODEL: &str = r#"
[scoring.activities]
page_view = { weight = 1.0, channel = "web" }
purchase = { weight = 10.0, value_weight = 0.05, channel = "commerce" }
[input.segment_events]
"Order Completed" = "purchase"
"#;

/// Pieces of JSON values, valid ones and odd ones.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("\"c-1\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"caf\\u00e9 \\\" \\\\ \\n \\/\"".to_string()),
        Just("\"\\ud83d\\ude00\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"ünïcødé ✓\"".to_string()),
        Just("\"page_view\"".to_string()),
        // Escapes that decode to values the model knows: only decoding
        // them gives the same event as the serde_json path.
        Just("\"page\\u005fview\"".to_string()),
        Just("\"c\\u002d1\"".to_string()),
        Just("\"purchase\"".to_string()),
        Just("\"track\"".to_string()),
        Just("\"Order Completed\"".to_string()),
        Just("\"2026-11-20T10:15:00Z\"".to_string()),
        Just("1795132800000".to_string()),
        Just("-0".to_string()),
        Just("0.5".to_string()),
        Just("12.75e2".to_string()),
        Just("1E-3".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-12".to_string()),
        (0u32..100_000).prop_map(|n| n.to_string()),
    ]
}

fn value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key(), inner), 0..4).prop_map(|v| {
                let members: Vec<String> = v.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                format!("{{{}}}", members.join(", "))
            }),
        ]
    })
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "customer_id",
        "type",
        "timestamp",
        "value",
        "channel",
        "event_id",
        "attributes",
        "segment",
        "userId",
        "anonymousId",
        "event",
        "messageId",
        "properties",
        "revenue",
        "erase",
        "note",
        "context",
        "customer\\u005fid",
    ])
}

/// An event-like object: members from the model's keys and others.
fn object() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), value()), 0..9).prop_map(|members| {
        let m: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", m.join(","))
    })
}

/// A byte-level mutation: delete, insert or replace one byte.
fn mutate(text: &str, at: usize, how: u8, byte: u8) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    let alphabet = b"{}[]\":,\\ 0123456789eE.-+tfnu\t\n\x01";
    let c = alphabet[byte as usize % alphabet.len()];
    if b.is_empty() {
        return vec![c];
    }
    let at = at % b.len();
    match how % 3 {
        0 => {
            b.remove(at);
        }
        1 => b.insert(at, c),
        _ => b[at] = c,
    }
    b
}

fn same(payload: &[u8]) -> Result<(), TestCaseError> {
    let m = model(MODEL);
    for ctx in [
        ParseContext::default(),
        ParseContext {
            fallback_timestamp: Some(T0),
            now: Some(T0),
        },
    ] {
        let fast = parse(payload, &m, ctx);
        let slow = parse_with_serde(payload, &m, ctx);
        prop_assert_eq!(
            &fast,
            &slow,
            "payload {:?}",
            String::from_utf8_lossy(payload)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_scanner_agrees_with_serde_json_on_objects(text in object()) {
        same(text.as_bytes())?;
    }

    #[test]
    fn the_scanner_agrees_with_serde_json_on_broken_objects(
        text in object(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        let mut b = text.into_bytes();
        for (at, how, byte) in edits {
            b = mutate(&String::from_utf8_lossy(&b), at, how, byte);
        }
        same(&b)?;
    }

    #[test]
    fn the_scanner_agrees_with_serde_json_on_any_value(text in value()) {
        same(text.as_bytes())?;
    }
}

fn reason(payload: &[u8]) -> Option<InvalidReason> {
    match parse(payload, &model(MODEL), ParseContext::default()) {
        Parsed::Invalid(i) => Some(i.reason),
        _ => None,
    }
}

const OK: &str = r#"{"customer_id":"a","type":"page_view","timestamp":1795132800000"#;

#[test]
fn invalid_utf8_anywhere_is_invalid_json() {
    for bad in [
        &b"caf\xe9"[..],          // a truncated sequence
        &b"\xc0\xaf"[..],         // overlong '/'
        &b"\xed\xa0\x80"[..],     // a UTF-16 surrogate
        &b"\xf4\x90\x80\x80"[..], // beyond U+10FFFF
        &b"\xff"[..],
    ] {
        for (before, after) in [
            (r#","note":""#, "\"}"),                   // an unread field
            (r#","attributes":{"page":""#, "\"}}"),    // inside attributes
            (r#","attributes":{"segment":""#, "\"}}"), // a read nested field
        ] {
            let mut line = OK.as_bytes().to_vec();
            line.extend_from_slice(before.as_bytes());
            line.extend_from_slice(bad);
            line.extend_from_slice(after.as_bytes());
            assert_eq!(
                reason(&line),
                Some(InvalidReason::InvalidJson),
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }
}

#[test]
fn numbers_beyond_f64_where_the_model_does_not_read_are_accepted() {
    for extra in [
        r#","attributes":1e400}"#,
        r#","attributes":{"x":1e400}}"#,
        r#","attributes":[-1e400]}"#,
        r#","note":1e400}"#,
    ] {
        let line = format!("{OK}{extra}");
        assert!(
            matches!(
                parse(line.as_bytes(), &model(MODEL), ParseContext::default()),
                Parsed::Event(_)
            ),
            "{line}"
        );
    }
    let segment = r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":1795132800000,"properties":1e400}"#;
    assert!(matches!(
        parse(segment.as_bytes(), &model(MODEL), ParseContext::default()),
        Parsed::Event(_)
    ));
    let segment = r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":1795132800000,"properties":{"revenue":5,"other":1e999}}"#;
    match parse(segment.as_bytes(), &model(MODEL), ParseContext::default()) {
        Parsed::Event(e) => assert_eq!(e.value, 5.0),
        other => panic!("{other:?}"),
    }
    // In a field the model reads, it is still the field's fault.
    let line = format!("{OK},\"value\":1e400}}");
    assert_eq!(reason(line.as_bytes()), Some(InvalidReason::InvalidValue));
    // And a top-level number is valid JSON that is not an object.
    assert_eq!(reason(b"1e400"), Some(InvalidReason::NotAnObject));
}

/// Keys of every length around the scanner's 16-byte key check, with a
/// special byte (quote, backslash, control character, non-ASCII) at each
/// position, whitespace around the colon, and the text cut short after
/// the key: the fast key path must hand every case it does not own to the
/// general one, which agrees with serde_json.
#[test]
fn keys_of_every_length_and_shape_agree_with_serde_json() {
    let specials: [&str; 6] = ["\"", "\\", "\\n", "\u{1}", "\t", "é"];
    for len in 0..=20usize {
        let base: String = "customer_idxxxxxxxxxxxxx"[..len].to_string();
        let mut keys = vec![base.clone()];
        for at in 0..=len {
            for sp in specials {
                let mut k = base.clone();
                k.insert_str(at, sp);
                keys.push(k);
            }
        }
        for k in &keys {
            for (before, after) in [("", ""), (" ", ""), ("", " "), ("\n", "\t ")] {
                let member = format!("\"{k}\"{before}:{after}\"c-1\"");
                let texts = [
                    format!("{{{member},\"type\":\"page_view\",\"timestamp\":1795132800000}}"),
                    format!(
                        "{{\"type\":\"page_view\",\"timestamp\":1795132800000,\"customer_id\":\"a\",{member}}}"
                    ),
                    format!("{{\"attributes\":{{{member}}},\"customer_id\":\"a\",\"type\":\"page_view\"}}"),
                    // Cut at every byte past the key's opening quote.
                    format!("{{{member}"),
                ];
                for text in &texts {
                    same(text.as_bytes()).unwrap();
                }
                let whole = format!("{{{member}}}");
                for cut in 1..whole.len() {
                    same(&whole.as_bytes()[..cut]).unwrap();
                }
            }
        }
    }
}
