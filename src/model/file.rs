//! The model's sections of the configuration file (`[scoring]`,
//! `[tiers]`, `[signals]`, `[input]`) as written, with their defaults, and
//! their validation into a [`Model`]: every value checked once, a problem
//! reported with its key path and the reason. `config` assembles the whole
//! file from these and the other subsystems' sections.

use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::config_blocks::{check, finite, millis, HumanDuration, InvalidSetting};
use crate::model::{
    quote_key, ActivityParts, Churn, Diversity, InputFormat, Model, ModelParts, Normalization,
    Signals, Tier,
};
use crate::timestamp::Millis;

const DAY: u64 = 86_400;
/// The most event ids a customer can remember (`input.dedup_depth`): each
/// costs 8 bytes per customer.
const MAX_DEDUP_DEPTH: i64 = 64;

/// The clock a partition scores with (`[input] clock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// `max(watermark, now)`, sweeps every `sweep_interval` of wall time.
    #[default]
    Wall,
    /// The watermark, sweeps when it crosses `sweep_interval` boundaries,
    /// exactly as `replay` does (backfills, reproducible runs).
    Event,
}

/// The model's sections of the file, as read.
#[derive(Debug, Clone, Copy)]
pub struct ModelSections<'a> {
    pub scoring: &'a RawScoring,
    pub tiers: Option<&'a [RawTier]>,
    pub signals: &'a RawSignals,
    pub input: &'a RawInput,
}

