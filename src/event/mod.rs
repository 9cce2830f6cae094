//! Input events: parsing the native and Segment JSON formats into a
//! validated [`Event`], or into the reason it cannot be scored.
//!
//! Parsing is on the hot path, so it never builds a JSON tree. The line is
//! checked to be UTF-8 once, then [`scan`] walks the object in one pass,
//! captures only the fields the model reads as borrowed raw JSON text
//! (nested objects in the same pass), and skips everything else while still
//! checking its syntax; the few texts it leaves alone (escapes in keys,
//! deep nesting) and every invalid one go to a `serde_json` pass that
//! decides and words the error. The captured fields are then interpreted
//! in the order of the reason codes of spec section 1, so that an event
//! with several faults reports the first.

mod interpret;
mod scan;
mod serde_path;

use interpret::{describe, interpret, FieldValue};

use std::borrow::Cow;
use std::fmt;

use crate::model::{name_signature, ActivityId, ChannelId, Model};
use crate::timestamp::Millis;

/// The longest customer id accepted, in bytes.
pub const MAX_CUSTOMER_ID_BYTES: usize = 256;

/// Why an event was refused; it goes to the dead-letter topic or file.
/// Declared in the spec's order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidReason {
    TooLarge,
    InvalidJson,
    NotAnObject,
    MissingCustomerId,
    InvalidCustomerId,
    MissingType,
    InvalidTimestamp,
    TimestampInFuture,
    InvalidValue,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 9] = [
        InvalidReason::TooLarge,
        InvalidReason::InvalidJson,
        InvalidReason::NotAnObject,
        InvalidReason::MissingCustomerId,
        InvalidReason::InvalidCustomerId,
        InvalidReason::MissingType,
        InvalidReason::InvalidTimestamp,
        InvalidReason::TimestampInFuture,
        InvalidReason::InvalidValue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::TooLarge => "too_large",
            InvalidReason::InvalidJson => "invalid_json",
            InvalidReason::NotAnObject => "not_an_object",
            InvalidReason::MissingCustomerId => "missing_customer_id",
            InvalidReason::InvalidCustomerId => "invalid_customer_id",
            InvalidReason::MissingType => "missing_type",
            InvalidReason::InvalidTimestamp => "invalid_timestamp",
            InvalidReason::TimestampInFuture => "timestamp_in_future",
            InvalidReason::InvalidValue => "invalid_value",
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a valid event was not scored; counted, never dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IgnoreReason {
    /// The activity is not in `[scoring.activities]`.
    UnknownActivity,
    /// Older than the watermark minus `input.max_lateness`.
    TooLate,
    /// A Segment `identify`, `group` or `alias` call.
    NotAnActivity,
    /// The customer remembers the event's id (section 1, de-duplication).
    Duplicate,
}

impl IgnoreReason {
    pub const ALL: [IgnoreReason; 4] = [
        IgnoreReason::UnknownActivity,
        IgnoreReason::TooLate,
        IgnoreReason::NotAnActivity,
        IgnoreReason::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::UnknownActivity => "unknown_activity",
            IgnoreReason::TooLate => "too_late",
            IgnoreReason::NotAnActivity => "not_an_activity",
            IgnoreReason::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An invalid event: the reason code and a human-readable detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub reason: InvalidReason,
    pub detail: String,
}

/// A valid event, its fields borrowed from the input where possible.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub customer_id: Cow<'a, str>,
    pub activity: ActivityId,
    pub timestamp: Millis,
    /// 0 when the event has no value.
    pub value: f64,
    /// The event's own channel, when it names a configured one.
    pub channel: Option<ChannelId>,
    pub event_id: Option<Cow<'a, str>>,
    /// `attributes.segment` (native format), for per-segment metrics.
    pub segment: Option<Cow<'a, str>>,
    /// The index of `segment` among the configured ones (`[metrics]
    /// segments`), 1-based; 0 when not tracked. Set by the pipeline.
    pub segment_id: u8,
}

/// The result of parsing one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed<'a> {
    Event(Event<'a>),
    /// An erasure request (section 1): forget this customer.
    Erase(Cow<'a, str>),
    Invalid(Invalid),
    Ignored(IgnoreReason),
}

/// The largest `value` an event may carry (section 1, v2).
pub const MAX_VALUE: f64 = 1e12;

/// What the caller knows besides the payload. Replay passes the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseContext {
    /// Used when the event has no timestamp (live mode: the Kafka message
    /// timestamp). Without it a missing timestamp is `invalid_timestamp`.
    pub fallback_timestamp: Option<Millis>,
    /// Wall-clock time, for `timestamp_in_future` (live mode only).
    pub now: Option<Millis>,
}

fn invalid<'a>(reason: InvalidReason, detail: impl Into<String>) -> Parsed<'a> {
    Parsed::Invalid(Invalid {
        reason,
        detail: detail.into(),
    })
}

/// A Kafka tombstone (a message without a value) on an input topic: an
/// erasure request for the customer its key names (section 1).
pub fn parse_tombstone(key: Option<&[u8]>) -> Parsed<'_> {
    let Some(key) = key else {
        return invalid(
            InvalidReason::MissingCustomerId,
            "tombstone (erasure request) without a key",
        );
    };
    match std::str::from_utf8(key) {
        Ok(id) => erase_id(
            Some(FieldValue::Str(Cow::Borrowed(id))),
            "the tombstone's key",
        ),
        Err(_) => invalid(
            InvalidReason::InvalidCustomerId,
            "the tombstone's key (an erasure request) is not UTF-8",
        ),
    }
}

