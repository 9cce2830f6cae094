//! What the Kafka pipeline shares with the rest of the process (the HTTP
//! API, the demo's view): the model, the partitions' state, the metrics
//! and the pipeline's health.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::{PartitionState, Partitions};

/// What the pipeline shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub model: Arc<Model>,
    pub partitions: Partitions,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// `[metrics] segments`, in order: a customer's segment id is its
    /// 1-based position here.
    pub segments: Arc<Vec<String>>,
    /// The changelog store deletes removed customers: partition states
    /// keep track of them.
    pub track_removals: bool,
}

impl Shared {
    pub fn new(model: Arc<Model>) -> Shared {
        Shared::with_segments(model, Vec::new())
    }

    pub fn with_segments(model: Arc<Model>, segments: Vec<String>) -> Shared {
        let metrics = Metrics::new(&model);
        Shared {
            model,
            partitions: Partitions::default(),
            metrics,
            health: Arc::new(Health::default()),
            segments: Arc::new(segments),
            track_removals: false,
        }
    }

    /// A new, empty partition state.
    pub fn new_state(&self) -> PartitionState {
        let mut engine = crate::engine::Engine::new(Arc::clone(&self.model));
        if self.track_removals {
            engine.customers_mut().track_removals();
        }
        PartitionState::from_engine(engine)
    }

    pub(crate) fn segment_id(&self, segment: Option<&str>) -> u8 {
        segment
            .and_then(|s| self.segments.iter().position(|x| x == s))
            .map_or(0, |i| (i + 1) as u8)
    }
}

/// The pipeline's liveness, for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer subscribed and the loop runs.
    pub consuming: AtomicBool,
    /// Wall time (ms) of the loop's latest turn.
    pub last_turn: std::sync::atomic::AtomicI64,
    /// Why the pipeline stopped, if it failed.
    pub failed: parking_lot::Mutex<Option<String>>,
}
