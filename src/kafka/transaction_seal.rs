//! Closing what an unfinished transaction may have left open.
//!
//! A transaction coordinator that finishes a transaction skips the marker
//! of every partition whose leader it does not know at that moment: it
//! takes the partition for deleted (Apache Kafka's
//! `TransactionMarkerChannelManager`, KAFKA-5202; its log says "Couldn't
//! find leader endpoint ... likely deleted already"). Right after a broker
//! restart, a single-broker cluster (or a whole cluster restarted) can be
//! in just that state while its coordinator rolls back the transactions
//! that expired meanwhile or completes a commit that was under way. The
//! records such a transaction wrote to those partitions then stay open
//! until the next marker of the same producer on the partition closes
//! them, and that marker is the next transaction's: its commit publishes
//! the records of a transaction that was aborted (whose events the worker
//! processes again: duplicates), its abort drops those of one that
//! committed.
//!
//! So when a transaction ends any other way than by a commit the broker
//! confirmed, the worker finds out how it really ended, from the group's
//! committed offsets (a transaction's input offsets commit with it, or not
//! at all), and when it was aborted, closes every partition it touched
//! with a transaction of its own that writes one record there and is
//! aborted: its markers close whatever was left open as aborted, before
//! anything new is written.

use std::time::Duration;

/// The key of a sealing record (never visible: its transaction aborts).
pub const SEAL_KEY: &[u8] = b"ces-seal";

/// A transaction that ended without a commit the broker confirmed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unfinished {
    /// Every partition its delivery reports named: outputs, dead letters,
    /// changelog records.
    pub partitions: Vec<(Box<str>, i32)>,
    /// The input offsets its commit carried; empty when no commit was
    /// attempted (it was aborted then, for sure).
    pub offsets: Vec<(String, i32, i64)>,
}

impl Unfinished {
    /// Whether it was aborted, by `committed(topic, partition)`: the
    /// group's committed offset of an input partition, `Err(())` when it
    /// cannot be known (the pipeline stops). `None`: it cannot be told.
    pub fn was_aborted(
        &self,
        mut committed: impl FnMut(&str, i32) -> Result<Option<i64>, ()>,
    ) -> Option<bool> {
        if self.offsets.is_empty() {
            return Some(true);
        }
        let mut known = false;
        for (topic, partition, offset) in &self.offsets {
            match committed(topic, *partition) {
                Ok(Some(c)) if c >= *offset => return Some(false),
                Ok(_) => known = true,
                Err(()) => {}
            }
        }
        known.then_some(true)
    }
}

/// After a minute without the group's committed offsets: what may hold
/// them (a transaction a broker restart left open, see this
/// module) and Kafka's tool for it.
pub fn hanging_hint(waited: Duration) -> &'static str {
    if waited >= Duration::from_secs(60) {
        "; if this goes on, a transaction may have been left open by a broker's restart (its markers skipped): `kafka-transactions.sh find-hanging --broker-id N` finds it, `kafka-transactions.sh abort` ends it"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::Unfinished;

    fn unfinished(offsets: &[(&str, i32, i64)]) -> Unfinished {
        Unfinished {
            partitions: vec![("signals".into(), 2)],
            offsets: offsets
                .iter()
                .map(|(t, p, o)| (t.to_string(), *p, *o))
                .collect(),
        }
    }

    #[test]
    fn without_a_commit_attempt_it_was_aborted() {
        assert_eq!(unfinished(&[]).was_aborted(|_, _| Err(())), Some(true));
    }

    #[test]
    fn its_offsets_committed_mean_it_committed() {
        let u = unfinished(&[("in", 0, 47), ("in", 2, 30)]);
        // The broker has partition 2 at 30: the commit went through.
        let committed = |_: &str, p: i32| Ok(Some(if p == 0 { 40 } else { 30 }));
        assert_eq!(u.was_aborted(committed), Some(false));
        // Neither: aborted, whatever the client was told.
        assert_eq!(u.was_aborted(|_, _| Ok(Some(12))), Some(true));
        assert_eq!(u.was_aborted(|_, _| Ok(None)), Some(true));
        // Nothing known: no guess.
        assert_eq!(u.was_aborted(|_, _| Err(())), None);
    }
}