/// The customer id of an erasure request, by the rules of `customer_id`.
fn erase_id<'a>(v: Option<FieldValue<'a>>, field: &str) -> Parsed<'a> {
    match v {
        Some(FieldValue::Str(s)) if !s.is_empty() && s.len() <= MAX_CUSTOMER_ID_BYTES => Parsed::Erase(s),
        Some(FieldValue::Str(s)) if s.is_empty() => invalid(
            InvalidReason::InvalidCustomerId,
            format!("{field} (an erasure request) is empty"),
        ),
        Some(FieldValue::Str(s)) => invalid(
            InvalidReason::InvalidCustomerId,
            format!(
                "{field} (an erasure request) is {} bytes, over the limit of {MAX_CUSTOMER_ID_BYTES}",
                s.len()
            ),
        ),
        Some(other) => invalid(
            InvalidReason::InvalidCustomerId,
            format!(
                "{field} (an erasure request) must be a string, got {}",
                describe(&other)
            ),
        ),
        None => invalid(
            InvalidReason::InvalidCustomerId,
            format!("{field} (an erasure request) must be a string, got null"),
        ),
    }
}

/// Parses one event payload under the model's input rules.
pub fn parse<'a>(payload: &'a [u8], model: &Model, ctx: ParseContext) -> Parsed<'a> {
    let max = model.input.max_event_bytes;
    if payload.len() > max {
        return invalid(
            InvalidReason::TooLarge,
            format!("event is {} bytes, over the limit of {max}", payload.len()),
        );
    }
    // JSON text is UTF-8 (RFC 8259, section 8.1), in fields the model does
    // not read too: one fast check of the whole line, since the parsers
    // below skip unread strings without decoding them.
    let valid = if is_ascii(payload) {
        // SAFETY: ASCII is valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(payload) })
    } else {
        simdutf8::basic::from_utf8(payload)
    };
    let text = match valid {
        Ok(text) => text,
        Err(_) => {
            let at = simdutf8::compat::from_utf8(payload)
                .err()
                .map_or(0, |e| e.valid_up_to());
            return invalid(
                InvalidReason::InvalidJson,
                format!("invalid UTF-8 at byte {at}"),
            );
        }
    };
    let mut fields = Fields::default();
    match read_fields(text, &mut fields) {
        Ok(true) => {}
        Ok(false) => {
            return invalid(
                InvalidReason::NotAnObject,
                format!("expected a JSON object, got {}", json_kind(payload)),
            )
        }
        Err(e) => return invalid(InvalidReason::InvalidJson, e.to_string()),
    };
    interpret(&fields, model, ctx)
}

