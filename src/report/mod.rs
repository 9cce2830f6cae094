//! `ces-stream report`: a history replayed by the same engine and rules as
//! `replay`, summed up in one self-contained HTML page (and, with
//! `--json`, the same figures for other tools): what the tiers hold and
//! how they moved, what separates them, where the scores lie.
//!
//! Streaming, as `replay`: the figures are aggregates gathered while the
//! events go by ([`figures`]), so memory is replay's plus a few counters
//! per customer; the page ([`html`]) holds aggregates only.

pub mod figures;
pub mod html;

use std::io::BufRead;
use std::sync::Arc;

use crate::engine::Engine;
use crate::model::Model;
use crate::replay::{replay_observed, Progress, ReplayError, Summary};
use figures::{FigureBuilder, Figures};

/// Replays `input` under `model` and gathers the report's figures.
pub fn figures(
    model: Arc<Model>,
    input: impl BufRead,
    movement_window: crate::timestamp::Millis,
    progress: Option<Progress<'_>>,
) -> Result<(Figures, Summary), ReplayError> {
    let mut engine = Engine::new(Arc::clone(&model));
    let mut builder = FigureBuilder::new(model, movement_window);
    let summary = replay_observed(
        &mut engine,
        input,
        std::io::sink(),
        None,
        progress,
        &mut builder,
    )?;
    Ok((builder.finish(&engine, &summary), summary))
}
