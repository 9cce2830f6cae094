//! Snapshots: the partitions' in-memory state made durable, so that a
//! restart, a crash or a rebalance loses nothing and counts nothing twice.
//!
//! A snapshot is a partition's customer records together with, per input
//! topic, the next offset to process: exactly the events before it are in
//! the state. On assignment a partition is restored from its newest valid
//! snapshot and resumes at those offsets; without one it rebuilds from the
//! log. A snapshot becomes current only once every output of the events it
//! covers is acknowledged, so that a restore never skips an event whose
//! signals were not delivered.
//!
//! Stores: [`local`] (a directory of checksummed files, the default).

pub mod changelog;
pub mod format;
pub mod local;
pub mod periodic;
pub mod settings;

use std::path::PathBuf;

pub use settings::{SnapshotSettings, StoreKind};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::customers::{CustomerTable, Layout};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::{PartitionHooks, PartitionState, Progress, RecordSink};
use crate::timestamp::{now_millis, Millis};

pub use format::Header;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path} is unusable: {source}")]
    Format {
        path: PathBuf,
        source: format::FormatError,
    },
    #[error("snapshot {path} was made with another scoring model or version of ces-stream (fingerprint {found:x}, expected {expected:x})")]
    Model {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// A restored partition state.
#[derive(Debug)]
pub struct Restored {
    pub header: Header,
    pub engine: Engine,
    pub path: PathBuf,
}

/// A partition's state in snapshot form.
pub fn header_for(
    partition: i32,
    fingerprint: u64,
    engine: &Engine,
    clock: Millis,
    offsets: Vec<(String, i64)>,
    customers: usize,
    ids_len: usize,
) -> Header {
    Header {
        partition,
        fingerprint,
        created_at: now_millis(),
        watermark: engine.watermark(),
        clock,
        stride: engine.customers().layout().stride() as u32,
        offsets,
        customers: customers as u64,
        ids_len: ids_len as u64,
    }
}

/// Rebuilds an engine from decoded snapshot parts, checking that they fit
/// the model.
pub fn engine_from(
    model: &Arc<Model>,
    header: &Header,
    words: Vec<u32>,
    ids: Vec<u8>,
) -> Result<Engine, format::FormatError> {
    let layout = Layout::for_model(model);
    if header.stride as usize != layout.stride() {
        return Err(format::FormatError::Inconsistent(format!(
            "records of {} words, the model needs {}",
            header.stride,
            layout.stride()
        )));
    }
    let table =
        CustomerTable::from_parts(layout, words, ids).map_err(format::FormatError::Inconsistent)?;
    Ok(Engine::from_parts(
        Arc::clone(model),
        table,
        header.watermark,
    ))
}

/// The version of the per-customer state: part of the fingerprint, so that
/// a snapshot of an older version is never read as this one (version 2:
/// scoring model v2, remembered event ids, no per-record offsets).
const STATE_VERSION: u32 = 2;

/// A fingerprint of the parts of the model that shape the state, and of
/// the state's version.
pub fn fingerprint(model: &Model) -> u64 {
    use std::hash::{Hash, Hasher};
    // A fixed hasher: the fingerprint is stored and compared across runs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    STATE_VERSION.hash(&mut h);
    model.input.dedup_depth.hash(&mut h);
    model.forget_after.hash(&mut h);
    model.half_life.hash(&mut h);
    for a in &model.activities {
        a.name.hash(&mut h);
        a.weight.to_bits().hash(&mut h);
        a.value_weight.to_bits().hash(&mut h);
        a.cap.map(f64::to_bits).hash(&mut h);
        a.channel.hash(&mut h);
    }
    for c in &model.channels {
        c.hash(&mut h);
    }
    if let Some(d) = model.diversity {
        d.window.hash(&mut h);
        d.bonus_per_channel.to_bits().hash(&mut h);
        d.max_channels.hash(&mut h);
    }
    format!("{:?}", model.normalization).hash(&mut h);
    for t in &model.tiers {
        t.name.hash(&mut h);
        t.above.map(f64::to_bits).hash(&mut h);
    }
    format!("{:?}", model.signals).hash(&mut h);
    h.finish()
}

/// A snapshot store.
#[derive(Debug, Clone)]
pub enum Store {
    Local(Arc<local::LocalStore>),
    Kafka(Arc<changelog::ChangelogStore>),
}

impl Store {
    /// What a restart would restore for `partition` (`inspect`).
    pub fn load(&self, partition: i32, model: &Arc<Model>, metrics: &Metrics) -> Option<Restored> {
        match self {
            Store::Local(s) => s.load(partition, model, metrics),
            Store::Kafka(s) => s.load(partition, model, metrics).restored,
        }
    }

    /// Saves a partition whose processing is paused (release): a whole file,
    /// or the changed customers and a checkpoint.
    pub fn save_now(
        &self,
        partition: i32,
        fingerprint: u64,
        state: &mut PartitionState,
        offsets: Vec<(String, i64)>,
        deadline: std::time::Instant,
    ) -> Result<u64, String> {
        match self {
            Store::Local(s) => s
                .save_now(partition, fingerprint, state, offsets)
                .map_err(|e| e.to_string()),
            Store::Kafka(c) => {
                let table = state.engine.customers_mut();
                table.cancel_snapshot();
                // A periodic snapshot whose checkpoint never came: the
                // changes it wrote are written again.
                match c.cancel_awaited(partition, deadline) {
                    Some(true) => table.mark_all_dirty(),
                    Some(false) => {}
                    None => {
                        return Err("a periodic snapshot's checkpoint is still being written: no release snapshot (the next owner restores that one)".into())
                    }
                }
                let removed = table.take_removed();
                let (customers, ids_len) = table.begin_snapshot();
                let mut records: Vec<(String, Vec<u32>)> = Vec::new();
                table.snapshot_chunk_dirty(usize::MAX, |id, w| {
                    records.push((id.to_string(), w.to_vec()))
                });
                table.finish_snapshot();
                let header = header_for(
                    partition,
                    fingerprint,
                    &state.engine,
                    state.clock,
                    offsets,
                    customers,
                    ids_len,
                );
                let result = c
                    .write_tombstones(partition, &removed)
                    .and_then(|()| {
                        c.write_records(
                            partition,
                            records.iter().map(|(i, w)| (i.as_str(), w.as_slice())),
                        )
                    })
                    .and_then(|_| {
                        c.write_checkpoint(
                            &header,
                            deadline.saturating_duration_since(std::time::Instant::now()),
                        )
                    });
                match result {
                    Ok(bytes) => Ok(bytes + records.len() as u64 * (header.stride as u64 * 4)),
                    Err(e) => {
                        let table = state.engine.customers_mut();
                        table.mark_all_dirty();
                        for r in removed {
                            table.note_removed(r);
                        }
                        Err(e.to_string())
                    }
                }
            }
        }
    }
}

/// The hooks the pipeline calls on assignment and release (restore from,
/// and save to, the store) and between batches (periodic snapshots).
pub struct StoreHooks {
    pub store: Store,
    pub model: Arc<Model>,
    pub metrics: Metrics,
    pub periodic: periodic::Periodic,
    /// `[kafka] guarantee = "exactly_once"`: a saved state is only used up
    /// to the group's committed offsets.
    pub exactly_once: bool,
}

impl StoreHooks {
    pub fn new(
        store: Store,
        model: Arc<Model>,
        metrics: Metrics,
        interval: std::time::Duration,
        exactly_once: bool,
    ) -> StoreHooks {
        let periodic = periodic::Periodic::new(
            store.clone(),
            fingerprint(&model),
            interval,
            metrics.clone(),
        );
        StoreHooks {
            store,
            model,
            metrics,
            periodic,
            exactly_once,
        }
    }
}

impl PartitionHooks for StoreHooks {
    fn tick(&self, partition: i32, state: &mut PartitionState, progress: &Arc<dyn Progress>) {
        self.periodic.tick(partition, state, progress);
    }

    fn forget(&self, partition: i32) {
        self.periodic.forget(partition);
        if let Store::Kafka(c) = &self.store {
            c.detach(partition);
        }
    }

    fn attach(&self, partition: i32, sink: Arc<dyn RecordSink>) {
        if let Store::Kafka(c) = &self.store {
            c.attach(partition, sink);
        }
    }

    fn restore(
        &self,
        partition: i32,
        topics: &[String],
        committed: &[Option<i64>],
        cancel: &AtomicBool,
    ) -> (PartitionState, Vec<Option<i64>>) {
        let started = std::time::Instant::now();
        // exactly_once: a saved state past the group's committed offsets
        // covers events whose outputs were aborted; it is never used.
        let committed_of = |topic: &str| {
            topics
                .iter()
                .zip(committed)
                .find(|(t, _)| *t == topic)
                .and_then(|(_, c)| *c)
        };
        let within = |header: &Header| {
            !self.exactly_once
                || header
                    .offsets
                    .iter()
                    .all(|(t, o)| committed_of(t).is_some_and(|c| *o <= c))
        };
        // The changelog store also says what its next snapshot must clean.
        let (restored, loaded) = match &self.store {
            Store::Local(s) => (
                s.load_where(partition, &self.model, &self.metrics, within),
                None,
            ),
            Store::Kafka(c) => {
                let mut loaded = c.load_until(partition, &self.model, &self.metrics, cancel);
                if loaded.restored.as_ref().is_some_and(|r| !within(&r.header)) {
                    self.metrics
                        .snapshot_failures
                        .with_label_values(&["uncommitted"])
                        .inc();
                    tracing::warn!(
                        partition,
                        "the changelog's last checkpoint is past the group's committed offsets: rebuilding from the log"
                    );
                    loaded = c.discard(partition, loaded);
                }
                (loaded.restored.take(), Some(loaded))
            }
        };
        let (mut state, offsets) = match restored {
            Some(r) => {
                let customers = r.engine.customers().len();
                self.metrics
                    .snapshot_restored_customers
                    .inc_by(customers as u64);
                tracing::info!(
                    partition,
                    customers,
                    path = %r.path.display(),
                    offsets = ?r.header.offsets,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "partition restored from snapshot"
                );
                let offsets = topics
                    .iter()
                    .map(|t| {
                        r.header
                            .offsets
                            .iter()
                            .find(|(name, _)| name == t)
                            .map(|(_, o)| *o)
                    })
                    .collect();
                let mut state = PartitionState::from_engine(r.engine);
                state.clock = r.header.clock;
                (state, offsets)
            }
            None => {
                tracing::info!(partition, "no snapshot: rebuilding from the log");
                let engine = Engine::new(Arc::clone(&self.model));
                (
                    PartitionState::from_engine(engine),
                    vec![None; topics.len()],
                )
            }
        };
        if let Some(loaded) = loaded {
            loaded.prepare(&mut state.engine);
        }
        (state, offsets)
    }

    fn release(
        &self,
        partition: i32,
        state: &mut PartitionState,
        next: &[(String, Option<i64>)],
        deadline: std::time::Instant,
    ) {
        let offsets: Vec<(String, i64)> = next
            .iter()
            .filter_map(|(t, o)| o.map(|o| (t.clone(), o)))
            .collect();
        if offsets.is_empty() {
            return; // nothing processed: the previous snapshot still holds
        }
        let started = std::time::Instant::now();
        match self.store.save_now(
            partition,
            fingerprint(&self.model),
            state,
            offsets,
            deadline,
        ) {
            Ok(bytes) => {
                self.metrics
                    .snapshot_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.snapshot_bytes.set(bytes as i64);
                tracing::info!(partition, bytes, "snapshot written on release");
            }
            Err(e) => {
                self.metrics
                    .snapshot_failures
                    .with_label_values(&["write"])
                    .inc();
                tracing::error!(partition, "cannot write the release snapshot: {e}");
            }
        }
    }
}
