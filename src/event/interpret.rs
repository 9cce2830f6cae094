//! The captured fields of an event, interpreted under the model's input
//! rules, in the order of the reason codes of spec section 1: an event
//! with several faults reports the first. Each step is a small function
//! that returns the value it reads or the reason the event is refused; the
//! steps compose with `?`.

use std::borrow::Cow;

use super::{
    erase_id, Event, Fields, IgnoreReason, Invalid, InvalidReason, ParseContext, Parsed,
    MAX_CUSTOMER_ID_BYTES, MAX_VALUE,
};
use crate::model::{ActivityId, InputFormat, Model};
use crate::timestamp::{self, Millis};

/// A captured field, classified by its raw JSON text.
pub(super) enum FieldValue<'a> {
    Null,
    Str(Cow<'a, str>),
    Number(&'a str),
    Other(&'static str),
}

/// Why an event is not scored: invalid (dead-lettered) or ignored.
enum Refusal {
    Invalid(Invalid),
    Ignored(IgnoreReason),
}

impl From<Invalid> for Refusal {
    fn from(invalid: Invalid) -> Refusal {
        Refusal::Invalid(invalid)
    }
}

fn refused(reason: InvalidReason, detail: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        detail: detail.into(),
    }
}

#[inline]
pub(super) fn classify(text: &str, plain: bool) -> FieldValue<'_> {
    match text.as_bytes().first() {
        Some(b'"') if text.len() >= 2 && text.as_bytes()[text.len() - 1] == b'"' => {
            // SAFETY: the first and the last byte are quotes, ASCII: the
            // bytes after the first and before the last are char
            // boundaries (the checked slice showed in the profile).
            let inner = unsafe { text.get_unchecked(1..text.len() - 1) };
            if plain || !inner.contains('\\') {
                FieldValue::Str(Cow::Borrowed(inner))
            } else {
                // Escapes: let serde_json decode them; the text is valid JSON.
                match serde_json::from_str::<String>(text) {
                    Ok(s) => FieldValue::Str(Cow::Owned(s)),
                    Err(_) => FieldValue::Other("a string"),
                }
            }
        }
        // Not a whole string token: never produced by either reader.
        Some(b'"') => FieldValue::Other("a string"),
        Some(b'n') => FieldValue::Null,
        Some(b't' | b'f') => FieldValue::Other("a boolean"),
        Some(b'{') => FieldValue::Other("an object"),
        Some(b'[') => FieldValue::Other("an array"),
        _ => FieldValue::Number(text),
    }
}

/// `None` for an absent field or JSON `null`: optional fields treat both alike.
#[inline]
fn present(raw: Option<&str>, plain: bool) -> Option<FieldValue<'_>> {
    match raw.map(|r| classify(r, plain)) {
        None | Some(FieldValue::Null) => None,
        v => v,
    }
}

pub(super) fn describe(v: &FieldValue<'_>) -> &'static str {
    match v {
        FieldValue::Null => "null",
        FieldValue::Str(_) => "a string",
        FieldValue::Number(_) => "a number",
        FieldValue::Other(kind) => kind,
    }
}

#[inline]
fn string(raw: Option<&str>, plain: bool) -> Option<Cow<'_, str>> {
    match present(raw, plain) {
        Some(FieldValue::Str(s)) => Some(s),
        _ => None,
    }
}

/// The activity an event names, before it is looked up in the model.
enum Activity<'a> {
    Native(Cow<'a, str>),
    Track(Cow<'a, str>),
    Fixed(&'static str),
}

/// The event `fields` describe, or why it is not scored.
pub(super) fn interpret<'a>(fields: &Fields<'a>, model: &Model, ctx: ParseContext) -> Parsed<'a> {
    // An erasure request whatever else the object holds, in any format.
    if let Some(raw) = fields.erase {
        return erase_id(
            Some(classify(raw, fields.plain)).filter(|v| !matches!(v, FieldValue::Null)),
            "erase",
        );
    }
    match event(fields, model, ctx) {
        Ok(event) => Parsed::Event(event),
        Err(Refusal::Invalid(invalid)) => Parsed::Invalid(invalid),
        Err(Refusal::Ignored(reason)) => Parsed::Ignored(reason),
    }
}

