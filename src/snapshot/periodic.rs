//! Periodic snapshots taken while the stream flows.
//!
//! Every `snapshot.interval`, each caught-up partition starts a
//! copy-on-write snapshot: the table records where it stands, and from then
//! on a record about to change is saved first. The worker that owns the
//! partition then copies a chunk of records between its batches of events
//! (a pause of about a millisecond), streaming them into the snapshot file
//! or the changelog, so that memory stays bounded and no partition stalls.
//! A finished snapshot becomes current once every output of the events it
//! covers is acknowledged; that wait runs on a thread of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::partition::{PartitionState, Progress};
use crate::snapshot::changelog::{ChangelogStore, Ticket};
use crate::snapshot::local::LocalWriter;
use crate::snapshot::{header_for, Header, Store};

/// Records copied per loop turn: about half a megabyte with the default model.
const CHUNK: usize = 4_096;

struct Active {
    target: Target,
    offsets: Vec<(String, i64)>,
    started: Instant,
    buf: Vec<u32>,
}

/// Where an active snapshot goes.
enum Target {
    /// A file of the local store.
    File(LocalWriter),
    /// Removed and changed customers to the changelog, then this
    /// checkpoint, unless a newer snapshot comes first (the ticket).
    Changelog {
        header: Header,
        records: usize,
        ticket: Ticket,
    },
}

impl Target {
    fn abandon(self) {
        if let Target::File(w) = self {
            w.abandon();
        }
    }
}

/// A partition's periodic snapshots: when the next is due, the one in
/// progress.
struct Job {
    next_at: Instant,
    active: Option<Active>,
}

/// The periodic snapshots of the partitions this instance owns, each driven
/// by the worker that owns it.
pub struct Periodic {
    store: Store,
    fingerprint: u64,
    interval: Duration,
    jobs: Mutex<HashMap<i32, Job>>,
    metrics: Metrics,
    /// When each partition's newest snapshot became current.
    last_done: Arc<Mutex<HashMap<i32, Instant>>>,
    /// Partitions whose last incremental write failed: the next snapshot
    /// writes every customer again.
    rewrite: Arc<Mutex<std::collections::HashSet<i32>>>,
}

impl Periodic {
    pub fn new(store: Store, fingerprint: u64, interval: Duration, metrics: Metrics) -> Periodic {
        Periodic {
            store,
            fingerprint,
            interval,
            jobs: Mutex::new(HashMap::new()),
            metrics,
            last_done: Arc::new(Mutex::new(HashMap::new())),
            rewrite: Arc::new(Mutex::new(std::collections::HashSet::new())),
        }
    }

    /// A step of `p`'s periodic snapshots, between batches: starts one when
    /// due, copies a chunk of the one in progress.
    pub fn tick(&self, p: i32, partition_state: &mut PartitionState, progress: &Arc<dyn Progress>) {
        let now = Instant::now();
        let mut job = self.jobs.lock().remove(&p).unwrap_or(Job {
            next_at: now + self.interval,
            active: None,
        });
        if job.active.is_none() && now >= job.next_at {
            job.next_at = now + self.interval;
            job.active = self.start(p, partition_state, progress);
        }
        if let Some(active) = job.active.take() {
            job.active = self.advance(p, partition_state, active, progress);
        }
        self.jobs.lock().insert(p, job);
        self.refresh_age();
    }

    /// `p` left this instance: its snapshot in progress is abandoned (the
    /// release snapshot replaces it).
    pub fn forget(&self, p: i32) {
        if let Some(job) = self.jobs.lock().remove(&p) {
            if let Some(active) = job.active {
                active.target.abandon();
            }
        }
        self.last_done.lock().remove(&p);
    }

