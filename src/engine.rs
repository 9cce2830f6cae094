//! The scoring engine of one partition: sections 3 to 5 of the spec.
//!
//! Pure and deterministic: no I/O and no clock. Time comes in as an
//! argument (the replay clock or the live clock), signals go out through a
//! [`SignalSink`], and the same inputs always give the same outputs.

use crate::customers::{flags, CustomerTable, Layout, NewCustomer, Record, Slot, TableFull};
use crate::event::{Event, IgnoreReason};
use crate::model::{Model, TierId};
use crate::timestamp::Millis;
use std::sync::Arc;

/// What caused an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Event,
    Decay,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::Decay => "decay",
        }
    }
}

/// The churn reasons of one evaluation, as a bit set in spec order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reasons(u8);

impl Reasons {
    pub const SCORE_DROP: Reasons = Reasons(1);
    pub const INACTIVE: Reasons = Reasons(2);
    pub const LOWEST_TIER: Reasons = Reasons(4);
    const NAMES: [(Reasons, &'static str); 3] = [
        (Reasons::SCORE_DROP, "score_drop"),
        (Reasons::INACTIVE, "inactive"),
        (Reasons::LOWEST_TIER, "lowest_tier"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn contains(self, r: Reasons) -> bool {
        self.0 & r.0 == r.0
    }
    fn insert(&mut self, r: Reasons) {
        self.0 |= r.0;
    }
    /// The names of the reasons present, in spec order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .into_iter()
            .filter(move |(r, _)| self.contains(*r))
            .map(|(_, n)| n)
    }
}

/// One output event of section 6, borrowed from the engine's state.
#[derive(Debug, Clone, Copy)]
pub struct Signal<'a> {
    pub customer_id: &'a str,
    pub at: Millis,
    pub score: f64,
    pub tier: TierId,
    pub kind: SignalKind<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum SignalKind<'a> {
    ScoreChanged {
        previous_score: f64,
        previous_tier: TierId,
        cause: Cause,
        event_id: Option<&'a str>,
        /// `c_k` per activity, in model order.
        contributions: &'a [f64],
    },
    ChurnRisk {
        peak_score: f64,
        reasons: Reasons,
        last_event_at: Millis,
    },
    ChurnRiskCleared,
    /// An erasure request removed the customer (`score` and `tier` mean
    /// nothing here).
    CustomerErased,
}

impl SignalKind<'_> {
    /// Every kind's name, in the order of [`SignalKind::index`].
    pub const NAMES: [&'static str; 4] = [
        "score_changed",
        "churn_risk",
        "churn_risk_cleared",
        "customer_erased",
    ];

    pub fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// A small index per kind, for counters.
    pub fn index(&self) -> usize {
        match self {
            SignalKind::ScoreChanged { .. } => 0,
            SignalKind::ChurnRisk { .. } => 1,
            SignalKind::ChurnRiskCleared => 2,
            SignalKind::CustomerErased => 3,
        }
    }
}

/// The hash a customer remembers of an event id (section 1,
/// de-duplication): xxh3, stable across processes and versions because it
/// is kept in snapshots; never 0, which marks an empty place.
#[inline]
pub fn event_id_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes()).max(1)
}

/// Receives the signals the engine emits, in order.
pub trait SignalSink {
    fn signal(&mut self, signal: &Signal<'_>);
}

impl<F: FnMut(&Signal<'_>)> SignalSink for F {
    fn signal(&mut self, signal: &Signal<'_>) {
        self(signal)
    }
}

/// What became of an event handed to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied { new_customer: bool, slot: Slot },
    Ignored(IgnoreReason),
}

/// Why the engine could not apply an event. Not the event's fault: the
/// partition's state is full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Full(#[from] TableFull),
}

/// A customer's state evaluated at some time, without changing it.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerView {
    pub customer_id: String,
    pub at: Millis,
    pub score: f64,
    pub tier: TierId,
    /// `c_k` per activity, in model order.
    pub contributions: Vec<f64>,
    pub at_risk: bool,
    pub peak_score: f64,
    pub peak_at: Millis,
    pub last_event_at: Millis,
}

/// The scoring state of one partition.
pub struct Engine {
    model: Arc<Model>,
    table: CustomerTable,
    watermark: Option<Millis>,
    /// Scratch space for the contributions of one evaluation.
    contributions: Vec<f64>,
    /// Sweeps only ever run at multiples of `sweep_interval` later than any
    /// evaluation so far (replay); lets sweeps skip more customers.
    sweeps_on_grid: bool,
    /// Sweeps skip customers whose quiet horizon is ahead (always, but
    /// for the test that compares skipping with evaluating everyone).
    skip_quiet: bool,
    /// Customers per emitted tier, and customers at risk: kept as the
    /// state changes, so that metrics never scan the table.
    tier_counts: Vec<u64>,
    at_risk: u64,
    /// Customers removed by sweeps (`scoring.forget_after`) so far.
    forgotten: u64,
    /// With [`Self::track_moves`]: every removal's (slot, last slot).
    moves: Option<Vec<(Slot, Slot)>>,
    /// The decay over `QUIET_STEPS[i] - 1` sweep intervals.
    grid_decay: [f64; 4],
}

