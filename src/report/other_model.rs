//! The other model of `--compare`, replayed alongside this one: each line
//! is read once, parsed once when both models read events alike
//! ([`Model::parses_like`]; else parsed again under the other model), and
//! applied to a second engine that hashes customer ids as the first, so
//! that one hash per event serves both (and their prefetches).

use std::sync::Arc;

use crate::engine::{Engine, Signal};
use crate::event::{self, ParseContext, Parsed};
use crate::model::Model;
use crate::replay::{Observer, ReplayError};

use super::compare::ChurnWeeks;

/// The second engine of a comparison, fed by the first replay's lines.
pub struct OtherModelReplay {
    engine: Engine,
    /// The models parse alike: the first parse is the other's too.
    parses_alike: bool,
    weeks: ChurnWeeks,
    /// The first engine error (the replay stops being applied there).
    error: Option<ReplayError>,
}

impl OtherModelReplay {
    /// A replay under `model` beside `this` engine (still empty).
    pub fn new(model: Arc<Model>, this: &Engine) -> OtherModelReplay {
        let parses_alike = this.model().parses_like(&model);
        OtherModelReplay {
            engine: Engine::hashing_like(model, this),
            parses_alike,
            weeks: ChurnWeeks::default(),
            error: None,
        }
    }

    /// The engine at the end and its churn alerts per week.
    pub fn finish(self) -> Result<(Engine, ChurnWeeks), ReplayError> {
        match self.error {
            Some(error) => Err(error),
            None => Ok((self.engine, self.weeks)),
        }
    }
}

impl Observer for OtherModelReplay {
    fn customer_far_ahead(&mut self, hash: u64) {
        self.engine.prefetch_index_hashed(hash);
    }

    fn customer_ahead(&mut self, hash: u64) {
        self.engine.prefetch_hashed(hash);
    }

    fn parsed(&mut self, line_no: u64, line: &[u8], parsed: &Parsed<'_>, hash: u64) {
        if self.error.is_some() {
            return;
        }
        let parsed_again;
        let (parsed, hash) = if self.parses_alike {
            (parsed, hash)
        } else {
            parsed_again = event::parse(line, self.engine.model(), ParseContext::default());
            let hash = match &parsed_again {
                Parsed::Event(ev) => self.engine.customer_hash(&ev.customer_id),
                _ => 0,
            };
            (&parsed_again, hash)
        };
        let weeks = &mut self.weeks;
        let mut sink = |s: &Signal<'_>| weeks.signal(s);
        match parsed {
            Parsed::Event(ev) => {
                if let Err(source) = self.engine.process_replay_hashed(ev, hash, &mut sink) {
                    self.error = Some(ReplayError::Engine {
                        line: line_no,
                        source,
                    });
                }
            }
            Parsed::Erase(id) => {
                self.engine.erase_replay(id, &mut sink);
            }
            Parsed::Ignored(_) | Parsed::Invalid(_) => {}
        }
    }
}
