//! The local snapshot store: a directory per partition holding versioned,
//! checksummed files `snapshot-<seq>.ces`, the newest `keep` of them.
//!
//! A snapshot is written to a temporary name, fsynced, renamed into place
//! and the directory fsynced, so that a crash at any moment leaves either
//! the previous snapshots or the new one, never a torn file under a final
//! name. A corrupt or truncated file is reported (log and metric) and the
//! previous one is used.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::partition::PartitionState;
use crate::snapshot::format::{self, Encoder, Header};
use crate::snapshot::{engine_from, header_for, Restored, SnapshotError};

/// A directory of partition snapshots.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    keep: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LocalStore {
    /// A store under `dir/<group_id>`.
    pub fn new(dir: &Path, group_id: &str, keep: usize) -> LocalStore {
        LocalStore {
            root: dir.join(group_id),
            keep: keep.max(1),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn partition_dir(&self, partition: i32) -> PathBuf {
        self.root.join(format!("partition-{partition}"))
    }

    /// Partitions with a snapshot directory.
    pub fn partitions(&self) -> Vec<i32> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut v: Vec<i32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("partition-")?
                    .parse()
                    .ok()
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Snapshot files of a partition, newest first: (sequence, path).
    pub fn files(&self, partition: i32) -> Vec<(u64, PathBuf)> {
        let dir = self.partition_dir(partition);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut v: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let seq = name
                    .to_str()?
                    .strip_prefix("snapshot-")?
                    .strip_suffix(".ces")?
                    .parse()
                    .ok()?;
                Some((seq, e.path()))
            })
            .collect();
        v.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        v
    }

    /// The newest snapshot of `partition` that reads back whole and fits
    /// the model. Bad files are reported and skipped.
    pub fn load(&self, partition: i32, model: &Arc<Model>, metrics: &Metrics) -> Option<Restored> {
        self.load_where(partition, model, metrics, |_| true)
    }

    /// As [`LocalStore::load`], skipping snapshots whose header `usable`
    /// refuses (exactly_once: those past the group's committed offsets).
    pub fn load_where(
        &self,
        partition: i32,
        model: &Arc<Model>,
        metrics: &Metrics,
        usable: impl Fn(&Header) -> bool,
    ) -> Option<Restored> {
        self.remove_temporaries(partition);
        let expected = super::fingerprint(model);
        for (_, path) in self.files(partition) {
            match self.read(&path, model, expected) {
                Ok(r) if !usable(&r.header) => {
                    metrics
                        .snapshot_failures
                        .with_label_values(&["uncommitted"])
                        .inc();
                    tracing::warn!(
                        path = %path.display(),
                        offsets = ?r.header.offsets,
                        "skipping snapshot past the group's committed offsets: the transaction of its outputs never committed"
                    );
                }
                Ok(r) => return Some(r),
                Err(e @ SnapshotError::Model { .. }) => {
                    // Not damage: another model or an older version of the
                    // state; the partition is rebuilt from the log.
                    metrics
                        .snapshot_failures
                        .with_label_values(&["incompatible"])
                        .inc();
                    tracing::warn!("skipping snapshot: {e}");
                }
                Err(e) => {
                    metrics
                        .snapshot_failures
                        .with_label_values(&["corrupt"])
                        .inc();
                    tracing::warn!("skipping snapshot: {e}");
                }
            }
        }
        None
    }

    /// Reads one snapshot file.
    pub fn read(
        &self,
        path: &Path,
        model: &Arc<Model>,
        expected: u64,
    ) -> Result<Restored, SnapshotError> {
        let bytes = fs::read(path).map_err(io(path))?;
        let format_err = |source| SnapshotError::Format {
            path: path.to_path_buf(),
            source,
        };
        let (header, words, ids) = format::decode(&bytes).map_err(format_err)?;
        if header.fingerprint != expected {
            return Err(SnapshotError::Model {
                path: path.to_path_buf(),
                found: header.fingerprint,
                expected,
            });
        }
        let engine = engine_from(model, &header, words, ids).map_err(format_err)?;
        Ok(Restored {
            header,
            engine,
            path: path.to_path_buf(),
        })
    }

    fn remove_temporaries(&self, partition: i32) {
        if let Ok(entries) = fs::read_dir(self.partition_dir(partition)) {
            for e in entries.filter_map(|e| e.ok()) {
                if e.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// One more than any snapshot of the partition, finished or not, so
    /// that a snapshot begun later always sorts after one begun earlier.
    fn next_seq(&self, partition: i32) -> u64 {
        let Ok(entries) = fs::read_dir(self.partition_dir(partition)) else {
            return 1;
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?.strip_prefix("snapshot-")?;
                name.split('.').next()?.parse::<u64>().ok()
            })
            .max()
            .map_or(1, |s| s + 1)
    }

    /// Starts a snapshot file; records are streamed into it.
    pub fn begin(&self, header: &Header) -> Result<LocalWriter, SnapshotError> {
        let dir = self.partition_dir(header.partition);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let seq = self.next_seq(header.partition);
        let tmp = dir.join(format!("snapshot-{seq:020}.tmp"));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let encoder =
            Encoder::new(BufWriter::with_capacity(1 << 20, file), header).map_err(io(&tmp))?;
        Ok(LocalWriter {
            store: self.clone(),
            partition: header.partition,
            tmp,
            final_path: dir.join(format!("snapshot-{seq:020}.ces")),
            encoder,
        })
    }

    /// Writes a whole partition state now (the partition is not being
    /// processed meanwhile, as on release). Returns the bytes written.
    pub fn save_now(
        &self,
        partition: i32,
        fingerprint: u64,
        state: &PartitionState,
        offsets: Vec<(String, i64)>,
    ) -> Result<u64, SnapshotError> {
        let table = state.engine.customers();
        let (words, ids) = table.raw_parts();
        let header = header_for(
            partition,
            fingerprint,
            &state.engine,
            state.clock,
            offsets,
            table.len(),
            ids.len(),
        );
        let mut w = self.begin(&header)?;
        w.records(words)?;
        w.finish(ids)?.commit()
    }

    fn prune(&self, partition: i32) {
        for (_, path) in self.files(partition).into_iter().skip(self.keep) {
            let _ = fs::remove_file(path);
        }
    }
}

/// A snapshot file being written.
pub struct LocalWriter {
    store: LocalStore,
    partition: i32,
    tmp: PathBuf,
    final_path: PathBuf,
    encoder: Encoder<BufWriter<File>>,
}

impl LocalWriter {
    pub fn records(&mut self, words: &[u32]) -> Result<(), SnapshotError> {
        self.encoder.records(words).map_err(io(&self.tmp))
    }

    /// Writes the ids and makes the file durable under its temporary name.
    pub fn finish(self, ids: &[u8]) -> Result<Pending, SnapshotError> {
        let w = self.encoder.finish(ids).map_err(io(&self.tmp))?;
        let file = w.into_inner().map_err(|e| SnapshotError::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&self.tmp))?;
        let bytes = file.metadata().map_err(io(&self.tmp))?.len();
        Ok(Pending {
            store: self.store,
            partition: self.partition,
            tmp: self.tmp,
            final_path: self.final_path,
            bytes,
        })
    }

    /// Gives up: removes the temporary file.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// A durable snapshot not yet current: committing renames it into place.
pub struct Pending {
    store: LocalStore,
    partition: i32,
    tmp: PathBuf,
    final_path: PathBuf,
    pub bytes: u64,
}

impl Pending {
    /// Makes the snapshot current, then keeps only the newest ones.
    pub fn commit(self) -> Result<u64, SnapshotError> {
        fs::rename(&self.tmp, &self.final_path).map_err(io(&self.final_path))?;
        if let Some(dir) = self.final_path.parent() {
            // The rename itself must survive a crash.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.store.prune(self.partition);
        Ok(self.bytes)
    }

    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}