#[inline]
fn event<'a>(fields: &Fields<'a>, model: &Model, ctx: ParseContext) -> Result<Event<'a>, Refusal> {
    let native = is_native(fields, model.input.format)?;
    let customer_id = customer_id(fields, native)?;
    let activity = activity(fields, native)?;
    let timestamp = event_time(fields, model, ctx)?;
    let value = event_value(fields, native)?;
    // Valid; is it scorable?
    let activity =
        known_activity(&activity, model).ok_or(Refusal::Ignored(IgnoreReason::UnknownActivity))?;
    let plain = fields.plain;
    let (channel, event_id, segment) = if native {
        (
            string(fields.channel, plain).and_then(|c| model.channel(&c)),
            string(fields.event_id, plain),
            string(fields.attributes_segment, plain),
        )
    } else {
        (None, string(fields.message_id, plain), None)
    };
    Ok(Event {
        customer_id,
        activity,
        timestamp,
        value,
        channel,
        event_id,
        segment,
        segment_id: 0,
    })
}

/// Whether the event is read in the native format (else Segment's).
#[inline]
fn is_native(fields: &Fields<'_>, format: InputFormat) -> Result<bool, Invalid> {
    match format {
        InputFormat::Native => Ok(true),
        InputFormat::Segment => Ok(false),
        InputFormat::Auto if fields.customer_id.is_some() => Ok(true),
        InputFormat::Auto if fields.user_id.is_some() || fields.anonymous_id.is_some() => Ok(false),
        InputFormat::Auto => Err(refused(
            InvalidReason::MissingCustomerId,
            "no customer_id, userId or anonymousId",
        )),
    }
}

/// `customer_id`, or Segment's non-empty `userId`, else `anonymousId`.
#[inline]
fn customer_id<'a>(fields: &Fields<'a>, native: bool) -> Result<Cow<'a, str>, Invalid> {
    let plain = fields.plain;
    let (field, raw) = if native {
        ("customer_id", fields.customer_id)
    } else {
        match string(fields.user_id, plain) {
            Some(s) if !s.is_empty() => ("userId", fields.user_id),
            _ => ("anonymousId", fields.anonymous_id),
        }
    };
    match present(raw, plain) {
        None if native => Err(refused(InvalidReason::MissingCustomerId, "no customer_id")),
        None => Err(refused(
            InvalidReason::MissingCustomerId,
            "no non-empty userId and no anonymousId",
        )),
        Some(FieldValue::Str(s)) if !s.is_empty() && s.len() <= MAX_CUSTOMER_ID_BYTES => Ok(s),
        Some(FieldValue::Str(s)) if s.is_empty() => Err(refused(
            InvalidReason::InvalidCustomerId,
            format!("{field} is empty"),
        )),
        Some(FieldValue::Str(s)) => Err(refused(
            InvalidReason::InvalidCustomerId,
            format!(
                "{field} is {} bytes, over the limit of {MAX_CUSTOMER_ID_BYTES}",
                s.len()
            ),
        )),
        Some(other) => Err(refused(
            InvalidReason::InvalidCustomerId,
            format!("{field} must be a string, got {}", describe(&other)),
        )),
    }
}

