//! The report's figures, gathered while a history is replayed: aggregates
//! only (per day, per tier, per bin), never a row per customer, so that
//! the report stays small at any history size. Pure: the replay tells the
//! [`FigureBuilder`] what happens ([`Observer`]), and [`FigureBuilder::finish`]
//! reads the engine at the end.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;

use crate::customers::{prefetch_lines, Slot};
use crate::engine::{Engine, Signal, SignalKind};
use crate::event::{Event, IgnoreReason, InvalidReason};
use crate::model::Model;
use crate::replay::{Observer, Summary};
use crate::timestamp::{format_rfc3339, Millis};

const DAY: Millis = 86_400_000;
/// Past this many days, tiers over time are given per week.
const DAILY_UP_TO: usize = 120;
/// Score histogram bins: 0-10, 10-20, ... 90-100.
const BINS: usize = 10;
/// The movement matrix compares with the tiers this long before the end.
pub const DEFAULT_MOVEMENT_WINDOW: Millis = 30 * DAY;

/// When the movement matrix's "from" tiers are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovementStart {
    /// This long before the last event (`--movement-window`).
    Before(Millis),
    /// At this time (`--since`).
    At(Millis),
}

impl Default for MovementStart {
    fn default() -> MovementStart {
        MovementStart::Before(DEFAULT_MOVEMENT_WINDOW)
    }
}

/// Every figure of a report, as `--json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub summary: SummaryFigures,
    pub tiers: Vec<String>,
    pub tiers_over_time: TiersOverTime,
    pub churn_per_day: Vec<ChurnDay>,
    pub distribution: Distribution,
    pub separation: Vec<TierProfile>,
    pub movement: Movement,
    /// With `--segment-by`: the distribution per segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Segments>,
    /// With `--compare`: the same history under the other model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<super::compare::Comparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryFigures {
    /// First and last event time (RFC 3339); `None` for an empty history.
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub events: u64,
    pub accepted: u64,
    pub dead_lettered: BTreeMap<String, u64>,
    pub ignored: BTreeMap<String, u64>,
    pub erasures: u64,
    pub customers: u64,
    pub signals: BTreeMap<String, u64>,
}

/// Customers per tier (by the last emitted tier) at the start of each
/// period: a day, or a week past [`DAILY_UP_TO`] days.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TiersOverTime {
    /// `"day"` or `"week"`.
    pub period: String,
    pub points: Vec<TierPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierPoint {
    /// The period's start (RFC 3339).
    pub at: String,
    /// Customers per tier, lowest first.
    pub customers: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChurnDay {
    /// The day (RFC 3339, midnight UTC).
    pub day: String,
    pub churn_risk: u64,
    pub churn_risk_cleared: u64,
}

/// Scores at the end of the history, in bins of 10 points.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    /// When the scores were evaluated (the last event's time).
    pub at: Option<String>,
    /// Lower bound of each bin; the last bin includes 100.
    pub bins: Vec<f64>,
    pub customers: Vec<u64>,
    pub mean_score: f64,
}

/// The distribution at the end per segment (`--segment-by`), largest
/// segments first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segments {
    pub by: String,
    /// Said on the page: why every customer is in `(none)`, say.
    pub note: Option<String>,
    pub rows: Vec<SegmentRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentRow {
    pub segment: String,
    pub customers: u64,
    pub mean_score: f64,
    /// Customers per 10-point bin, as [`Distribution::customers`].
    pub bins: Vec<u64>,
}

/// The rows of the segments, the smaller ones past [`SEGMENTS_SHOWN`]
/// summed as `(other)`.
fn segment_figures(by: &SegmentBy, segments: HashMap<String, (u64, f64, Vec<u64>)>) -> Segments {
    let mut rows: Vec<SegmentRow> = segments
        .into_iter()
        .map(|(segment, (customers, sum, bins))| SegmentRow {
            segment,
            customers,
            mean_score: sum / customers.max(1) as f64,
            bins,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.customers
            .cmp(&a.customers)
            .then(a.segment.cmp(&b.segment))
    });
    if rows.len() > SEGMENTS_SHOWN {
        let rest = rows.split_off(SEGMENTS_SHOWN - 1);
        let customers: u64 = rest.iter().map(|r| r.customers).sum();
        let sum: f64 = rest.iter().map(|r| r.mean_score * r.customers as f64).sum();
        let mut bins = vec![0; BINS];
        for r in &rest {
            for (b, n) in bins.iter_mut().zip(&r.bins) {
                *b += n;
            }
        }
        rows.push(SegmentRow {
            segment: "(other)".into(),
            customers,
            mean_score: sum / customers.max(1) as f64,
            bins,
        });
    }
    for r in &mut rows {
        r.mean_score = round2(r.mean_score);
    }
    let note = (rows.len() == 1 && rows[0].segment == "(none)").then(|| match by {
        SegmentBy::Attribute(key) => {
            format!("no accepted event has attributes.{key}: every customer is in (none)")
        }
        SegmentBy::Channel => {
            "no customer has an event in a channel: every customer is in (none)".into()
        }
    });
    Segments {
        by: by.label(),
        note,
        rows,
    }
}

