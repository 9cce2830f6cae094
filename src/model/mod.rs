//! The validated scoring model: the runtime form of the `[scoring]`,
//! `[[tiers]]`, `[signals]` and `[input]` sections.
//!
//! Built once from the configuration file (see `config`), then trusted by the
//! rest of the code: activities are indexed by a small integer, channels are
//! interned, tiers are sorted, durations are milliseconds. Nothing here is
//! re-checked on the hot path.

use crate::config_blocks::InvalidSetting;

pub mod file;
use crate::timestamp::Millis;
pub use file::Clock;

/// Index of an activity in [`Model::activities`].
pub type ActivityId = u16;
/// Index of a channel in [`Model::channels`].
pub type ChannelId = u8;
/// Index of a tier in [`Model::tiers`]; 0 is the lowest.
pub type TierId = u8;

/// A name's length and a signature of its bytes: the first and the last
/// 8 bytes of a name of 8 to 16, the first and last 4 of 4 to 7, every
/// byte of a shorter one. Length and signature together tell apart any
/// two names of up to 16 bytes, in two loads instead of a `memcmp` call.
/// `const` for the parser's keywords; the same code at run time.
#[inline]
pub const fn name_signature(b: &[u8]) -> (u64, u64) {
    const fn load(b: &[u8], at: usize, n: usize) -> u64 {
        let mut w = 0u64;
        let mut i = 0;
        while i < n {
            w |= (b[at + i] as u64) << (8 * i);
            i += 1;
        }
        w
    }
    let n = b.len();
    if n >= 8 {
        (load(b, 0, 8), load(b, n - 8, 8))
    } else if n >= 4 {
        (load(b, 0, 4), load(b, n - 4, 4))
    } else if n > 0 {
        (
            b[0] as u64 | (b[n / 2] as u64) << 8 | (b[n - 1] as u64) << 16,
            0,
        )
    } else {
        (0, 0)
    }
}

/// The few names of a model (activities, channels, Segment event names)
/// to their ids: looked up twice per event, so matched by
/// [`name_signature`] in a small open-addressing table rather than hashed
/// and compared with `memcmp` (the two lookups were 3% of a replay).
#[derive(Debug, Clone)]
struct NameMap<V> {
    /// A power of two, at least twice the names: a probe ends at a `None`.
    slots: Vec<Option<NameSlot<V>>>,
    len: usize,
}

#[derive(Debug, Clone)]
struct NameSlot<V> {
    signature: (u64, u64),
    name: Box<str>,
    value: V,
}

impl<V: Copy> NameMap<V> {
    fn new() -> NameMap<V> {
        NameMap {
            slots: (0..8).map(|_| None).collect(),
            len: 0,
        }
    }

    #[inline]
    fn home(&self, signature: (u64, u64), len: usize) -> usize {
        let h = (signature.0 ^ signature.1.rotate_left(29) ^ len as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 32) as usize & (self.slots.len() - 1)
    }