/// The activity the event names: native `type`; Segment's `track` event
/// name, or `page` / `screen`; Segment calls that are no activity are
/// ignored.
#[inline]
fn activity<'a>(fields: &Fields<'a>, native: bool) -> Result<Activity<'a>, Refusal> {
    let plain = fields.plain;
    if native {
        return match string(fields.kind, plain) {
            Some(s) => Ok(Activity::Native(s)),
            None => Err(refused(
                InvalidReason::MissingType,
                "type is missing or not a string",
            )
            .into()),
        };
    }
    match string(fields.kind, plain).as_deref() {
        Some("track") => match string(fields.event, plain) {
            Some(s) => Ok(Activity::Track(s)),
            None => Err(refused(
                InvalidReason::MissingType,
                "track call without a string event name",
            )
            .into()),
        },
        Some("page") => Ok(Activity::Fixed("page_view")),
        Some("screen") => Ok(Activity::Fixed("screen_view")),
        Some("identify" | "group" | "alias") => Err(Refusal::Ignored(IgnoreReason::NotAnActivity)),
        Some(other) => Err(refused(
            InvalidReason::MissingType,
            format!("unsupported Segment call type \"{other}\""),
        )
        .into()),
        None => Err(refused(
            InvalidReason::MissingType,
            "Segment type is missing or not a string",
        )
        .into()),
    }
}

/// The event's time: RFC 3339 or epoch milliseconds, else the caller's
/// fallback; not too far ahead of the caller's clock.
#[inline]
fn event_time(fields: &Fields<'_>, model: &Model, ctx: ParseContext) -> Result<Millis, Invalid> {
    let timestamp = match present(fields.timestamp, fields.plain) {
        None => ctx
            .fallback_timestamp
            .ok_or_else(|| refused(InvalidReason::InvalidTimestamp, "timestamp is missing"))?,
        Some(FieldValue::Str(s)) => timestamp::parse_rfc3339(&s).ok_or_else(|| {
            refused(
                InvalidReason::InvalidTimestamp,
                format!("\"{s}\" is not an RFC 3339 timestamp"),
            )
        })?,
        Some(FieldValue::Number(text)) => text
            .parse::<i64>()
            .ok()
            .and_then(timestamp::from_epoch_millis)
            .ok_or_else(|| {
                refused(
                    InvalidReason::InvalidTimestamp,
                    format!("{text} is not an integer epoch-milliseconds timestamp in range"),
                )
            })?,
        Some(other) => {
            return Err(refused(
                InvalidReason::InvalidTimestamp,
                format!(
                    "timestamp must be an RFC 3339 string or epoch milliseconds, got {}",
                    describe(&other)
                ),
            ))
        }
    };
    if let Some(now) = ctx.now {
        let limit = now.saturating_add(model.input.max_future_skew);
        if timestamp > limit {
            return Err(refused(
                InvalidReason::TimestampInFuture,
                format!(
                    "{} is more than {} ahead of the clock",
                    timestamp::format_rfc3339(timestamp),
                    humantime::format_duration(std::time::Duration::from_millis(
                        model.input.max_future_skew.max(0) as u64
                    ))
                ),
            ));
        }
    }
    Ok(timestamp)
}

/// The event's value: native `value`, Segment's `properties.revenue`,
/// else `properties.value`; 0 without one.
#[inline]
fn event_value(fields: &Fields<'_>, native: bool) -> Result<f64, Invalid> {
    let plain = fields.plain;
    let (field, raw) = if native {
        ("value", fields.value)
    } else if present(fields.properties_revenue, plain).is_some() {
        ("properties.revenue", fields.properties_revenue)
    } else {
        ("properties.value", fields.properties_value)
    };
    match present(raw, plain) {
        None => Ok(0.0),
        Some(FieldValue::Number(text)) => match text.parse::<f64>() {
            Ok(v) if v.is_finite() && (0.0..=MAX_VALUE).contains(&v) => Ok(v),
            _ => Err(refused(
                InvalidReason::InvalidValue,
                format!("{field} must be a number in [0, 1e12], got {text}"),
            )),
        },
        Some(other) => Err(refused(
            InvalidReason::InvalidValue,
            format!("{field} must be a number, got {}", describe(&other)),
        )),
    }
}

/// The model's activity for the name, if it scores it.
#[inline]
fn known_activity(activity: &Activity<'_>, model: &Model) -> Option<ActivityId> {
    match activity {
        Activity::Native(name) => model.activity(name),
        Activity::Track(name) => model.segment_track_activity(name),
        Activity::Fixed(name) => model.activity(name),
    }
}