/// What the customers of one tier do, at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierProfile {
    pub tier: String,
    pub customers: u64,
    /// Mean contribution of each activity (points), model order.
    pub mean_contribution: Vec<(String, f64)>,
    /// Each channel's share of the tier's accepted events, 0..1.
    pub channel_share: Vec<(String, f64)>,
}

/// Tier at the start of the window against tier at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Movement {
    pub since: Option<String>,
    /// Row labels: the tiers, then `(new)` for customers with no tier yet.
    pub from: Vec<String>,
    /// Column labels: the tiers, then `(gone)` for customers no longer held.
    pub to: Vec<String>,
    /// `counts[from][to]`.
    pub counts: Vec<Vec<u64>>,
}

/// Gathers the figures during a replay.
pub struct FigureBuilder {
    model: std::sync::Arc<Model>,
    /// Start of the next day whose tier counts are due.
    next_day: Option<Millis>,
    daily: Vec<(Millis, Vec<u64>)>,
    churn: BTreeMap<Millis, (u64, u64)>,
    first_event: Option<Millis>,
    last_event: Option<Millis>,
    /// Per slot of the engine's table: accepted events per channel
    /// (`channels` counters a slot), moved as the table moves its records.
    channel_counts: Vec<u32>,
    channels: usize,
    /// Removals of the table already applied to the slot arrays.
    moves_applied: usize,
    /// Per slot: its customer's [`TierChange::customer`] key.
    slot_customer: Vec<u64>,
    /// Every customer's emitted tier over time, in the order things
    /// happened to it: read at the end, once the movement window's start
    /// is known.
    tier_log: Vec<TierChange>,
    hasher: foldhash::fast::FixedState,
    movement_start: MovementStart,
    segment_by: Option<SegmentBy>,
    /// Per slot: its segment's index in `segment_names`, as its latest
    /// event gave it; [`NO_SEGMENT`] for none.
    segment_of: Vec<u32>,
    segment_names: Vec<String>,
    segment_indexes: HashMap<String, u32>,
}

/// What `--segment-by` groups customers by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentBy {
    /// An `attributes` key of the events (the customer's latest value).
    Attribute(String),
    /// The channel of most of the customer's events.
    Channel,
}

impl SegmentBy {
    pub fn parse(text: &str) -> SegmentBy {
        match text {
            "channel" => SegmentBy::Channel,
            key => SegmentBy::Attribute(key.to_string()),
        }
    }

    fn label(&self) -> String {
        match self {
            SegmentBy::Channel => "channel (each customer's main channel)".into(),
            SegmentBy::Attribute(key) => format!("attributes.{key}"),
        }
    }
}

/// Distinct segment values kept apart; the rest count as `(other)`.
const MAX_SEGMENT_VALUES: usize = 1_000;
/// Segments shown; the smaller ones are summed as `(other)`.
const SEGMENTS_SHOWN: usize = 12;