/// Whether every byte is ASCII: 16 at a time with SSE2 (part of every
/// x86_64). Nearly every event is ASCII, and this is cheaper than the
/// full UTF-8 validation it spares them.
#[inline]
fn is_ascii(b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if b.len() >= 16 {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128};
        let load = |at: usize| {
            // SAFETY: SSE2 is in the x86_64 baseline; every caller below
            // keeps at + 16 <= b.len(), so the unaligned load is in `b`.
            unsafe { _mm_loadu_si128(b.as_ptr().add(at).cast::<__m128i>()) }
        };
        // The last 16 bytes, overlapping the chunks before them.
        let mut acc = load(b.len() - 16);
        let mut i = 0;
        while i + 16 <= b.len() {
            // SAFETY: SSE2, as above.
            acc = unsafe { _mm_or_si128(acc, load(i)) };
            i += 16;
        }
        // SAFETY: SSE2, as above.
        return unsafe { _mm_movemask_epi8(acc) } == 0;
    }
    b.is_ascii()
}

/// Names the kind of a JSON document, for `not_an_object` details.
fn json_kind(payload: &[u8]) -> &'static str {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    }
}

/// The top-level keys the model reads, in both formats, as the raw JSON
/// text of their values.
#[derive(Default, Debug, PartialEq)]
struct Fields<'a> {
    /// `erase` (an erasure request, whatever the format).
    erase: Option<&'a str>,
    customer_id: Option<&'a str>,
    kind: Option<&'a str>,
    timestamp: Option<&'a str>,
    value: Option<&'a str>,
    channel: Option<&'a str>,
    event_id: Option<&'a str>,
    attributes_segment: Option<&'a str>,
    user_id: Option<&'a str>,
    anonymous_id: Option<&'a str>,
    event: Option<&'a str>,
    message_id: Option<&'a str>,
    properties_revenue: Option<&'a str>,
    properties_value: Option<&'a str>,
    /// No captured string holds an escape: a string's value is its text
    /// between the quotes. Set by the scanner, which knows; false (look for
    /// escapes) from the serde_json path.
    plain: bool,
}

/// Reads the fields of `text` into `fields` (the default on entry):
/// `Ok(false)` when the document is valid JSON but not an object; the
/// error is serde_json's wording.
fn read_fields<'a>(text: &'a str, fields: &mut Fields<'a>) -> Result<bool, serde_json::Error> {
    match scan::scan(text, fields) {
        scan::Scan::Object => Ok(true),
        scan::Scan::NotObject => Ok(false),
        scan::Scan::Invalid | scan::Scan::Unusual => match serde_path::read_fields(text)? {
            Some(f) => {
                *fields = f;
                Ok(true)
            }
            None => Ok(false),
        },
    }
}

/// [`parse`] with the serde_json path only, for tests that hold the
/// scanner to it.
#[doc(hidden)]
pub fn parse_with_serde<'a>(payload: &'a [u8], model: &Model, ctx: ParseContext) -> Parsed<'a> {
    let Ok(text) = std::str::from_utf8(payload) else {
        return parse(payload, model, ctx);
    };
    if payload.len() > model.input.max_event_bytes {
        return parse(payload, model, ctx);
    }
    match serde_path::read_fields(text) {
        Ok(Some(fields)) => interpret(&fields, model, ctx),
        Ok(None) => invalid(
            InvalidReason::NotAnObject,
            format!("expected a JSON object, got {}", json_kind(payload)),
        ),
        Err(e) => invalid(InvalidReason::InvalidJson, e.to_string()),
    }
}

