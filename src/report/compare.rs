//! What a model change would do: the same history under this model and
//! another (`--compare OTHER.toml`), customer by customer at the end.
//! Pure: two engines that replayed the same events, read at the end, and
//! the churn alerts each raised per week ([`ChurnWeeks`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{Engine, Signal, SignalKind};
use crate::replay::Observer;
use crate::timestamp::{format_rfc3339, Millis};

const WEEK: Millis = 7 * 86_400_000;
/// Customers listed as moving most.
const TOP_MOVERS: usize = 20;
/// Score difference bins: -100..100 in steps of 10.
const DIFF_BIN: f64 = 10.0;

/// The comparison's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// This model's tiers (rows) and the other's (columns): they may differ.
    pub tiers: Vec<String>,
    pub other_tiers: Vec<String>,
    /// `migration[this tier][other tier]`, customers held by both at the end.
    pub migration: Vec<Vec<u64>>,
    /// Customers only one of the models still holds (say, one forgets).
    pub only_this: u64,
    pub only_other: u64,
    pub churn_per_week: Vec<ChurnWeek>,
    /// Lower bounds of the bins of `other score - this score`.
    pub difference_bins: Vec<f64>,
    pub difference_customers: Vec<u64>,
    pub top_movers: Vec<Mover>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChurnWeek {
    /// The week's first day (RFC 3339).
    pub week: String,
    pub this_model: u64,
    pub other_model: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mover {
    pub customer_id: String,
    pub score: f64,
    pub other_score: f64,
    /// This model's contributions, by activity name, then the other's.
    pub contributions: Vec<(String, f64)>,
    pub other_contributions: Vec<(String, f64)>,
}

/// Counts churn_risk signals per week.
#[derive(Debug, Default)]
pub struct ChurnWeeks {
    pub weeks: BTreeMap<Millis, u64>,
}

impl Observer for ChurnWeeks {
    fn signal(&mut self, signal: &Signal<'_>) {
        if let SignalKind::ChurnRisk { .. } = signal.kind {
            *self.weeks.entry(week_of(signal.at)).or_default() += 1;
        }
    }
}

/// The Monday-independent week start: weeks counted from the epoch.
fn week_of(t: Millis) -> Millis {
    t - t.rem_euclid(WEEK)
}

/// Compares the end states of `this` and `other` at `at`.
pub fn compare(
    this: &Engine,
    other: &Engine,
    at: Option<Millis>,
    this_weeks: &ChurnWeeks,
    other_weeks: &ChurnWeeks,
) -> Comparison {
    let (model, other_model) = (this.model(), other.model());
    let tiers: Vec<String> = model.tiers.iter().map(|t| t.name.to_string()).collect();
    let other_tiers: Vec<String> = other_model
        .tiers
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    let mut migration = vec![vec![0u64; other_tiers.len()]; tiers.len()];
    let bins = (200.0 / DIFF_BIN) as usize;
    let mut difference = vec![0u64; bins];
    let (mut only_this, mut only_other) = (0u64, 0u64);
    // The movers: (|difference|, this slot, other slot), the largest kept.
    let mut movers: Vec<(f64, u32, u32)> = Vec::new();
    let mut mine = vec![0.0; model.activities.len()];
    let mut theirs = vec![0.0; other_model.activities.len()];
    if let Some(at) = at {
        let table = this.customers();
        for slot in 0..table.len() as u32 {
            let Some(other_slot) = other.customers().find(table.id(slot)) else {
                only_this += 1;
                continue;
            };
            let (score, tier) = this.evaluate_slot(slot, at, &mut mine);
            let (other_score, other_tier) = other.evaluate_slot(other_slot, at, &mut theirs);
            migration[usize::from(tier).min(tiers.len() - 1)]
                [usize::from(other_tier).min(other_tiers.len() - 1)] += 1;
            let diff = other_score - score;
            let bin = (((diff + 100.0) / DIFF_BIN).floor().max(0.0) as usize).min(bins - 1);
            difference[bin] += 1;
            movers.push((diff.abs(), slot, other_slot));
            if movers.len() > 4 * TOP_MOVERS {
                movers.sort_by(|a, b| b.0.total_cmp(&a.0));
                movers.truncate(TOP_MOVERS);
            }
        }
        let held_by_both = table.len() as u64 - only_this;
        only_other = other.customers().len() as u64 - held_by_both;
    }
    movers.sort_by(|a, b| b.0.total_cmp(&a.0));
    movers.truncate(TOP_MOVERS);
    let top_movers = match at {
        Some(at) => movers
            .iter()
            .map(|&(_, slot, other_slot)| {
                let (score, _) = this.evaluate_slot(slot, at, &mut mine);
                let (other_score, _) = other.evaluate_slot(other_slot, at, &mut theirs);
                Mover {
                    customer_id: this.customers().id(slot).to_string(),
                    score: round2(score),
                    other_score: round2(other_score),
                    contributions: named(model.activities.iter().map(|a| &*a.name), &mine),
                    other_contributions: named(
                        other_model.activities.iter().map(|a| &*a.name),
                        &theirs,
                    ),
                }
            })
            .collect(),
        None => Vec::new(),
    };
    let weeks: std::collections::BTreeSet<Millis> = this_weeks
        .weeks
        .keys()
        .chain(other_weeks.weeks.keys())
        .copied()
        .collect();
    Comparison {
        tiers,
        other_tiers,
        migration,
        only_this,
        only_other,
        churn_per_week: weeks
            .into_iter()
            .map(|w| ChurnWeek {
                week: format_rfc3339(w).to_string(),
                this_model: this_weeks.weeks.get(&w).copied().unwrap_or(0),
                other_model: other_weeks.weeks.get(&w).copied().unwrap_or(0),
            })
            .collect(),
        difference_bins: (0..bins).map(|b| -100.0 + b as f64 * DIFF_BIN).collect(),
        difference_customers: difference,
        top_movers,
    }
}

fn named<'a>(names: impl Iterator<Item = &'a str>, values: &[f64]) -> Vec<(String, f64)> {
    names
        .zip(values)
        .filter(|(_, v)| **v != 0.0)
        .map(|(n, v)| (n.to_string(), round2(*v)))
        .collect()
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