/// The value of `attributes.<key>` in an event's text, as text.
fn attribute(line: &[u8], key: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        attributes: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let probe: Probe = serde_json::from_slice(line).ok()?;
    match probe.attributes?.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Keys that are hashes already: taken as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdHash = BuildHasherDefault<IdentityHasher>;

/// From `at` on, the customer is held with emitted tier `tier`, or no
/// longer held ([`GONE`]: erased or forgotten).
#[derive(Debug, Clone, Copy)]
struct TierChange {
    /// The customer: a hash of its id.
    customer: u64,
    at: Millis,
    tier: u8,
}

/// No segment value seen for the customer.
const NO_SEGMENT: u32 = u32::MAX;

/// A tier change meaning "no longer held" (erased or forgotten).
const GONE: u8 = u8::MAX;

impl FigureBuilder {
    /// The engine it watches must keep its journal of moves
    /// ([`Engine::track_moves`]): the builder keeps counters per slot.
    pub fn new(model: std::sync::Arc<Model>, movement_start: MovementStart) -> FigureBuilder {
        let channels = model.channels.len();
        FigureBuilder {
            model,
            next_day: None,
            daily: Vec::new(),
            churn: BTreeMap::new(),
            first_event: None,
            last_event: None,
            channel_counts: Vec::new(),
            channels,
            moves_applied: 0,
            slot_customer: Vec::new(),
            tier_log: Vec::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x6365_7372_6570_6f72),
            movement_start,
            segment_by: None,
            segment_of: Vec::new(),
            segment_names: Vec::new(),
            segment_indexes: HashMap::new(),
        }
    }

    /// Groups the end's scores by `segment_by` too.
    pub fn with_segments(mut self, segment_by: Option<SegmentBy>) -> FigureBuilder {
        self.segment_by = segment_by;
        self
    }

    fn segment_index(&mut self, value: String) -> u32 {
        if let Some(&i) = self.segment_indexes.get(&value) {
            return i;
        }
        let value = if self.segment_names.len() >= MAX_SEGMENT_VALUES {
            "(other)".to_string()
        } else {
            value
        };
        let i = *self
            .segment_indexes
            .entry(value.clone())
            .or_insert(self.segment_names.len() as u32);
        if i as usize == self.segment_names.len() {
            self.segment_names.push(value);
        }
        i
    }

    fn hash(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }

    /// The last event's time, if any.
    pub fn last_event(&self) -> Option<Millis> {
        self.last_event
    }

    /// The figures, from what was observed and the engine at the end.
    pub fn finish(mut self, engine: &Engine, summary: &Summary) -> Figures {
        if let Some(now) = self.last_event {
            self.follow_moves(engine, now);
        }
        let model = std::sync::Arc::clone(&self.model);
        let tier_names: Vec<String> = model.tiers.iter().map(|t| t.name.to_string()).collect();
        let end = self.last_event;
        let summary_figures = SummaryFigures {
            period_start: self.first_event.map(|t| format_rfc3339(t).to_string()),
            period_end: end.map(|t| format_rfc3339(t).to_string()),
            events: summary.events,
            accepted: summary.accepted,
            dead_lettered: InvalidReason::ALL
                .iter()
                .filter(|r| summary.invalid_count(**r) > 0)
                .map(|r| (r.as_str().to_string(), summary.invalid_count(*r)))
                .collect(),
            ignored: IgnoreReason::ALL
                .iter()
                .filter(|r| summary.ignored_count(**r) > 0)
                .map(|r| (r.as_str().to_string(), summary.ignored_count(*r)))
                .collect(),
            erasures: summary.erasures,
            customers: summary.customers,
            signals: SignalKind::NAMES
                .iter()
                .zip(summary.outputs)
                .map(|(name, n)| (name.to_string(), n))
                .collect(),
        };

        // The end state: every customer evaluated at the last event's time.
        let tiers = model.tiers.len();
        let activities = model.activities.len();
        let channels = model.channels.len();
        let mut bins = vec![0u64; BINS];
        let mut score_sum = 0.0;
        let mut per_tier_customers = vec![0u64; tiers];
        let mut per_tier_contribution = vec![vec![0.0f64; activities]; tiers];
        let mut per_tier_channel_events = vec![vec![0u64; channels]; tiers];
        // Per segment (by name): customers, score sum, bins.
        let mut segments: HashMap<String, (u64, f64, Vec<u64>)> = HashMap::new();
        let mut movement = vec![vec![0u64; tiers + 1]; tiers + 1];
        let since = end.map(|e| match self.movement_start {
            MovementStart::Before(window) => e - window,
            MovementStart::At(at) => at,
        });
        // Each customer's emitted tier at `since` (GONE: held no longer),
        // for those that had been held by then.
        let mut tier_at_since: HashMap<u64, u8, IdHash> = HashMap::default();
        if let Some(since) = since {
            for change in self.tier_log.iter().filter(|c| c.at <= since) {
                tier_at_since.insert(change.customer, change.tier);
            }
        }
        let table = engine.customers();
        let mut contributions = vec![0.0; activities];
        if let Some(at) = end {
            for slot in 0..table.len() as u32 {
                let (score, tier_id) = engine.evaluate_slot(slot, at, &mut contributions);
                let bin = ((score / 10.0).floor() as usize).min(BINS - 1);
                bins[bin] += 1;
                score_sum += score;
                let tier = usize::from(tier_id).min(tiers - 1);
                per_tier_customers[tier] += 1;
                for (sum, c) in per_tier_contribution[tier].iter_mut().zip(&contributions) {
                    *sum += c;
                }
                let start = slot as usize * channels;
                let events = self
                    .channel_counts
                    .get(start..start + channels)
                    .unwrap_or(&[]);
                for (sum, n) in per_tier_channel_events[tier].iter_mut().zip(events) {
                    *sum += u64::from(*n);
                }
                // Movement: the emitted tier at `since`; a customer not
                // held then is counted as new.
                let from = match tier_at_since.is_empty() {
                    true => None,
                    false => tier_at_since.remove(&self.slot_customer[slot as usize]),
                };
                let from = match from {
                    Some(t) if t != GONE => usize::from(t).min(tiers - 1),
                    _ => tiers,
                };
                movement[from][tier] += 1;
                if let Some(by) = &self.segment_by {
                    let name = match by {
                        SegmentBy::Attribute(_) => match self.segment_of.get(slot as usize) {
                            Some(&i) if i != NO_SEGMENT => self.segment_names[i as usize].as_str(),
                            _ => "(none)",
                        },
                        SegmentBy::Channel => events
                            .iter()
                            .enumerate()
                            .max_by_key(|(_, n)| **n)
                            .filter(|(_, n)| **n > 0)
                            .map_or("(none)", |(main, _)| &*model.channels[main]),
                    };
                    let entry = segments
                        .entry(name.to_string())
                        .or_insert_with(|| (0, 0.0, vec![0; BINS]));
                    entry.0 += 1;
                    entry.1 += score;
                    entry.2[bin] += 1;
                }
            }
            // Customers held at `since` and gone by the end.
            for &t in tier_at_since.values().filter(|t| **t != GONE) {
                movement[usize::from(t).min(tiers - 1)][tiers] += 1;
            }
        }
        let segments = self
            .segment_by
            .as_ref()
            .map(|by| segment_figures(by, segments));
        let held = table.len() as u64;
        let separation = (0..tiers)
            .map(|t| {
                let n = per_tier_customers[t];
                let events: u64 = per_tier_channel_events[t].iter().sum();
                TierProfile {
                    tier: tier_names[t].clone(),
                    customers: n,
                    mean_contribution: model
                        .activities
                        .iter()
                        .zip(&per_tier_contribution[t])
                        .map(|(a, sum)| (a.name.to_string(), round2(sum / n.max(1) as f64)))
                        .collect(),
                    channel_share: model
                        .channels
                        .iter()
                        .zip(&per_tier_channel_events[t])
                        .map(|(c, e)| (c.to_string(), round4(*e as f64 / events.max(1) as f64)))
                        .collect(),
                }
            })
            .collect();

        let movement = movement_figures(since, movement, &tier_names);
        let tiers_over_time = tiers_over_time(&self.daily);
        let churn_per_day = self
            .churn
            .iter()
            .map(|(day, (risk, cleared))| ChurnDay {
                day: format_rfc3339(*day).to_string(),
                churn_risk: *risk,
                churn_risk_cleared: *cleared,
            })
            .collect();
        Figures {
            summary: summary_figures,
            tiers: tier_names,
            tiers_over_time,
            churn_per_day,
            distribution: Distribution {
                at: end.map(|t| format_rfc3339(t).to_string()),
                bins: (0..BINS).map(|b| (b * 10) as f64).collect(),
                customers: bins,
                mean_score: round2(score_sum / held.max(1) as f64),
            },
            separation,
            movement,
            segments,
            comparison: None,
        }
    }

    /// Applies the table's removals since the last call to the slot
    /// arrays (a removed slot takes the last slot's counters), and logs
    /// each removed customer as gone at `now`.
    fn follow_moves(&mut self, engine: &Engine, now: Millis) {
        let channels = self.channels;
        let moves = engine.moves();
        for &(removed, last) in moves.get(self.moves_applied..).unwrap_or(&[]) {
            let (removed, last) = (removed as usize, last as usize);
            if let Some(&customer) = self.slot_customer.get(removed) {
                self.tier_log.push(TierChange {
                    customer,
                    at: now,
                    tier: GONE,
                });
            }
            if removed != last && last < self.segment_of.len() {
                self.channel_counts
                    .copy_within(last * channels..(last + 1) * channels, removed * channels);
                self.segment_of[removed] = self.segment_of[last];
                self.slot_customer[removed] = self.slot_customer[last];
            }
            self.channel_counts.truncate(last * channels);
            self.segment_of.truncate(last);
            self.slot_customer.truncate(last);
        }
        self.moves_applied = moves.len();
    }
}