/// The model's sections with every default written out.
#[derive(Debug, Clone, Default)]
pub struct RawModel {
    pub scoring: RawScoring,
    pub tiers: Option<Vec<RawTier>>,
    pub signals: RawSignals,
    pub input: RawInput,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawScoring {
    /// Default 14d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_life: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalization: Option<RawNormalization>,
    pub activities: IndexMap<String, RawActivity>,
    /// Absent: no cross-channel bonus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diversity: Option<RawDiversity>,
    /// A sweep removes customers without an event for this long (spec
    /// section 8). Absent: customers are never forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget_after: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizationKind {
    Saturating,
    Linear,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNormalization {
    /// Default `saturating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<NormalizationKind>,
    /// Saturating only; default 40.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_score_at: Option<f64>,
    /// Linear only; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawActivity {
    /// Points per event; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Points per unit of the event's `value`; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_weight: Option<f64>,
    /// Upper bound of the activity's decayed contribution; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<f64>,
    /// Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiversity {
    /// Default 30d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<HumanDuration>,
    /// Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bonus_per_channel: Option<f64>,
    /// Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_channels: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignals {
    /// Default 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_interval: Option<HumanDuration>,
    /// Default 5.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_delta: Option<f64>,
    /// Score points a score must pass a tier bound by to change the tier;
    /// default 0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_hysteresis: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<RawChurn>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawChurn {
    /// Default 30d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback: Option<HumanDuration>,
    /// Default 40.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_peak: Option<f64>,
    /// Default 0.4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_ratio: Option<f64>,
    /// Default 14d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity: Option<HumanDuration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    /// Default `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<InputFormat>,
    /// Default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<i64>,
    /// Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_future_skew: Option<HumanDuration>,
    /// Default 30d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lateness: Option<HumanDuration>,
    /// Event ids remembered per customer for de-duplication; default 4,
    /// 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_depth: Option<i64>,
    /// Segment `track` event name -> activity name.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub segment_events: IndexMap<String, String>,
    /// `run` only: `wall` (default) scores at max(watermark, now) and sweeps
    /// on wall time; `event` scores at the watermark and sweeps when it
    /// crosses `sweep_interval` boundaries, exactly as `replay` does, per
    /// partition (for backfills and reproducible runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<Clock>,
}

/// Validates the model's sections of the file into a [`Model`].
pub fn build_model(raw: ModelSections<'_>) -> Result<Model, InvalidSetting> {
    let s = raw.scoring;
    let half_life = millis(
        "scoring.half_life",
        s.half_life,
        Duration::from_secs(14 * DAY),
    )?;
    check("scoring.half_life", half_life > 0, "must be positive")?;
    // In the file's order: with several problems, the first is reported.
    let normalization = build_normalization(s.normalization.as_ref())?;
    let activities = build_activities(&s.activities)?;
    let diversity = s.diversity.as_ref().map(build_diversity).transpose()?;
    let tiers = build_tiers(raw.tiers)?;
    let signals = build_signals(raw.signals)?;
    let input = build_input(raw.input)?;
    let forget_after = match s.forget_after {
        None => None,
        Some(d) => {
            let ms = millis("scoring.forget_after", Some(d), Duration::ZERO)?;
            check("scoring.forget_after", ms > 0, "must be positive")?;
            Some(ms)
        }
    };
    Model::new(ModelParts {
        half_life,
        normalization,
        activities,
        diversity,
        tiers,
        signals,
        format: input.format,
        max_event_bytes: input.max_event_bytes,
        max_future_skew: input.max_future_skew,
        max_lateness: input.max_lateness,
        dedup_depth: input.dedup_depth,
        forget_after,
        segment_events: input.segment_events,
    })
}

fn build_activities(
    raw: &IndexMap<String, RawActivity>,
) -> Result<Vec<ActivityParts>, InvalidSetting> {
    let mut activities = Vec::with_capacity(raw.len());
    for (name, a) in raw {
        let key = format!("scoring.activities.{}", quote_key(name));
        check(&key, !name.is_empty(), "activity names cannot be empty")?;
        let weight = finite(&format!("{key}.weight"), a.weight.unwrap_or(0.0))?;
        let value_weight = finite(
            &format!("{key}.value_weight"),
            a.value_weight.unwrap_or(0.0),
        )?;
        if let Some(cap) = a.cap {
            let key = format!("{key}.cap");
            finite(&key, cap)?;
            check(&key, cap > 0.0, &format!("must be > 0, got {cap}"))?;
        }
        if let Some(channel) = &a.channel {
            check(
                &format!("{key}.channel"),
                !channel.is_empty(),
                "channel names cannot be empty",
            )?;
        }
        activities.push(ActivityParts {
            name: name.clone(),
            weight,
            value_weight,
            cap: a.cap,
            channel: a.channel.clone(),
        });
    }
    Ok(activities)
}

fn build_diversity(d: &RawDiversity) -> Result<Diversity, InvalidSetting> {
    let window = millis(
        "scoring.diversity.window",
        d.window,
        Duration::from_secs(30 * DAY),
    )?;
    check("scoring.diversity.window", window > 0, "must be positive")?;
    let bonus_per_channel = finite(
        "scoring.diversity.bonus_per_channel",
        d.bonus_per_channel.unwrap_or(0.1),
    )?;
    check(
        "scoring.diversity.bonus_per_channel",
        bonus_per_channel >= 0.0,
        "must be >= 0",
    )?;
    let max_channels = d.max_channels.unwrap_or(4);
    check(
        "scoring.diversity.max_channels",
        (1..=255).contains(&max_channels),
        "must be between 1 and 255",
    )?;
    Ok(Diversity {
        window,
        bonus_per_channel,
        max_channels: max_channels as u32,
    })
}

/// `[input]`, validated (its `clock` is the service's, not the model's).
struct InputParts {
    format: InputFormat,
    max_event_bytes: usize,
    max_future_skew: Millis,
    max_lateness: Millis,
    dedup_depth: usize,
    segment_events: Vec<(String, String)>,
}

fn build_input(i: &RawInput) -> Result<InputParts, InvalidSetting> {
    let max_event_bytes = i.max_event_bytes.unwrap_or(65_536);
    check(
        "input.max_event_bytes",
        max_event_bytes > 0,
        "must be positive",
    )?;
    let max_future_skew = millis(
        "input.max_future_skew",
        i.max_future_skew,
        Duration::from_secs(300),
    )?;
    let max_lateness = millis(
        "input.max_lateness",
        i.max_lateness,
        Duration::from_secs(30 * DAY),
    )?;
    let dedup_depth = i.dedup_depth.unwrap_or(4);
    check(
        "input.dedup_depth",
        (0..=MAX_DEDUP_DEPTH).contains(&dedup_depth),
        &format!("must be between 0 and {MAX_DEDUP_DEPTH}"),
    )?;
    Ok(InputParts {
        format: i.format.unwrap_or(InputFormat::Auto),
        max_event_bytes: usize::try_from(max_event_bytes).unwrap_or(usize::MAX),
        max_future_skew,
        max_lateness,
        dedup_depth: dedup_depth as usize,
        segment_events: i
            .segment_events
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

fn build_normalization(n: Option<&RawNormalization>) -> Result<Normalization, InvalidSetting> {
    let n = n.cloned().unwrap_or_default();
    match n.kind.unwrap_or(NormalizationKind::Saturating) {
        NormalizationKind::Saturating => {
            check(
                "scoring.normalization.max",
                n.max.is_none(),
                "only applies to kind = \"linear\"",
            )?;
            let half = finite(
                "scoring.normalization.half_score_at",
                n.half_score_at.unwrap_or(40.0),
            )?;
            check(
                "scoring.normalization.half_score_at",
                half > 0.0,
                "must be > 0",
            )?;
            Ok(Normalization::Saturating {
                half_score_at: half,
            })
        }
        NormalizationKind::Linear => {
            check(
                "scoring.normalization.half_score_at",
                n.half_score_at.is_none(),
                "only applies to kind = \"saturating\"",
            )?;
            let max = finite("scoring.normalization.max", n.max.unwrap_or(100.0))?;
            check("scoring.normalization.max", max > 0.0, "must be > 0")?;
            Ok(Normalization::Linear { max })
        }
    }
}

fn default_tiers() -> Vec<Tier> {
    vec![
        Tier {
            name: "very_disengaged".into(),
            above: None,
        },
        Tier {
            name: "somewhat_engaged".into(),
            above: Some(40.0),
        },
        Tier {
            name: "very_engaged".into(),
            above: Some(75.0),
        },
    ]
}

fn build_tiers(raw: Option<&[RawTier]>) -> Result<Vec<Tier>, InvalidSetting> {
    let Some(raw) = raw else {
        return Ok(default_tiers());
    };
    check("tiers", !raw.is_empty(), "at least one tier is required")?;
    let mut tiers: Vec<Tier> = Vec::with_capacity(raw.len());
    for (i, t) in raw.iter().enumerate() {
        let key = format!("tiers[{i}]");
        check(
            &format!("{key}.name"),
            !t.name.is_empty(),
            "tier names cannot be empty",
        )?;
        check(
            &format!("{key}.name"),
            !tiers.iter().any(|prev| *prev.name == *t.name),
            &format!("duplicate tier name \"{}\"", t.name),
        )?;
        match (i, t.above) {
            (0, Some(_)) => {
                return Err(InvalidSetting {
                    key: format!("{key}.above"),
                    reason: "the lowest tier has no bound; remove `above`".into(),
                })
            }
            (0, None) => {}
            (_, None) => {
                return Err(InvalidSetting {
                    key: format!("{key}.above"),
                    reason: "required for every tier but the first (the lowest)".into(),
                })
            }
            (_, Some(above)) => {
                let key = format!("{key}.above");
                finite(&key, above)?;
                check(&key, (0.0..100.0).contains(&above), "must be in [0, 100)")?;
                if let Some(prev) = tiers.last().and_then(|p| p.above) {
                    check(
                        &key,
                        above > prev,
                        &format!(
                            "tiers out of order: {above} is not above the previous tier's bound {prev}; list tiers from lowest to highest"
                        ),
                    )?;
                }
            }
        }
        tiers.push(Tier {
            name: t.name.clone().into_boxed_str(),
            above: t.above,
        });
    }
    Ok(tiers)
}

fn build_signals(raw: &RawSignals) -> Result<Signals, InvalidSetting> {
    let sweep_interval = millis(
        "signals.sweep_interval",
        raw.sweep_interval,
        Duration::from_secs(3600),
    )?;
    check(
        "signals.sweep_interval",
        sweep_interval > 0,
        "must be positive",
    )?;
    let min_delta = finite("signals.min_delta", raw.min_delta.unwrap_or(5.0))?;
    check("signals.min_delta", min_delta >= 0.0, "must be >= 0")?;
    let tier_hysteresis = finite(
        "signals.tier_hysteresis",
        raw.tier_hysteresis.unwrap_or(0.0),
    )?;
    check(
        "signals.tier_hysteresis",
        (0.0..100.0).contains(&tier_hysteresis),
        "must be in [0, 100)",
    )?;
    let c = raw.churn.clone().unwrap_or_default();
    let lookback = millis(
        "signals.churn.lookback",
        c.lookback,
        Duration::from_secs(30 * DAY),
    )?;
    let min_peak = finite("signals.churn.min_peak", c.min_peak.unwrap_or(40.0))?;
    check(
        "signals.churn.min_peak",
        (0.0..=100.0).contains(&min_peak),
        "must be in [0, 100]",
    )?;
    let drop_ratio = finite("signals.churn.drop_ratio", c.drop_ratio.unwrap_or(0.4))?;
    check(
        "signals.churn.drop_ratio",
        drop_ratio > 0.0 && drop_ratio <= 1.0,
        "must be in (0, 1]",
    )?;
    let inactivity = millis(
        "signals.churn.inactivity",
        c.inactivity,
        Duration::from_secs(14 * DAY),
    )?;
    check(
        "signals.churn.inactivity",
        inactivity > 0,
        "must be positive",
    )?;
    Ok(Signals {
        sweep_interval,
        min_delta,
        tier_hysteresis,
        churn: Churn {
            lookback,
            min_peak,
            drop_ratio,
            inactivity,
        },
    })
}

fn dur(ms: Millis) -> Option<HumanDuration> {
    Some(HumanDuration(Duration::from_millis(ms.max(0) as u64)))
}

/// The raw form of a model with every default written out.
pub fn effective_model(m: &Model) -> RawModel {
    let normalization = match m.normalization {
        Normalization::Saturating { half_score_at } => RawNormalization {
            kind: Some(NormalizationKind::Saturating),
            half_score_at: Some(half_score_at),
            max: None,
        },
        Normalization::Linear { max } => RawNormalization {
            kind: Some(NormalizationKind::Linear),
            half_score_at: None,
            max: Some(max),
        },
    };
    let activities = m
        .activities
        .iter()
        .map(|a| {
            (
                a.name.to_string(),
                RawActivity {
                    weight: Some(a.weight),
                    value_weight: Some(a.value_weight),
                    cap: a.cap,
                    channel: Some(m.channels[usize::from(a.channel)].to_string()),
                },
            )
        })
        .collect();
    let churn = m.signals.churn;
    RawModel {
        scoring: RawScoring {
            half_life: dur(m.half_life),
            normalization: Some(normalization),
            activities,
            diversity: m.diversity.map(|d| RawDiversity {
                window: dur(d.window),
                bonus_per_channel: Some(d.bonus_per_channel),
                max_channels: Some(i64::from(d.max_channels)),
            }),
            forget_after: m.forget_after.and_then(dur),
        },
        tiers: Some(
            m.tiers
                .iter()
                .map(|t| RawTier {
                    name: t.name.to_string(),
                    above: t.above,
                })
                .collect(),
        ),
        signals: RawSignals {
            sweep_interval: dur(m.signals.sweep_interval),
            min_delta: Some(m.signals.min_delta),
            tier_hysteresis: Some(m.signals.tier_hysteresis),
            churn: Some(RawChurn {
                lookback: dur(churn.lookback),
                min_peak: Some(churn.min_peak),
                drop_ratio: Some(churn.drop_ratio),
                inactivity: dur(churn.inactivity),
            }),
        },
        input: RawInput {
            format: Some(m.input.format),
            max_event_bytes: Some(m.input.max_event_bytes as i64),
            max_future_skew: dur(m.input.max_future_skew),
            max_lateness: dur(m.input.max_lateness),
            dedup_depth: Some(m.input.dedup_depth as i64),
            segment_events: m
                .input
                .segment_events
                .iter()
                .map(|(name, id)| {
                    (
                        name.to_string(),
                        m.activities[usize::from(*id)].name.to_string(),
                    )
                })
                .collect(),
            clock: None,
        },
    }
}