/// `a.min(b)` for numbers that are never NaN, in one instruction
/// (`minsd`): `f64::min` adds four more per call to honour NaN, and the
/// score's parts take one min and one max per activity and evaluation.
/// The result is that of `f64::min` for every non-NaN pair, signed zeros
/// included (both give `b` when `a == b`).
#[inline(always)]
fn min_sd(a: f64, b: f64) -> f64 {
    if a < b {
        a
    } else {
        b
    }
}

/// `a.max(b)` for numbers that are never NaN (`maxsd`); see [`min_sd`].
#[inline(always)]
fn max_sd(a: f64, b: f64) -> f64 {
    if a > b {
        a
    } else {
        b
    }
}

/// How many due customers ahead a sweep prefetches.
const SWEEP_PREFETCH: usize = 8;

/// Sweep counts the quiet horizon tries, longest first.
const QUIET_STEPS: [i64; 4] = [256, 32, 4, 1];

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("customers", &self.table.len())
            .field("watermark", &self.watermark)
            .finish()
    }
}

/// A record's score at one time, split the way the quiet-horizon bounds
/// need it: positive and negative contributions and the diversity factor.
struct Evaluated {
    positive: f64,
    negative: f64,
    diversity: f64,
    score: f64,
}

impl Evaluated {
    /// Section 3's score from its parts.
    #[inline]
    fn new(model: &Model, positive: f64, negative: f64, diversity: f64) -> Evaluated {
        let score = model.normalize((positive + negative).max(0.0) * diversity);
        Evaluated {
            positive,
            negative,
            diversity,
            score,
        }
    }
}

/// The positive and negative parts of a customer's score at the next sweep
/// boundary `at`, for the quiet horizon (see [`Engine::score_and_next`]).
struct Next {
    at: Millis,
    positive: f64,
    negative: f64,
}