fn movement_figures(since: Option<Millis>, counts: Vec<Vec<u64>>, names: &[String]) -> Movement {
    let mut from = names.to_vec();
    from.push("(new)".into());
    let mut to = names.to_vec();
    to.push("(gone)".into());
    Movement {
        since: since.map(|t| format_rfc3339(t).to_string()),
        from,
        to,
        counts,
    }
}

impl Observer for FigureBuilder {
    fn before_event(&mut self, engine: &Engine, t: Millis) {
        // Removals since the last event (an erasure's): gone by then.
        if let Some(now) = self.last_event {
            self.follow_moves(engine, now);
        }
        self.first_event = Some(self.first_event.map_or(t, |f| f.min(t)));
        self.last_event = Some(self.last_event.map_or(t, |l| l.max(t)));
        let due = *self.next_day.get_or_insert(t - t.rem_euclid(DAY));
        if t >= due {
            // The tiers as the day began (the events before it applied).
            let mut day = due;
            while day <= t {
                self.daily.push((day, engine.tier_counts().to_vec()));
                day += DAY;
            }
            self.next_day = Some(day);
        }
    }

    fn applied(&mut self, engine: &Engine, event: &Event<'_>, slot: Slot, line: &[u8]) {
        // Removals while the event was applied (a sweep's) came before it.
        let now = self.last_event.unwrap_or(event.timestamp);
        self.follow_moves(engine, now);
        let (s, channels) = (slot as usize, self.channels);
        if s >= self.segment_of.len() {
            // A new customer (slots are handed out in order), held from
            // now on with the tier the event left it in: logged after the
            // event's signals and removals, so it is what counts for now.
            self.segment_of.resize(s + 1, NO_SEGMENT);
            self.channel_counts.resize((s + 1) * channels, 0);
            let customer = self.hash(&event.customer_id);
            self.slot_customer.resize(s + 1, customer);
            self.tier_log.push(TierChange {
                customer,
                at: now,
                tier: engine.customers().record(slot).emitted_tier(),
            });
        }
        let channel = event
            .channel
            .unwrap_or_else(|| self.model.activities[usize::from(event.activity)].channel);
        if let Some(n) = self
            .channel_counts
            .get_mut(s * channels + usize::from(channel))
        {
            *n = n.saturating_add(1);
        }
        if let Some(SegmentBy::Attribute(key)) = &self.segment_by {
            let value = if key == "segment" {
                event.segment.as_deref().map(str::to_string)
            } else {
                attribute(line, key)
            };
            if let Some(value) = value {
                self.segment_of[s] = self.segment_index(value);
            }
        }
    }

