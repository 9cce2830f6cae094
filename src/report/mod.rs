//! `ces-stream report`: a history replayed by the same engine and rules as
//! `replay`, summed up in one self-contained HTML page (and, with
//! `--json`, the same figures for other tools): what the tiers hold and
//! how they moved, what separates them, where the scores lie.
//!
//! Streaming, as `replay`: the figures are aggregates gathered while the
//! events go by ([`figures`]), so memory is replay's plus a few counters
//! per customer; the page ([`html`]) holds aggregates only.

pub mod compare;
pub mod figures;
pub mod html;
pub mod other_model;

use std::io::BufRead;
use std::sync::Arc;

use crate::engine::Engine;
use crate::model::Model;
use crate::replay::{replay_observed, Progress, ReplayError, Summary};
use compare::ChurnWeeks;
pub use figures::MovementStart;
use figures::{FigureBuilder, Figures, SegmentBy};
use other_model::OtherModelReplay;

/// What a report shows besides its fixed sections.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// When the movement matrix's "from" tiers are taken.
    pub movement_start: MovementStart,
    /// `--segment-by`.
    pub segment_by: Option<SegmentBy>,
}

/// An engine for `model` and the builder that watches it (the engine
/// keeps its journal of moves: the builder's counters follow its slots).
fn watched_engine(model: Arc<Model>, options: &ReportOptions) -> (Engine, FigureBuilder) {
    let mut engine = Engine::new(Arc::clone(&model));
    engine.track_moves();
    let builder =
        FigureBuilder::new(model, options.movement_start).with_segments(options.segment_by.clone());
    (engine, builder)
}

/// Replays `input` under `model` and gathers the report's figures.
pub fn figures(
    model: Arc<Model>,
    input: impl BufRead,
    options: &ReportOptions,
    progress: Option<Progress<'_>>,
) -> Result<(Figures, Summary), ReplayError> {
    let (mut engine, mut builder) = watched_engine(model, options);
    let summary = replay_observed(
        &mut engine,
        input,
        None::<std::io::Sink>,
        None,
        progress,
        &mut builder,
    )?;
    Ok((builder.finish(&engine, &summary), summary))
}

/// As [`figures`], and the same history replayed under `other` in the
/// same pass (read and, when the models read events alike, parsed once),
/// compared with it customer by customer.
pub fn figures_compared(
    model: Arc<Model>,
    other: Arc<Model>,
    input: impl BufRead,
    options: &ReportOptions,
    progress: Option<Progress<'_>>,
) -> Result<(Figures, Summary), ReplayError> {
    let (mut engine, mut builder) = watched_engine(model, options);
    let mut this_weeks = ChurnWeeks::default();
    let mut other_replay = OtherModelReplay::new(other, &engine);
    let summary = replay_observed(
        &mut engine,
        input,
        None::<std::io::Sink>,
        None,
        progress,
        &mut Both(&mut builder, &mut Both(&mut this_weeks, &mut other_replay)),
    )?;
    let (other_engine, other_weeks) = other_replay.finish()?;
    let end = builder.last_event();
    let comparison = compare::compare(&engine, &other_engine, end, &this_weeks, &other_weeks);
    let mut figures = builder.finish(&engine, &summary);
    figures.comparison = Some(comparison);
    Ok((figures, summary))
}

/// Two observers of one replay.
struct Both<'a, A, B>(&'a mut A, &'a mut B);

impl<A: crate::replay::Observer, B: crate::replay::Observer> crate::replay::Observer
    for Both<'_, A, B>
{
    fn before_event(&mut self, engine: &Engine, t: crate::timestamp::Millis) {
        self.0.before_event(engine, t);
        self.1.before_event(engine, t);
    }
    fn applied(
        &mut self,
        engine: &Engine,
        event: &crate::event::Event<'_>,
        slot: crate::customers::Slot,
        line: &[u8],
    ) {
        self.0.applied(engine, event, slot, line);
        self.1.applied(engine, event, slot, line);
    }
    fn prefetch(&mut self, slot: crate::customers::Slot) {
        self.0.prefetch(slot);
        self.1.prefetch(slot);
    }
    fn signal(&mut self, signal: &crate::engine::Signal<'_>) {
        self.0.signal(signal);
        self.1.signal(signal);
    }
    fn customer_far_ahead(&mut self, hash: u64) {
        self.0.customer_far_ahead(hash);
        self.1.customer_far_ahead(hash);
    }
    fn customer_ahead(&mut self, hash: u64) {
        self.0.customer_ahead(hash);
        self.1.customer_ahead(hash);
    }
    fn parsed(&mut self, line_no: u64, line: &[u8], parsed: &crate::event::Parsed<'_>, hash: u64) {
        self.0.parsed(line_no, line, parsed, hash);
        self.1.parsed(line_no, line, parsed, hash);
    }
}
