//! The serde_json path of event parsing: what the scanner leaves alone
//! (escapes in keys, deep nesting) and every invalid text, which
//! serde_json decides and words; also the reference the scanner is tested
//! against. Captures the same [`Fields`] as the scanner, as raw JSON text.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Fields, Key};

/// The fields of `text` with serde_json alone: the slow path, and the
/// reference the scanner is tested against. `Ok(None)`: valid JSON, not
/// an object.
pub(super) fn read_fields(text: &str) -> Result<Option<Fields<'_>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    // Anything but an object is only checked, never decoded: a lone
    // surrogate escape or a huge number is still JSON, just not an event.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        <IgnoredAny as serde::Deserialize>::deserialize(&mut de)?;
        de.end()?;
        return Ok(None);
    }
    let fields = (&mut de).deserialize_any(TopVisitor)?;
    de.end()?;
    Ok(fields)
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key::of(v))
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// Accepts any JSON value, skipping it unless it is an object.
trait ObjectVisitor<'de>: Sized {
    type Out;
    fn not_object(self) -> Self::Out;
    fn object<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error>;
}

struct AnyValue<V>(V);

impl<'de, V: ObjectVisitor<'de>> Visitor<'de> for AnyValue<V> {
    type Value = V::Out;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Out, A::Error> {
        self.0.object(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V::Out, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.0.not_object())
    }
    fn visit_bool<E>(self, _: bool) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
    fn visit_i64<E>(self, _: i64) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
    fn visit_u64<E>(self, _: u64) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
    fn visit_f64<E>(self, _: f64) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
    fn visit_str<E>(self, _: &str) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
    fn visit_unit<E>(self) -> Result<V::Out, E> {
        Ok(self.0.not_object())
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Option<Fields<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        // Duplicate keys: the last one wins, as in most JSON readers.
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Erase => fields.erase = Some(raw(&mut map)?),
                Key::CustomerId => fields.customer_id = Some(raw(&mut map)?),
                Key::Type => fields.kind = Some(raw(&mut map)?),
                Key::Timestamp => fields.timestamp = Some(raw(&mut map)?),
                Key::Value => fields.value = Some(raw(&mut map)?),
                Key::Channel => fields.channel = Some(raw(&mut map)?),
                Key::EventId => fields.event_id = Some(raw(&mut map)?),
                Key::UserId => fields.user_id = Some(raw(&mut map)?),
                Key::AnonymousId => fields.anonymous_id = Some(raw(&mut map)?),
                Key::Event => fields.event = Some(raw(&mut map)?),
                Key::MessageId => fields.message_id = Some(raw(&mut map)?),
                Key::Attributes => {
                    fields.attributes_segment = nested(raw(&mut map)?, NestedObject::Attributes)?.0;
                }
                Key::Properties => {
                    let (revenue, value) = nested(raw(&mut map)?, NestedObject::Properties)?;
                    fields.properties_revenue = revenue;
                    fields.properties_value = value;
                }
                Key::Revenue | Key::Segment | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(fields))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Which nested object is being read.
#[derive(Clone, Copy)]
enum NestedObject {
    /// Native `attributes`: `segment`.
    Attributes,
    /// Segment `properties`: `revenue` and `value`.
    Properties,
}

struct Nested(NestedObject);

type NestedOut<'a> = (Option<&'a str>, Option<&'a str>);

/// The fields of `attributes` or `properties` the model reads, from its
/// raw text: an object is read for them, anything else is not read at all
/// (its syntax is already checked; a string or a number there never makes
/// the event invalid).
fn nested<E: serde::de::Error>(text: &str, object: NestedObject) -> Result<NestedOut<'_>, E> {
    if !text.starts_with('{') {
        return Ok((None, None));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    Nested(object).deserialize(&mut de).map_err(E::custom)
}

/// The next map value as its raw JSON text.
fn raw<'de, A: MapAccess<'de>>(map: &mut A) -> Result<&'de str, A::Error> {
    Ok(map.next_value::<&'de RawValue>()?.get())
}

impl<'de> DeserializeSeed<'de> for Nested {
    type Value = NestedOut<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(AnyValue(self))
    }
}

impl<'de> ObjectVisitor<'de> for Nested {
    type Out = NestedOut<'de>;
    fn not_object(self) -> Self::Out {
        (None, None)
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        let mut out: NestedOut<'de> = (None, None);
        while let Some(key) = map.next_key::<Key>()? {
            match (self.0, key) {
                (NestedObject::Attributes, Key::Segment)
                | (NestedObject::Properties, Key::Revenue) => out.0 = Some(raw(&mut map)?),
                (NestedObject::Properties, Key::Value) => out.1 = Some(raw(&mut map)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}