    fn start(
        &self,
        p: i32,
        partition_state: &mut PartitionState,
        progress: &Arc<dyn Progress>,
    ) -> Option<Active> {
        if !partition_state.caught_up() {
            return None;
        }
        let offsets = progress.positions(p);
        if offsets.is_empty() {
            return None; // nothing processed yet
        }
        if self.rewrite.lock().remove(&p) {
            partition_state.engine.customers_mut().mark_all_dirty();
        }
        // Customers removed before the cut: their tombstones come first.
        let removed = match &self.store {
            Store::Kafka(_) => partition_state.engine.customers_mut().take_removed(),
            Store::Local(_) => Vec::new(),
        };
        let (customers, ids_len) = partition_state.engine.customers_mut().begin_snapshot();
        let header = header_for(
            p,
            self.fingerprint,
            &partition_state.engine,
            partition_state.clock,
            offsets.clone(),
            customers,
            ids_len,
        );
        let target = match &self.store {
            Store::Local(store) => match store.begin(&header) {
                Ok(writer) => Target::File(writer),
                Err(e) => {
                    partition_state.engine.customers_mut().cancel_snapshot();
                    self.metrics
                        .snapshot_failures
                        .with_label_values(&["write"])
                        .inc();
                    tracing::error!(partition = p, "cannot start a snapshot: {e}");
                    return None;
                }
            },
            Store::Kafka(c) => {
                let ticket = c.ticket(p);
                if let Err(e) = c.write_tombstones(p, &removed) {
                    let table = partition_state.engine.customers_mut();
                    table.cancel_snapshot();
                    for r in removed {
                        table.note_removed(r);
                    }
                    self.metrics
                        .snapshot_failures
                        .with_label_values(&["write"])
                        .inc();
                    tracing::error!(partition = p, "cannot start a snapshot: {e}");
                    return None;
                }
                Target::Changelog {
                    header,
                    records: 0,
                    ticket,
                }
            }
        };
        Some(Active {
            target,
            offsets,
            started: Instant::now(),
            buf: Vec::new(),
        })
    }