/// Adds the contribution of one activity's decayed sum to the positive or
/// the negative part, and returns it: `min(sum * factor, cap)`.
/// Branch-free: adding the +0.0 that max/min give for the other sign
/// leaves each part exactly as adding only its own terms would.
#[inline(always)]
fn add_part(sum: f64, factor: f64, cap: f64, positive: &mut f64, negative: &mut f64) -> f64 {
    let c = min_sd(sum * factor, cap);
    *positive += max_sd(c, 0.0);
    *negative += min_sd(c, 0.0);
    c
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Engine {
        let layout = Layout::for_model(&model);
        let n = model.activities.len();
        let model_tiers = model.tiers.len();
        let interval = model.signals.sweep_interval;
        let grid_decay = QUIET_STEPS.map(|s| model.decay((s - 1) * interval));
        Engine {
            model,
            table: CustomerTable::new(layout),
            watermark: None,
            contributions: vec![0.0; n],
            sweeps_on_grid: true,
            skip_quiet: true,
            tier_counts: vec![0; model_tiers],
            at_risk: 0,
            forgotten: 0,
            moves: None,
            grid_decay,
        }
    }

    /// A fresh engine for `model` whose customer ids hash as in `other`'s
    /// ([`Self::customer_hash`]): one hash per event serves both.
    pub fn hashing_like(model: Arc<Model>, other: &Engine) -> Engine {
        let mut engine = Engine::new(model);
        engine.table.hash_like(&other.table);
        engine
    }

    /// An engine over a restored table.
    pub fn from_parts(
        model: Arc<Model>,
        table: CustomerTable,
        watermark: Option<Millis>,
    ) -> Engine {
        let mut e = Engine::new(model);
        e.table = table;
        e.watermark = watermark;
        e.recount();
        e
    }

    /// Sweeps evaluate every customer, as section 4 describes them, instead
    /// of skipping those whose quiet horizon shows that nothing can change.
    /// Only for tests: the outputs must be the same either way.
    #[doc(hidden)]
    pub fn evaluating_every_sweep(mut self) -> Engine {
        self.skip_quiet = false;
        self
    }

    /// For live mode: sweeps run at any time, not only on the replay grid.
    pub fn with_sweeps_anytime(mut self) -> Engine {
        self.sweeps_on_grid = false;
        self
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn customers(&self) -> &CustomerTable {
        &self.table
    }

    /// Starts loading a customer's state into the cache ahead of its event
    /// (the second stage: the index is read, the record is loaded).
    #[inline]
    pub fn prefetch(&self, customer_id: &str) {
        self.table.prefetch(customer_id);
    }

    /// The first stage of [`Self::prefetch`], further ahead: starts loading
    /// the index lines of a customer, without reading memory.
    #[inline]
    pub fn prefetch_index(&self, customer_id: &str) {
        self.table.prefetch_index(customer_id);
    }

    /// The hash of a customer id in this engine's table, for the `_hashed`
    /// calls: a batch computes it once per event instead of once per stage.
    #[inline]
    pub fn customer_hash(&self, customer_id: &str) -> u64 {
        self.table.hash_id(customer_id)
    }

    /// [`Self::prefetch`] by the id's [`Self::customer_hash`].
    #[inline]
    pub fn prefetch_hashed(&self, hash: u64) {
        self.table.prefetch_hashed(hash);
    }

    /// [`Self::prefetch_hashed`], handing each candidate slot to `also`.
    #[inline]
    pub fn prefetch_hashed_with(&self, hash: u64, also: impl FnMut(Slot)) {
        self.table.prefetch_hashed_with(hash, also);
    }

    /// Keeps a journal of the records a removal moves, for whoever keeps
    /// data of its own per slot (the report): see [`Self::moves`].
    pub fn track_moves(&mut self) {
        self.moves.get_or_insert_with(Vec::new);
    }

    /// Every removal since [`Self::track_moves`], in order: (the removed
    /// slot, the last slot, whose record moved into it; equal when the
    /// last record itself was removed).
    pub fn moves(&self) -> &[(Slot, Slot)] {
        self.moves.as_deref().unwrap_or_default()
    }

    /// [`Self::prefetch_index`] by the id's [`Self::customer_hash`].
    #[inline]
    pub fn prefetch_index_hashed(&self, hash: u64) {
        self.table.prefetch_index_hashed(hash);
    }

    pub fn customers_mut(&mut self) -> &mut CustomerTable {
        &mut self.table
    }

    /// Customers per tier (by the last emitted tier), lowest first.
    pub fn tier_counts(&self) -> &[u64] {
        &self.tier_counts
    }

    /// Customers currently at risk of churn.
    pub fn at_risk_count(&self) -> u64 {
        self.at_risk
    }

    /// Customers forgotten by sweeps so far (`scoring.forget_after`).
    pub fn forgotten_count(&self) -> u64 {
        self.forgotten
    }

    /// Recounts tiers and risk from the table (after a restore).
    pub fn recount(&mut self) {
        self.tier_counts.iter_mut().for_each(|c| *c = 0);
        self.at_risk = 0;
        for slot in 0..self.table.len() as Slot {
            let rec = self.table.record(slot);
            if let Some(c) = self.tier_counts.get_mut(usize::from(rec.emitted_tier())) {
                *c += 1;
            }
            self.at_risk += u64::from(rec.has(flags::AT_RISK));
        }
    }

    /// The largest timestamp of the accepted events so far.
    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    fn too_late(&self, t: Millis) -> bool {
        self.watermark
            .is_some_and(|w| t < w.saturating_sub(self.model.input.max_lateness))
    }

    /// Section 4, replay: the clock is the watermark, and crossing a
    /// `sweep_interval` boundary first sweeps every known customer at that
    /// boundary.
    pub fn process_replay(
        &mut self,
        event: &Event<'_>,
        sink: &mut impl SignalSink,
    ) -> Result<Outcome, EngineError> {
        let hash = self.table.hash_id(&event.customer_id);
        self.process_replay_hashed(event, hash, sink)
    }

    /// [`Self::process_replay`] with the customer id's
    /// [`Self::customer_hash`] computed beforehand.
    pub fn process_replay_hashed(
        &mut self,
        event: &Event<'_>,
        hash: u64,
        sink: &mut impl SignalSink,
    ) -> Result<Outcome, EngineError> {
        if self.too_late(event.timestamp) {
            return Ok(Outcome::Ignored(IgnoreReason::TooLate));
        }
        let mut found = self.table.find_hashed(hash, &event.customer_id);
        let id_hash = self.id_hash(event);
        if self.is_duplicate(found, id_hash) {
            return Ok(Outcome::Ignored(IgnoreReason::Duplicate));
        }
        let t = event.timestamp;
        let next = self.watermark.map_or(t, |w| w.max(t));
        if let Some(w) = self.watermark {
            let interval = self.model.signals.sweep_interval;
            let boundary = next.div_euclid(interval);
            if boundary > w.div_euclid(interval) {
                self.sweep(boundary * interval, sink);
                // Forgetting moves and removes customers.
                if self.model.forget_after.is_some() {
                    found = self.table.find_hashed(hash, &event.customer_id);
                }
            }
        }
        self.watermark = Some(next);
        self.apply_found(event, hash, found, id_hash, next, sink)
    }

    /// The hash of the event's id, when de-duplication is on and it has one.
    #[inline]
    fn id_hash(&self, event: &Event<'_>) -> Option<u64> {
        if self.model.input.dedup_depth == 0 {
            return None;
        }
        event.event_id.as_deref().map(event_id_hash)
    }

    /// Section 1, de-duplication: whether the customer (in `slot`, if
    /// known) remembers the id, as its state stands before the event (and
    /// before any sweep).
    #[inline]
    fn is_duplicate(&self, slot: Option<Slot>, id_hash: Option<u64>) -> bool {
        match (slot, id_hash) {
            (Some(slot), Some(h)) => self.table.record(slot).remembers(h),
            _ => false,
        }
    }

    /// Section 1, erasure requests: removes a known customer and emits
    /// `customer_erased` at `t`. Moves no watermark and sweeps nothing.
    /// Returns whether the customer was known.
    pub fn erase(&mut self, customer_id: &str, t: Millis, sink: &mut impl SignalSink) -> bool {
        let Some(slot) = self.table.find(customer_id) else {
            return false;
        };
        sink.signal(&Signal {
            customer_id,
            at: t,
            score: 0.0,
            tier: self.model.lowest_tier(),
            kind: SignalKind::CustomerErased,
        });
        self.remove(slot);
        true
    }

    /// An erasure with the replay clock (T = W).
    pub fn erase_replay(&mut self, customer_id: &str, sink: &mut impl SignalSink) -> bool {
        // Without a watermark no event was applied: no customer is known.
        match self.watermark {
            Some(w) => self.erase(customer_id, w, sink),
            None => false,
        }
    }

    /// Drops a customer's state, keeping the counters right.
    fn remove(&mut self, slot: Slot) {
        let rec = self.table.record(slot);
        let tier = usize::from(rec.emitted_tier());
        if let Some(c) = self.tier_counts.get_mut(tier) {
            *c = c.saturating_sub(1);
        }
        if rec.has(flags::AT_RISK) {
            self.at_risk = self.at_risk.saturating_sub(1);
        }
        if self.moves.is_some() {
            self.journal_move(slot);
        }
        self.table.remove(slot);
    }

    /// Notes a removal in the journal of moves (only a report keeps one).
    #[cold]
    #[inline(never)]
    fn journal_move(&mut self, slot: Slot) {
        let last = self.table.len().saturating_sub(1) as Slot;
        if let Some(moves) = &mut self.moves {
            moves.push((slot, last));
        }
    }

    /// Section 4, live: the clock is `max(watermark, now)`; sweeps are the
    /// caller's, on wall time.
    pub fn process_live(
        &mut self,
        event: &Event<'_>,
        now: Millis,
        sink: &mut impl SignalSink,
    ) -> Result<Outcome, EngineError> {
        if self.too_late(event.timestamp) {
            return Ok(Outcome::Ignored(IgnoreReason::TooLate));
        }
        let hash = self.table.hash_id(&event.customer_id);
        let found = self.table.find_hashed(hash, &event.customer_id);
        let id_hash = self.id_hash(event);
        if self.is_duplicate(found, id_hash) {
            return Ok(Outcome::Ignored(IgnoreReason::Duplicate));
        }
        let next = self
            .watermark
            .map_or(event.timestamp, |w| w.max(event.timestamp));
        self.watermark = Some(next);
        self.apply_found(event, hash, found, id_hash, next.max(now), sink)
    }

    /// The live clock: never behind the watermark.
    pub fn live_clock(&self, now: Millis) -> Millis {
        self.watermark.map_or(now, |w| w.max(now))
    }

    /// Applies an accepted event at clock `t` (`t >= event.timestamp`) and
    /// evaluates its customer. `hash` is the customer id's table hash,
    /// `found` its slot if known, `id_hash` the event id's.
    fn apply_found(
        &mut self,
        event: &Event<'_>,
        hash: u64,
        found: Option<Slot>,
        id_hash: Option<u64>,
        t: Millis,
        sink: &mut impl SignalSink,
    ) -> Result<Outcome, EngineError> {
        let te = event.timestamp;
        let (slot, new_customer) = match found {
            Some(slot) => (slot, false),
            None => {
                let init = NewCustomer {
                    last_event_at: te,
                    peak_at: t,
                };
                (
                    self.table
                        .insert_new_hashed(hash, &event.customer_id, init)?,
                    true,
                )
            }
        };
        if new_customer {
            self.tier_counts[0] += 1;
        }
        let model = &*self.model;
        let activity = &model.activities[usize::from(event.activity)];
        let points = activity.weight + activity.value_weight * event.value;
        let mut rec = self.table.record_mut(slot);
        let last = rec.last_event_at();
        if te > last {
            rec.advance_to(te, model.decay(te - last));
        }
        let k = usize::from(event.activity);
        let last = rec.last_event_at();
        let add = points * model.decay(last - te);
        rec.set_sum(k, f64::from(rec.sum(k)) + add);
        if event.segment_id != 0 {
            rec.set_segment(event.segment_id);
        }
        if points > 0.0 && model.diversity.is_some() {
            let channel = event.channel.unwrap_or(activity.channel);
            rec.touch_channel(usize::from(channel), te);
        }
        if let Some(h) = id_hash {
            rec.remember(h);
        }
        rec.set_flag(flags::DIRTY, true);
        self.evaluate(slot, t, Cause::Event, event.event_id.as_deref(), sink);
        Ok(Outcome::Applied { new_customer, slot })
    }

    /// Section 4: evaluates every customer at `t` with cause `decay`, then
    /// (section 8) removes those silent for `scoring.forget_after`.
    pub fn sweep(&mut self, t: Millis, sink: &mut impl SignalSink) {
        let mut next = 0;
        while let Some(n) = self.sweep_part(next, usize::MAX, t, sink) {
            next = n;
        }
    }

    /// One part of a sweep at `t`: up to `budget` customers from slot
    /// `start` on, so that a live sweep can run in parts between batches of
    /// events. Returns where the next part starts, or `None` when the
    /// sweep reached the last customer. (Forgotten customers are replaced
    /// by the last record, so the next part may start where this one did.)
    ///
    /// Customers whose wake-up mark shows that an evaluation at `t` cannot
    /// change anything are skipped: the result is the same as evaluating
    /// them, at a fraction of the cost (see [`Engine::quiet_until`]).
    pub fn sweep_part(
        &mut self,
        start: Slot,
        budget: usize,
        t: Millis,
        sink: &mut impl SignalSink,
    ) -> Option<Slot> {
        let interval = self.model.signals.sweep_interval;
        let forget_after = self.model.forget_after;
        // Skip a customer when t <= (base + wake) * interval.
        let sweep = (t + interval - 1).div_euclid(interval);
        let mut base = self.table.wake_base();
        // Evaluating everyone (a test's choice): every mark is below this.
        let skip_quiet = self.skip_quiet;
        let need_at = |base: i64| if skip_quiet { sweep - base } else { i64::MAX };
        let mut need = need_at(base);
        let mut slot = start;
        let mut left = budget;
        // The due customers a few places ahead, whose records are being
        // prefetched: a sweep evaluates a scattered few of a million
        // records, each a wait for memory without this. `ahead` is where
        // the look-ahead stopped, `in_flight` how many it found before
        // `ahead` that the loop has not reached. Only hints: a removal
        // that moves a record can make them stale, never wrong.
        let mut ahead = slot as usize;
        let mut in_flight = 0usize;
        // Slots are counted from the marks (one per customer), not from
        // the records: `len()` would divide by the stride every time.
        while (slot as usize) < self.table.wakes().len() {
            if left == 0 {
                return Some(slot);
            }
            left -= 1;
            let wakes = self.table.wakes();
            let due = |w: u16| w == 0 || i64::from(w) < need;
            ahead = ahead.max(slot as usize + 1);
            while in_flight < SWEEP_PREFETCH && ahead < wakes.len() {
                if due(wakes[ahead]) {
                    self.table.prefetch_slot(ahead as Slot);
                    in_flight += 1;
                }
                ahead += 1;
            }
            if !due(wakes[slot as usize]) {
                slot += 1;
                continue;
            }
            in_flight = in_flight.saturating_sub(1);
            self.evaluate(slot, t, Cause::Decay, None, sink);
            // An evaluation may move the base of the marks.
            if self.table.wake_base() != base {
                base = self.table.wake_base();
                need = need_at(base);
            }
            // The quiet horizon never reaches past a customer's forgetting,
            // so every customer due is evaluated here.
            if forget_after.is_some_and(|d| t - self.table.record(slot).last_event_at() >= d) {
                self.remove(slot);
                self.forgotten += 1;
                continue; // the last record moved into `slot`
            }
            slot += 1;
        }
        None
    }

    /// Section 3 for one record at `t`; fills `contributions` (c_k per
    /// activity).
    #[inline]
    fn score_at(model: &Model, rec: Record<'_>, t: Millis, contributions: &mut [f64]) -> Evaluated {
        let factor = model.decay(t - rec.last_event_at());
        let (mut positive, mut negative) = (0.0, 0.0);
        let (sums, caps) = (rec.sum_bits(), model.caps());
        for ((&bits, &cap), out) in sums.iter().zip(caps).zip(contributions) {
            let sum = f64::from(f32::from_bits(bits));
            *out = add_part(sum, factor, cap, &mut positive, &mut negative);
        }
        Evaluated::new(model, positive, negative, Self::diversity_at(model, rec, t))
    }

    /// [`Engine::score_at`] at `t`, and the parts at `t1`, in one pass over
    /// the sums: the same operations, in the same order, as evaluating
    /// each time on its own.
    // Always inlined into the evaluation: left to the heuristics, it
    // was not once the report's code joined the crate (replay +2.5% of
    // its instructions, callgrind).
    #[inline(always)]
    fn score_and_next(
        model: &Model,
        rec: Record<'_>,
        t: Millis,
        t1: Millis,
        contributions: &mut [f64],
    ) -> (Evaluated, Next) {
        let last = rec.last_event_at();
        let (factor, factor1) = (model.decay(t - last), model.decay(t1 - last));
        let (mut positive, mut negative) = (0.0, 0.0);
        let (mut positive1, mut negative1) = (0.0, 0.0);
        let (sums, caps) = (rec.sum_bits(), model.caps());
        for ((&bits, &cap), out) in sums.iter().zip(caps).zip(contributions) {
            let sum = f64::from(f32::from_bits(bits));
            *out = add_part(sum, factor, cap, &mut positive, &mut negative);
            add_part(sum, factor1, cap, &mut positive1, &mut negative1);
        }
        let now = Evaluated::new(model, positive, negative, Self::diversity_at(model, rec, t));
        let next = Next {
            at: t1,
            positive: positive1,
            negative: negative1,
        };
        (now, next)
    }

    #[inline]
    fn diversity_at(model: &Model, rec: Record<'_>, t: Millis) -> f64 {
        let Some(d) = model.diversity else {
            return 1.0;
        };
        let n = rec.channels_within(t, d.window);
        if n >= 1 {
            1.0 + d.bonus_per_channel * f64::from(n.min(d.max_channels) - 1)
        } else {
            1.0
        }
    }

    /// Section 5: evaluates one customer at `t` and emits what changed.
    fn evaluate(
        &mut self,
        slot: Slot,
        t: Millis,
        cause: Cause,
        event_id: Option<&str>,
        sink: &mut impl SignalSink,
    ) {
        let model = &*self.model;
        let wake_base = self.table.wake_base();
        let (customer_id, mut rec) = self.table.id_and_record_mut(slot);
        // On the grid, the parts at the next sweep (for the quiet horizon)
        // are computed in the same pass over the sums as the score.
        let interval = model.signals.sweep_interval;
        let (now, next) = if self.sweeps_on_grid {
            let t1 = (t.div_euclid(interval) + 1) * interval;
            let (now, next) =
                Self::score_and_next(model, rec.as_record(), t, t1, &mut self.contributions);
            (now, Some(next))
        } else {
            let now = Self::score_at(model, rec.as_record(), t, &mut self.contributions);
            (now, None)
        };
        // 1. The tier, with hysteresis around the emitted one.
        let s = now.score;
        let tier = model.tier_from(s, rec.emitted_tier());

        // 2. Peak. Compared at the stored (f32) precision, so that the same
        // score evaluated twice counts as reaching the peak again.
        let churn = &model.signals.churn;
        // Every change below is snapshot state: mark the record dirty.
        let mut changed = false;
        // A peak of 0 replaced by a score of 0 is left alone: while the peak
        // is 0 every evaluation resets it, so its time can never matter, and
        // leaving it keeps fully decayed customers from changing at every sweep.
        let peak_noop = s as f32 == 0.0 && rec.peak_score() == 0.0;
        if (s as f32 >= rec.peak_score() || t - rec.peak_at() > churn.lookback) && !peak_noop {
            changed |= rec.peak_score() != s as f32 || rec.peak_at() != t;
            rec.set_peak(s as f32, t);
        }
        // 3.
        if tier > model.lowest_tier() && !rec.has(flags::EVER_ENGAGED) {
            rec.set_flag(flags::EVER_ENGAGED, true);
            changed = true;
        }
        // 4.
        let emitted = f64::from(rec.emitted_score());
        let emitted_tier = rec.emitted_tier();
        if (s - emitted).abs() >= model.signals.min_delta || tier != emitted_tier {
            sink.signal(&Signal {
                customer_id: customer_id.as_str(),
                at: t,
                score: s,
                tier,
                kind: SignalKind::ScoreChanged {
                    previous_score: emitted,
                    previous_tier: emitted_tier,
                    cause,
                    event_id,
                    contributions: &self.contributions,
                },
            });
            rec.set_emitted(s as f32, tier);
            if tier != emitted_tier {
                self.tier_counts[usize::from(emitted_tier)] -= 1;
                self.tier_counts[usize::from(tier)] += 1;
            }
            changed = true;
        }
        // 5.
        let peak = f64::from(rec.peak_score());
        let ever_engaged = rec.has(flags::EVER_ENGAGED);
        let mut reasons = Reasons::default();
        if peak >= churn.min_peak && s <= peak * (1.0 - churn.drop_ratio) {
            reasons.insert(Reasons::SCORE_DROP);
        }
        if ever_engaged && t - rec.last_event_at() >= churn.inactivity {
            reasons.insert(Reasons::INACTIVE);
        }
        if ever_engaged && tier == model.lowest_tier() {
            reasons.insert(Reasons::LOWEST_TIER);
        }
        let at_risk = rec.has(flags::AT_RISK);
        if !at_risk && !reasons.is_empty() {
            sink.signal(&Signal {
                customer_id: customer_id.as_str(),
                at: t,
                score: s,
                tier,
                kind: SignalKind::ChurnRisk {
                    peak_score: peak,
                    reasons,
                    last_event_at: rec.last_event_at(),
                },
            });
            rec.set_flag(flags::AT_RISK, true);
            self.at_risk += 1;
            changed = true;
        } else if at_risk && reasons.is_empty() {
            sink.signal(&Signal {
                customer_id: customer_id.as_str(),
                at: t,
                score: s,
                tier,
                kind: SignalKind::ChurnRiskCleared,
            });
            rec.set_flag(flags::AT_RISK, false);
            self.at_risk -= 1;
            changed = true;
        }
        if changed {
            rec.set_flag(flags::DIRTY, true);
        }

        let wake = Self::quiet_until(model, rec.as_record(), t, &now, next, &self.grid_decay);
        match wake {
            Some(n) if n - wake_base >= i64::from(u16::MAX) || n - wake_base < 1 => {
                // Out of the marks' range: move the base to the current sweep.
                self.table.rebase_wakes(t.div_euclid(interval));
                let rel = n - self.table.wake_base();
                let w = rel.clamp(0, i64::from(u16::MAX)) as u16;
                self.table.set_wake(slot, w);
            }
            Some(n) => self.table.set_wake(slot, (n - wake_base) as u16),
            None => self.table.set_wake(slot, 0),
        }
    }

    /// The quiet horizon of a customer just evaluated at `t`: the index of
    /// the last sweep up to which, without new events, no evaluation can
    /// change its state or emit anything. `None` when it cannot be shown.
    ///
    /// Without events, the positive contributions only shrink, the negative
    /// ones only grow toward 0 and the diversity multiplier only drops, so
    /// over `(t, t2]` the score lies between the score built from the
    /// smallest positive and negative parts and the one built from the
    /// largest. If that whole range keeps every rule of section 5 on the
    /// same side (no emission, no new peak, the same tier and churn
    /// reasons), every evaluation in the window would change nothing.
    ///
    /// `next`: on the grid, the parts at the next boundary (see
    /// [`Engine::score_and_next`]); `None` off the grid.
    fn quiet_until(
        model: &Model,
        rec: Record<'_>,
        t: Millis,
        now: &Evaluated,
        next: Option<Next>,
        grid_decay: &[f64; 4],
    ) -> Option<i64> {
        let grid = next.is_some();
        // Far from the range where f64 rounding cannot matter: always evaluate.
        if now.positive > 1e12 || now.negative < -1e12 {
            return None;
        }
        let interval = model.signals.sweep_interval;
        let n = t.div_euclid(interval);
        let churn = &model.signals.churn;
        let min_delta = model.signals.min_delta;
        let peak = rec.peak_score();
        let emitted = f64::from(rec.emitted_score());
        let emitted_tier = usize::from(rec.emitted_tier());

        // Time limits: an expiring peak resets (a peak of 0 is reset by any
        // score anyway), and `inactive` must not flip inside the window.
        let mut last_t2 = Millis::MAX;
        if peak != 0.0 {
            last_t2 = rec.peak_at().saturating_add(churn.lookback);
        }
        let inactive_at = rec.last_event_at().saturating_add(churn.inactivity);
        if rec.has(flags::EVER_ENGAGED) && t < inactive_at {
            last_t2 = last_t2.min(inactive_at - 1);
        }
        // A customer due to be forgotten must be evaluated (and removed).
        if let Some(d) = model.forget_after {
            last_t2 = last_t2.min(rec.last_event_at().saturating_add(d) - 1);
        }

        // Score limits the window must stay strictly within. The window may
        // start after `t` (on the grid), so each rule must keep the value it
        // has now, not merely stay constant.
        let drop_at = f64::from(peak) * (1.0 - churn.drop_ratio);
        let drop_applies = f64::from(peak) >= churn.min_peak;
        let dropped = drop_applies && now.score <= drop_at;
        let mut floor = emitted - min_delta;
        let mut ceiling = emitted + min_delta;
        // The tier stays while the score stays within h of its bounds.
        let h = model.signals.tier_hysteresis;
        if let Some(above) = model.tiers[emitted_tier].above {
            floor = floor.max(above - h);
        }
        if let Some(next) = model.tiers.get(emitted_tier + 1).and_then(|t| t.above) {
            ceiling = ceiling.min(next + h);
        }
        if drop_applies {
            if dropped {
                ceiling = ceiling.min(drop_at);
            } else {
                floor = floor.max(drop_at);
            }
        }
        // Below the peak even at f32 precision (see `evaluate`); a peak of 0
        // instead needs the score to stay 0.
        if peak > 0.0 {
            ceiling = ceiling.min(f64::from(peak) * (1.0 - f64::from(f32::EPSILON)));
        }
        // Allowance for rounding between these bounds and a real evaluation.
        const MARGIN: f64 = 1e-7;
        let (floor, ceiling) = (floor + MARGIN, ceiling - MARGIN);
        if ceiling <= 0.0 || floor >= 100.0 {
            return None;
        }
        // Compared as raw values: normalization is increasing.
        let raw_floor = if floor < 0.0 {
            -1.0
        } else {
            model.raw_for_score(floor)
        };
        let raw_ceiling = if ceiling > 100.0 {
            f64::INFINITY
        } else {
            model.raw_for_score(ceiling)
        };

        // Bounds start at the next possible sweep: the next boundary on the
        // grid, else now.
        let (t1, p1, n1, d1) = match next {
            Some(x) => (
                x.at,
                x.positive,
                x.negative,
                Self::diversity_at(model, rec, x.at),
            ),
            None => (t, now.positive, now.negative, now.diversity),
        };
        for (i, steps) in QUIET_STEPS.into_iter().enumerate() {
            let t2 = (n + steps) * interval;
            if t2 > last_t2 {
                continue;
            }
            // Without events, the positive part decays at least as fast as
            // `g` and the negative part exactly as fast (it has no cap). On
            // the grid, t2 - t1 is a whole number of intervals: precomputed.
            let g = if grid {
                grid_decay[i]
            } else {
                model.decay(t2 - t1)
            };
            let lo = (p1 * g + n1).max(0.0) * Self::diversity_at(model, rec, t2);
            let hi = (p1 + n1 * g).max(0.0) * d1;
            let quiet = lo > raw_floor && hi < raw_ceiling && (peak != 0.0 || hi <= 0.0);
            if quiet {
                return Some(n + steps);
            }
        }
        None
    }

    /// The state of one customer at `t`, without changing anything.
    pub fn view(&self, customer_id: &str, t: Millis) -> Option<CustomerView> {
        self.table
            .find(customer_id)
            .map(|slot| self.view_slot(slot, t))
    }

    /// The score and tier of the customer in `slot` at `t`, its
    /// contributions written into `contributions` (model order): a
    /// [`Self::view_slot`] that allocates nothing, for reports over every
    /// customer.
    #[inline(never)]
    pub fn evaluate_slot(&self, slot: Slot, t: Millis, contributions: &mut [f64]) -> (f64, TierId) {
        let rec = self.table.record(slot);
        let t = t.max(rec.last_event_at());
        let e = Self::score_at(&self.model, rec, t, contributions);
        (e.score, self.model.tier_from(e.score, rec.emitted_tier()))
    }

    /// The state of the customer in `slot` at `t`.
    pub fn view_slot(&self, slot: Slot, t: Millis) -> CustomerView {
        let rec = self.table.record(slot);
        let mut contributions = vec![0.0; self.model.activities.len()];
        let t = t.max(rec.last_event_at());
        let e = Self::score_at(&self.model, rec, t, &mut contributions);
        CustomerView {
            customer_id: self.table.id(slot).to_string(),
            at: t,
            score: e.score,
            tier: self.model.tier_from(e.score, rec.emitted_tier()),
            contributions,
            at_risk: rec.has(flags::AT_RISK),
            peak_score: f64::from(rec.peak_score()),
            peak_at: rec.peak_at(),
            last_event_at: rec.last_event_at(),
        }
    }
}
