//! The scoring state of the input partitions this instance owns, and what
//! the transport (`kafka`) and the state store (`snapshot`) agree on about
//! it, so that neither needs the other.
//!
//! Input is keyed by customer id, so a customer's events all land in one
//! partition number (of every co-partitioned input topic): each partition
//! number has its own [`Engine`], created (or restored) when the partition
//! is assigned and dropped when it is revoked. The worker that owns a
//! partition locks its state once per batch of events; the registry is a
//! `DashMap` so that the HTTP API, gauges and snapshots reach a partition
//! between batches.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::engine::Engine;
use crate::model::Model;
use crate::timestamp::Millis;

/// What a state store does when partitions come and go, and between the
/// batches of a partition it holds (snapshots).
pub trait PartitionHooks: Send + Sync {
    /// The state to start `partition` with, and for each input topic the
    /// offset to resume from (`None`: rebuild from the log). `committed`
    /// holds, per topic, the group's committed offset: in exactly_once
    /// mode a saved state past it covers outputs that were never committed
    /// and is not used. Gives up early (an empty state) when `cancel` is
    /// set.
    fn restore(
        &self,
        partition: i32,
        topics: &[String],
        committed: &[Option<i64>],
        cancel: &AtomicBool,
    ) -> (PartitionState, Vec<Option<i64>>);

    /// exactly_once: the store's records of `partition` go through `sink`,
    /// in the transaction of the worker that owns it, until `forget`.
    fn attach(&self, _partition: i32, _sink: Arc<dyn RecordSink>) {}

    /// Called with a partition's final state before it is dropped (revoke
    /// or shutdown), after its outputs are acknowledged. `next` holds, per
    /// input topic, the next offset to process. Done by `deadline`.
    fn release(
        &self,
        partition: i32,
        state: &mut PartitionState,
        next: &[(String, Option<i64>)],
        deadline: Instant,
    );

    /// Called by the worker that owns `partition` between its batches:
    /// periodic snapshots take a step here.
    fn tick(&self, _partition: i32, _state: &mut PartitionState, _progress: &Arc<dyn Progress>) {}

    /// The partition left this instance: work in progress for it stops.
    fn forget(&self, _partition: i32) {}
}

/// Where a state store's records go when they must be part of the
/// transaction that holds the outputs of the same events (exactly_once):
/// the transport sends them.
pub trait RecordSink: Send + Sync {
    /// Sends one record to `topic`'s `partition`; `value` `None` is a
    /// tombstone.
    fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(), String>;
}

/// How far a partition's processing, and the acknowledgement of what it
/// produced, have come: what a snapshot may cover.
pub trait Progress: Send + Sync {
    /// Per input topic of `partition`, the next offset to process.
    fn positions(&self, partition: i32) -> Vec<(String, i64)>;
    /// The offset of `topic`'s `partition` below which every output is
    /// acknowledged; `None` once the partition is gone.
    fn acknowledged(&self, topic: &str, partition: i32) -> Option<i64>;
}

/// One partition's state.
#[derive(Debug)]
pub struct PartitionState {
    pub engine: Engine,
    /// The last clock time used, so that the live clock never runs backwards
    /// when the wall clock does.
    pub clock: Millis,
    /// Per input topic, the group's committed offset when the partition was
    /// assigned. Events below it are being processed again to rebuild the
    /// state: their outputs were already acknowledged before that commit,
    /// so they are not published twice, and sweeps wait until the state has
    /// caught up.
    pub silent_below: Vec<(String, i64)>,
    /// The consumer reached the end of the partition's log at least once
    /// since the assignment.
    pub reached_end: bool,
    /// Where each input topic started at the assignment (for logs).
    pub started_at: Vec<(String, i64)>,
    /// Published scores by 10-point range, as of the owning worker's last
    /// scan (the gauge `ces_score_customers`).
    pub score_ranges: [i64; 10],
    /// Customers per `[metrics] segments` entry and tier, segment-major, as
    /// of that scan.
    pub segment_tiers: Vec<i64>,
}

impl PartitionState {
    pub fn new(model: Arc<Model>) -> PartitionState {
        PartitionState::from_engine(Engine::new(model))
    }

    pub fn from_engine(engine: Engine) -> PartitionState {
        PartitionState {
            engine: engine.with_sweeps_anytime(),
            clock: Millis::MIN,
            silent_below: Vec::new(),
            reached_end: false,
            started_at: Vec::new(),
            score_ranges: [0; 10],
            segment_tiers: Vec::new(),
        }
    }

    /// Whether the message at `offset` of `topic` only rebuilds state.
    /// Reaching the committed offset ends the rebuild of that topic.
    pub fn is_rebuilding(&mut self, topic: &str, offset: i64) -> bool {
        let Some(i) = self.silent_below.iter().position(|(t, _)| t == topic) else {
            return false;
        };
        let committed = self.silent_below[i].1;
        if offset + 1 >= committed {
            // The last message already published, or a later one: caught up.
            self.silent_below.swap_remove(i);
        }
        offset < committed
    }

    /// Whether every topic of the partition has caught up.
    pub fn caught_up(&self) -> bool {
        self.silent_below.is_empty()
    }

    /// The live clock for an event or a sweep at wall time `now`:
    /// `max(watermark, now)`, never behind a time already used.
    pub fn clock_at(&mut self, now: Millis) -> Millis {
        self.clock = self.clock.max(self.engine.live_clock(now));
        self.clock
    }
}

/// A shared handle on one partition's state.
pub type SharedPartition = Arc<Mutex<PartitionState>>;

/// The partitions owned by this instance, by partition number.
#[derive(Debug, Default, Clone)]
pub struct Partitions {
    map: Arc<DashMap<i32, SharedPartition>>,
}

impl Partitions {
    pub fn get(&self, partition: i32) -> Option<SharedPartition> {
        self.map.get(&partition).map(|e| Arc::clone(e.value()))
    }

    /// The state of `partition`, created with `create` if absent.
    pub fn get_or_insert_with(
        &self,
        partition: i32,
        create: impl FnOnce() -> PartitionState,
    ) -> SharedPartition {
        Arc::clone(
            self.map
                .entry(partition)
                .or_insert_with(|| Arc::new(Mutex::new(create())))
                .value(),
        )
    }

    pub fn insert(&self, partition: i32, state: PartitionState) {
        self.map.insert(partition, Arc::new(Mutex::new(state)));
    }

    pub fn remove(&self, partition: i32) -> Option<SharedPartition> {
        self.map.remove(&partition).map(|(_, v)| v)
    }

    /// Partition numbers owned, sorted.
    pub fn numbers(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.map.iter().map(|e| *e.key()).collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