    /// Copies a chunk of `p`'s snapshot; returns it while not finished.
    fn advance(
        &self,
        p: i32,
        partition_state: &mut PartitionState,
        mut active: Active,
        progress: &Arc<dyn Progress>,
    ) -> Option<Active> {
        active.buf.clear();
        let mut changed: Vec<(String, Vec<u32>)> = Vec::new();
        let table = partition_state.engine.customers_mut();
        if !table.snapshot_active() {
            active.target.abandon();
            return None;
        }
        let done = match &active.target {
            Target::File(_) => table.snapshot_chunk(CHUNK, &mut active.buf),
            Target::Changelog { .. } => table
                .snapshot_chunk_dirty(CHUNK, |id, w| changed.push((id.to_string(), w.to_vec()))),
        };
        let ids = done.then(|| table.finish_snapshot());
        let written = match (&mut active.target, &self.store) {
            (Target::File(w), _) => w.records(&active.buf).map_err(|e| e.to_string()),
            (Target::Changelog { records, .. }, Store::Kafka(c)) => {
                *records += changed.len();
                c.write_records(p, changed.iter().map(|(i, w)| (i.as_str(), w.as_slice())))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        if let Err(e) = written {
            self.fail(p, partition_state, active, e);
            return None;
        }
        let Some(ids) = ids else {
            return Some(active);
        };
        let Active {
            target,
            offsets,
            started,
            ..
        } = active;
        let pending = match target {
            Target::File(writer) => match writer.finish(&ids) {
                Ok(pending) => Finish::File(pending),
                Err(e) => {
                    self.metrics
                        .snapshot_failures
                        .with_label_values(&["write"])
                        .inc();
                    tracing::error!(partition = p, "cannot write a snapshot: {e}");
                    return None;
                }
            },
            Target::Changelog {
                header,
                records,
                ticket,
            } => match &self.store {
                Store::Kafka(c) => Finish::Changelog(Arc::clone(c), header, records, ticket),
                Store::Local(_) => return None,
            },
        };
        let written = started.elapsed();
        // In a transaction (exactly_once), the checkpoint goes in it now:
        // the commit that makes it durable makes the outputs of the events
        // it covers visible too.
        if let Finish::Changelog(c, header, records, ticket) = pending {
            if c.transactional(p) {
                let result = Finish::Changelog(Arc::clone(&c), header, records, ticket).commit();
                self.finished(p, result, written);
                return None;
            }
            return self.await_outputs(
                p,
                Finish::Changelog(c, header, records, ticket),
                offsets,
                written,
                progress,
            );
        }
        self.await_outputs(p, pending, offsets, written, progress)
    }

    /// Makes `pending` current on a thread of its own once every output of
    /// the events it covers is durable.
    fn await_outputs(
        &self,
        p: i32,
        pending: Finish,
        offsets: Vec<(String, i64)>,
        written: Duration,
        progress: &Arc<dyn Progress>,
    ) -> Option<Active> {
        // Current only once every output of the events it covers is
        // acknowledged.
        let progress = Arc::clone(progress);
        let metrics = self.metrics.clone();
        let last_done = Arc::clone(&self.last_done);
        let rewrite = Arc::clone(&self.rewrite);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let mut ready = Some(true);
                for (topic, offset) in &offsets {
                    match progress.acknowledged(topic, p) {
                        Some(safe) if safe >= *offset => {}
                        Some(_) => ready = Some(false),
                        None => ready = None, // revoked
                    }
                }
                match ready {
                    Some(true) => break,
                    None => {
                        pending.abandon(&rewrite, p);
                        return;
                    }
                    Some(false) if Instant::now() > deadline => {
                        tracing::warn!(
                            partition = p,
                            "snapshot outputs never acknowledged: dropped"
                        );
                        pending.abandon(&rewrite, p);
                        return;
                    }
                    Some(false) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            made_current(p, pending.commit(), written, &metrics, &last_done, &rewrite);
        });
        None
    }

    /// Records the end of `p`'s snapshot.
    fn finished(&self, p: i32, result: Result<u64, String>, written: Duration) {
        made_current(
            p,
            result,
            written,
            &self.metrics,
            &self.last_done,
            &self.rewrite,
        );
    }

    fn fail(&self, p: i32, partition_state: &mut PartitionState, active: Active, e: String) {
        partition_state.engine.customers_mut().cancel_snapshot();
        active.target.abandon();
        self.rewrite.lock().insert(p);
        self.metrics
            .snapshot_failures
            .with_label_values(&["write"])
            .inc();
        tracing::error!(partition = p, "cannot write a snapshot: {e}");
    }

    /// The age of the oldest partition's newest current snapshot.
    fn refresh_age(&self) {
        let owned: Vec<i32> = self.jobs.lock().keys().copied().collect();
        let done = self.last_done.lock();
        let oldest = owned
            .iter()
            .filter_map(|p| done.get(p))
            .map(|t| t.elapsed().as_secs_f64())
            .fold(0.0, f64::max);
        self.metrics.snapshot_age_seconds.set(oldest);
    }
}

/// Records a snapshot made current (or why it could not be).
fn made_current(
    p: i32,
    result: Result<u64, String>,
    written: Duration,
    metrics: &Metrics,
    last_done: &Mutex<HashMap<i32, Instant>>,
    rewrite: &Mutex<std::collections::HashSet<i32>>,
) {
    match result {
        Ok(bytes) => {
            metrics.snapshot_seconds.observe(written.as_secs_f64());
            metrics.snapshot_bytes.set(bytes as i64);
            last_done.lock().insert(p, Instant::now());
            tracing::debug!(
                partition = p,
                bytes,
                written_ms = written.as_millis() as u64,
                "snapshot current"
            );
        }
        Err(e) => {
            rewrite.lock().insert(p);
            metrics
                .snapshot_failures
                .with_label_values(&["write"])
                .inc();
            tracing::error!(partition = p, "cannot make a snapshot current: {e}");
        }
    }
}

/// A finished snapshot waiting to become current.
enum Finish {
    File(crate::snapshot::local::Pending),
    Changelog(Arc<ChangelogStore>, Header, usize, Ticket),
}

impl Finish {
    fn commit(self) -> Result<u64, String> {
        match self {
            Finish::File(p) => p.commit().map_err(|e| e.to_string()),
            Finish::Changelog(c, header, records, ticket) => {
                match c
                    .commit_ticket(ticket, &header)
                    .map_err(|e| e.to_string())?
                {
                    Some(bytes) => Ok(bytes + (records as u64) * u64::from(header.stride) * 4),
                    // A newer snapshot's checkpoint covers these records.
                    None => Ok(0),
                }
            }
        }
    }

    fn abandon(self, rewrite: &Mutex<std::collections::HashSet<i32>>, p: i32) {
        match self {
            Finish::File(pending) => pending.abandon(),
            // Records were written without a checkpoint: harmless (each
            // carries its own applied offsets), but rewrite everyone next
            // time so that no change is left behind a missing checkpoint.
            Finish::Changelog(..) => {
                rewrite.lock().insert(p);
            }
        }
    }
}