    #[inline]
    fn get(&self, name: &str) -> Option<V> {
        let signature = name_signature(name.as_bytes());
        let mask = self.slots.len() - 1;
        let mut i = self.home(signature, name.len());
        loop {
            let slot = self.slots[i].as_ref()?;
            if slot.signature == signature
                && slot.name.len() == name.len()
                && (name.len() <= 16 || *slot.name == *name)
            {
                return Some(slot.value);
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds or replaces `name`.
    fn insert(&mut self, name: Box<str>, value: V) {
        if (self.len + 1) * 2 > self.slots.len() {
            let n = self.slots.len() * 2;
            let old = std::mem::replace(&mut self.slots, (0..n).map(|_| None).collect());
            self.len = 0;
            for slot in old.into_iter().flatten() {
                self.insert(slot.name, slot.value);
            }
        }
        let signature = name_signature(name.as_bytes());
        let mask = self.slots.len() - 1;
        let mut i = self.home(signature, name.len());
        loop {
            match &mut self.slots[i] {
                Some(slot) if *slot.name == *name => {
                    slot.value = value;
                    return;
                }
                Some(_) => i = (i + 1) & mask,
                None => {
                    self.slots[i] = Some(NameSlot {
                        signature,
                        name,
                        value,
                    });
                    self.len += 1;
                    return;
                }
            }
        }
    }
}

/// The complete scoring model of `shared/spec/scoring.md`.
#[derive(Debug, Clone)]
pub struct Model {
    /// `scoring.half_life`.
    pub half_life: Millis,
    /// `half_life` as f64. Decay divides by it (rather than multiplying by
    /// its inverse) so that whole half-lives decay exactly by powers of 2.
    half_life_f64: f64,
    pub normalization: Normalization,
    /// Activities in configuration order; output `contributions` use this order.
    pub activities: Vec<Activity>,
    /// Each activity's cap, +infinity for none: the hot loop over
    /// activities takes a minimum instead of matching an `Option`.
    caps: Vec<f64>,
    activity_by_name: NameMap<ActivityId>,
    /// Interned channel names: every activity's channel, `default` included
    /// when an activity names none.
    pub channels: Vec<Box<str>>,
    channel_by_name: NameMap<ChannelId>,
    pub diversity: Option<Diversity>,
    /// Sorted by bound; `tiers[0]` is the lowest and has no bound.
    pub tiers: Vec<Tier>,
    pub signals: Signals,
    pub input: InputRules,
    /// `scoring.forget_after`: a sweep removes customers silent this long
    /// (section 8); `None`: never.
    pub forget_after: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    pub name: Box<str>,
    pub weight: f64,
    pub value_weight: f64,
    pub cap: Option<f64>,
    pub channel: ChannelId,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// `score = 100 * (1 - 2^(-raw / half_score_at))`.
    Saturating { half_score_at: f64 },
    /// `score = min(100, 100 * raw / max)`.
    Linear { max: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diversity {
    pub window: Millis,
    pub bonus_per_channel: f64,
    pub max_channels: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub name: Box<str>,
    /// The tier holds scores strictly above this bound; `None` for the lowest.
    pub above: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    pub sweep_interval: Millis,
    pub min_delta: f64,
    /// `signals.tier_hysteresis`: how far past a bound a score must go to
    /// change the tier (section 5, step 1); 0 is the plain tier rule.
    pub tier_hysteresis: f64,
    pub churn: Churn,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    pub lookback: Millis,
    pub min_peak: f64,
    pub drop_ratio: f64,
    pub inactivity: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Native if the object has `customer_id`, else Segment if it has
    /// `userId` or `anonymousId`.
    Auto,
    Native,
    Segment,
}

#[derive(Debug, Clone)]
pub struct InputRules {
    pub format: InputFormat,
    pub max_event_bytes: usize,
    pub max_future_skew: Millis,
    pub max_lateness: Millis,
    /// `input.dedup_depth`: event ids remembered per customer; 0 turns
    /// de-duplication off.
    pub dedup_depth: usize,
    /// Segment `track` event names mapped to activities, as configured.
    pub segment_events: Vec<(Box<str>, ActivityId)>,
    segment_lookup: NameMap<ActivityId>,
}

/// Everything needed to build a [`Model`]; `config` fills it from the file
/// after checking each value, [`Model::new`] checks the cross-references.
#[derive(Debug, Clone)]
pub struct ModelParts {
    pub half_life: Millis,
    pub normalization: Normalization,
    pub activities: Vec<ActivityParts>,
    pub diversity: Option<Diversity>,
    pub tiers: Vec<Tier>,
    pub signals: Signals,
    pub format: InputFormat,
    pub max_event_bytes: usize,
    pub max_future_skew: Millis,
    pub max_lateness: Millis,
    pub dedup_depth: usize,
    pub forget_after: Option<Millis>,
    pub segment_events: Vec<(String, String)>,
}

/// One activity as configured; `channel` is `None` for the default channel.
#[derive(Debug, Clone)]
pub struct ActivityParts {
    pub name: String,
    pub weight: f64,
    pub value_weight: f64,
    pub cap: Option<f64>,
    pub channel: Option<String>,
}

/// The channel of activities that name none.
pub const DEFAULT_CHANNEL: &str = "default";

impl Model {
    pub fn new(parts: ModelParts) -> Result<Model, InvalidSetting> {
        let err = |key: String, reason: String| Err(InvalidSetting { key, reason });
        if parts.activities.is_empty() {
            return err(
                "scoring.activities".into(),
                "at least one activity is required".into(),
            );
        }
        if parts.activities.len() > usize::from(ActivityId::MAX) {
            return err("scoring.activities".into(), "too many activities".into());
        }
        let mut channels: Vec<Box<str>> = Vec::new();
        let mut channel_by_name = NameMap::new();
        let mut activities = Vec::with_capacity(parts.activities.len());
        let mut activity_by_name = NameMap::new();
        for ActivityParts {
            name,
            weight,
            value_weight,
            cap,
            channel,
        } in parts.activities
        {
            let channel_name = channel.unwrap_or_else(|| DEFAULT_CHANNEL.to_string());
            let channel = match channel_by_name.get(channel_name.as_str()) {
                Some(id) => id,
                None => {
                    let Ok(id) = ChannelId::try_from(channels.len()) else {
                        return err(
                            format!("scoring.activities.{name}.channel"),
                            "too many channels (at most 255)".into(),
                        );
                    };
                    channels.push(channel_name.clone().into_boxed_str());
                    channel_by_name.insert(channel_name.into_boxed_str(), id);
                    id
                }
            };
            let id = activities.len() as ActivityId;
            activity_by_name.insert(name.clone().into_boxed_str(), id);
            activities.push(Activity {
                name: name.into_boxed_str(),
                weight,
                value_weight,
                cap,
                channel,
            });
        }
        if parts.tiers.len() > usize::from(TierId::MAX) {
            return err("tiers".into(), "too many tiers (at most 255)".into());
        }
        let mut segment_events = Vec::with_capacity(parts.segment_events.len());
        let mut segment_lookup = NameMap::new();
        for (event, activity) in parts.segment_events {
            let Some(id) = activity_by_name.get(activity.as_str()) else {
                return err(
                    format!("input.segment_events.{}", quote_key(&event)),
                    format!(
                        "maps to activity \"{activity}\", which is not in [scoring.activities]"
                    ),
                );
            };
            segment_lookup.insert(event.clone().into_boxed_str(), id);
            segment_events.push((event.into_boxed_str(), id));
        }
        Ok(Model {
            half_life: parts.half_life,
            half_life_f64: parts.half_life as f64,
            normalization: parts.normalization,
            caps: activities
                .iter()
                .map(|a| a.cap.unwrap_or(f64::INFINITY))
                .collect(),
            activities,
            activity_by_name,
            channels,
            channel_by_name,
            diversity: parts.diversity,
            tiers: parts.tiers,
            signals: parts.signals,
            input: InputRules {
                format: parts.format,
                max_event_bytes: parts.max_event_bytes,
                max_future_skew: parts.max_future_skew,
                max_lateness: parts.max_lateness,
                dedup_depth: parts.dedup_depth,
                segment_events,
                segment_lookup,
            },
            forget_after: parts.forget_after,
        })
    }

    /// Each activity's cap, in activity order; +infinity for none.
    #[inline]
    pub fn caps(&self) -> &[f64] {
        &self.caps
    }

    /// Whether `other` parses every line as this model does (the same
    /// input rules, activities, channels and Segment mapping; weights,
    /// tiers and signals may differ): then one parse serves both.
    pub fn parses_like(&self, other: &Model) -> bool {
        let (input, theirs) = (&self.input, &other.input);
        input.format == theirs.format
            && input.max_event_bytes == theirs.max_event_bytes
            && input.max_future_skew == theirs.max_future_skew
            && input.segment_events == theirs.segment_events
            && self.channels == other.channels
            && self.activities.len() == other.activities.len()
            && self
                .activities
                .iter()
                .zip(&other.activities)
                .all(|(a, b)| a.name == b.name && a.channel == b.channel)
    }

    pub fn activity(&self, name: &str) -> Option<ActivityId> {
        self.activity_by_name.get(name)
    }

    pub fn channel(&self, name: &str) -> Option<ChannelId> {
        self.channel_by_name.get(name)
    }

    /// The activity of a Segment `track` event: its mapping, else its own name.
    pub fn segment_track_activity(&self, event: &str) -> Option<ActivityId> {
        match self.input.segment_lookup.get(event) {
            Some(id) => Some(id),
            None => self.activity(event),
        }
    }

    /// `2^(-dt / half_life)`: the weight left after `dt` milliseconds.
    #[inline]
    pub fn decay(&self, dt: Millis) -> f64 {
        if dt == 0 {
            return 1.0;
        }
        (-(dt as f64) / self.half_life_f64).exp2()
    }

    /// Maps a raw engagement value to the 0-100 score.
    #[inline]
    pub fn normalize(&self, raw: f64) -> f64 {
        let s = match self.normalization {
            Normalization::Saturating { half_score_at } => {
                100.0 * (1.0 - (-raw / half_score_at).exp2())
            }
            Normalization::Linear { max } => 100.0 * raw / max,
        };
        s.clamp(0.0, 100.0)
    }

    /// The raw value whose score is `score`, for `score` in [0, 100): the
    /// inverse of [`Model::normalize`].
    pub fn raw_for_score(&self, score: f64) -> f64 {
        match self.normalization {
            Normalization::Saturating { half_score_at } => {
                -half_score_at * (1.0 - score / 100.0).log2()
            }
            Normalization::Linear { max } => score * max / 100.0,
        }
    }

    /// The last tier whose bound is below `score`, else the lowest.
    #[inline]
    pub fn tier_of(&self, score: f64) -> TierId {
        let mut tier = 0;
        for (i, t) in self.tiers.iter().enumerate().skip(1) {
            match t.above {
                Some(above) if above < score => tier = i,
                _ => break,
            }
        }
        tier as TierId
    }

    /// Section 5, step 1: the tier of `score` for a customer whose emitted
    /// tier is `current`. With hysteresis h, the tier moves up only when
    /// `score - h` is in a higher tier, down only when `score + h` is in a
    /// lower one; with h = 0 this is [`Model::tier_of`].
    #[inline]
    pub fn tier_from(&self, score: f64, current: TierId) -> TierId {
        let h = self.signals.tier_hysteresis;
        if h == 0.0 {
            return self.tier_of(score);
        }
        let up = self.tier_of(score - h);
        if up > current {
            return up;
        }
        let down = self.tier_of(score + h);
        if down < current {
            return down;
        }
        current
    }

    pub fn tier_name(&self, tier: TierId) -> &str {
        self.tiers
            .get(usize::from(tier))
            .map(|t| &*t.name)
            .unwrap_or("")
    }

    pub fn lowest_tier(&self) -> TierId {
        0
    }
}

/// Writes a TOML key, quoted when it is not a bare key.
pub fn quote_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_maps_find_every_name_and_nothing_else() {
        let mut names: Vec<String> = (0..36)
            .map(|i| "abcdefghijklmnopqrstuvwxyz0123456789"[..1 + i].to_string())
            .collect();
        for n in ["", "é", "web", "wea", "email_click", "email_clicj"] {
            names.push(n.into());
        }
        // Same length, first and last 8 bytes: told apart by the rest.
        names.push("0123456789-x-abcdefgh".into());
        names.push("0123456789-y-abcdefgh".into());
        let mut map = NameMap::new();
        for (i, n) in names.iter().enumerate() {
            map.insert(n.clone().into_boxed_str(), i);
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(map.get(n), Some(i), "{n:?}");
            for other in [format!("{n}_"), format!("_{n}"), n.to_uppercase()] {
                if !names.contains(&other) {
                    assert_eq!(map.get(&other), None, "{other:?}");
                }
            }
        }
        map.insert("web".into(), 1000);
        assert_eq!(map.get("web"), Some(1000));
        assert_eq!(map.len, names.len());
    }
}
