//! Building blocks of configuration sections, shared by every subsystem's
//! own settings: humantime durations, librdkafka option values, the error
//! of a setting that is not acceptable ([`InvalidSetting`]: its key path
//! and the reason), and the checks that make one.
//!
//! A leaf module, pure: each subsystem keeps its raw and validated
//! settings beside its code (`model::file`, `kafka::settings`,
//! `snapshot::settings`) and builds them from these; `config` only
//! assembles the file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::timestamp::{duration_millis, Millis};

/// Seconds in a day.
const DAY: u64 = 86_400;

/// A duration written as a humantime string (`"90s"`, `"1h"`, `"14d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "duration \"{text}\" is negative"
            )));
        }
        humantime::parse_duration(trimmed)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration \"{text}\": {e}")))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Whole days as days: humantime would write 365d as
        // "11months 30days 3h 50m 24s" (its months are 30.44 days).
        let secs = self.0.as_secs();
        if secs > 0 && secs % DAY == 0 && self.0.subsec_nanos() == 0 {
            return s.serialize_str(&format!("{}d", secs / DAY));
        }
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A librdkafka property value: written as a TOML string, number or boolean.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OptionValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(s) => f.write_str(s),
            OptionValue::Integer(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A setting that is well-formed but not acceptable: its key path in the
/// file (`kafka.options."sasl.password"`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSetting {
    pub key: String,
    pub reason: String,
}

/// A per-value check: `Err(reason)` becomes `ConfigError::Invalid` at `key`.
pub fn check(key: &str, ok: bool, reason: &str) -> Result<(), InvalidSetting> {
    if ok {
        Ok(())
    } else {
        Err(InvalidSetting {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    }
}

pub fn millis(
    key: &str,
    d: Option<HumanDuration>,
    default: Duration,
) -> Result<Millis, InvalidSetting> {
    duration_millis(d.map_or(default, |d| d.0)).map_err(|reason| InvalidSetting {
        key: key.to_string(),
        reason,
    })
}

pub fn finite(key: &str, v: f64) -> Result<f64, InvalidSetting> {
    check(key, v.is_finite(), "must be a finite number")?;
    Ok(v)
}