/// A key of an object we capture from; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Erase,
    CustomerId,
    Type,
    Timestamp,
    Value,
    Channel,
    EventId,
    Attributes,
    UserId,
    AnonymousId,
    Event,
    MessageId,
    Properties,
    Revenue,
    Segment,
    Other,
}

impl Key {
    /// Matched by length and [`name_signature`] (two loads), not a call to
    /// `memcmp` per candidate: matching on the strings cost 2% of a
    /// replay's instructions.
    #[inline]
    fn of(s: &str) -> Key {
        const fn sig(s: &str) -> (u64, u64) {
            name_signature(s.as_bytes())
        }
        let b = s.as_bytes();
        if !(4..=16).contains(&b.len()) {
            return Key::Other;
        }
        let w = name_signature(b);
        match b.len() {
            4 if w == const { sig("type") } => Key::Type,
            5 if w == const { sig("erase") } => Key::Erase,
            5 if w == const { sig("value") } => Key::Value,
            5 if w == const { sig("event") } => Key::Event,
            6 if w == const { sig("userId") } => Key::UserId,
            7 if w == const { sig("channel") } => Key::Channel,
            7 if w == const { sig("revenue") } => Key::Revenue,
            7 if w == const { sig("segment") } => Key::Segment,
            8 if w == const { sig("event_id") } => Key::EventId,
            9 if w == const { sig("timestamp") } => Key::Timestamp,
            9 if w == const { sig("messageId") } => Key::MessageId,
            10 if w == const { sig("attributes") } => Key::Attributes,
            10 if w == const { sig("properties") } => Key::Properties,
            11 if w == const { sig("customer_id") } => Key::CustomerId,
            11 if w == const { sig("anonymousId") } => Key::AnonymousId,
            _ => Key::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Key;

    const KEYS: [(&str, Key); 15] = [
        ("erase", Key::Erase),
        ("customer_id", Key::CustomerId),
        ("type", Key::Type),
        ("timestamp", Key::Timestamp),
        ("value", Key::Value),
        ("channel", Key::Channel),
        ("event_id", Key::EventId),
        ("attributes", Key::Attributes),
        ("userId", Key::UserId),
        ("anonymousId", Key::AnonymousId),
        ("event", Key::Event),
        ("messageId", Key::MessageId),
        ("properties", Key::Properties),
        ("revenue", Key::Revenue),
        ("segment", Key::Segment),
    ];

    #[test]
    fn is_ascii_agrees_with_std_at_every_length_and_position() {
        for len in 0..70 {
            let mut b = vec![b'a'; len];
            assert!(super::is_ascii(&b));
            for i in 0..len {
                b[i] = 0x80;
                assert!(!super::is_ascii(&b), "len {len}, byte {i}");
                b[i] = 0x7f;
                assert!(super::is_ascii(&b));
                b[i] = b'a';
            }
        }
    }

    #[test]
    fn keys_are_told_apart_by_every_byte() {
        for (name, key) in KEYS {
            assert_eq!(Key::of(name), key, "{name}");
            // Any one byte changed, one added or one taken away: another key.
            for i in 0..name.len() {
                let mut b = name.as_bytes().to_vec();
                b[i] ^= 0x20;
                let other = String::from_utf8(b).unwrap();
                assert_eq!(Key::of(&other), Key::Other, "{other}");
            }
            assert_eq!(Key::of(&format!("{name}x")), Key::Other);
            assert_eq!(Key::of(&format!("x{name}")), Key::Other);
            assert_eq!(Key::of(&name[1..]), Key::Other);
            assert_eq!(Key::of(&name[..name.len() - 1]), Key::Other);
        }
        for other in [
            "",
            "a",
            "typ",
            "customer_ids",
            "properties_",
            "sixteen_bytes_xx",
            "é",
        ] {
            assert_eq!(Key::of(other), Key::Other, "{other}");
        }
    }
}