    fn prefetch(&mut self, slot: Slot) {
        let start = slot as usize * self.channels;
        if let Some(counts) = self.channel_counts.get(start..start + self.channels) {
            prefetch_lines(counts);
        }
    }

    fn signal(&mut self, signal: &Signal<'_>) {
        let day = signal.at - signal.at.rem_euclid(DAY);
        match signal.kind {
            SignalKind::ChurnRisk { .. } => self.churn.entry(day).or_default().0 += 1,
            SignalKind::ChurnRiskCleared => self.churn.entry(day).or_default().1 += 1,
            SignalKind::ScoreChanged { previous_tier, .. } => {
                if signal.tier != previous_tier {
                    self.tier_log.push(TierChange {
                        customer: self.hash(signal.customer_id),
                        at: signal.at,
                        tier: signal.tier,
                    });
                }
            }
            // Logged as it leaves the table (`follow_moves`), as a
            // forgotten customer is.
            SignalKind::CustomerErased => {}
        }
    }
}

/// Daily points, or weekly ones (every seventh day) past [`DAILY_UP_TO`].
fn tiers_over_time(daily: &[(Millis, Vec<u64>)]) -> TiersOverTime {
    let weekly = daily.len() > DAILY_UP_TO;
    let step = if weekly { 7 } else { 1 };
    TiersOverTime {
        period: if weekly { "week" } else { "day" }.into(),
        points: daily
            .iter()
            .step_by(step)
            .map(|(at, customers)| TierPoint {
                at: format_rfc3339(*at).to_string(),
                customers: customers.clone(),
            })
            .collect(),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}
