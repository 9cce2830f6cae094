//! Where a partition starts: its state from the state store (or a new one)
//! and, per input topic, the offset its processing resumes at. Shared by an
//! assignment (`rebalance`) and by a worker rewinding its partitions to
//! their last committed state after an aborted transaction (`worker`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::topic_partition_list::Offset;

use crate::kafka::delivery::OffsetTracker;
use crate::partition::{PartitionHooks, PartitionState};

/// The state `p` starts with and, per topic, the offset the state store
/// says it covers (`None`: nothing saved, rebuild from the log).
/// `committed` holds the group's committed offset of each topic.
pub(crate) fn restore(
    hooks: Option<&Arc<dyn PartitionHooks>>,
    new_state: impl FnOnce() -> PartitionState,
    p: i32,
    topics: &[String],
    committed: &[Option<i64>],
    cancel: &AtomicBool,
) -> (PartitionState, Vec<Option<i64>>) {
    match hooks {
        Some(h) => h.restore(p, topics, committed, cancel),
        None => (new_state(), vec![None; topics.len()]),
    }
}

/// Sets up where `state` (partition `p`) starts on each of `topics`, from
/// the offsets its store gave: without one, the beginning of the log (or
/// its end with `reset_to_end`). Events below the group's committed offset
/// only rebuild the state: their outputs were published before. The
/// tracker starts the partition there. Returns the start of each topic.
pub(crate) fn start(
    state: &mut PartitionState,
    p: i32,
    topics: &[String],
    offsets: Vec<Option<i64>>,
    committed: &[Option<i64>],
    reset_to_end: bool,
    tracker: &Mutex<OffsetTracker>,
) -> Vec<Offset> {
    let mut starts = Vec::with_capacity(topics.len());
    for ((topic, offset), committed) in topics.iter().zip(offsets).zip(committed) {
        let start = match offset {
            Some(o) => Offset::Offset(o),
            None if reset_to_end => Offset::End,
            None => Offset::Beginning,
        };
        let from = match start {
            Offset::Offset(o) => Some(o),
            Offset::Beginning => Some(0),
            _ => None,
        };
        if let Some(from) = from {
            state.started_at.push((topic.clone(), from));
        }
        if let (Some(from), Some(c)) = (from, *committed) {
            if from < c {
                state.silent_below.push((topic.clone(), c));
            }
        }
        {
            let mut tracker = tracker.lock();
            tracker.assigned(topic, p, *committed);
            if let Offset::Offset(o) = start {
                tracker.restored(topic, p, o);
            }
        }
        tracing::info!(topic = %topic, partition = p, start = ?start, committed = ?committed, "partition starts");
        starts.push(start);
    }
    starts
}
