//! exactly_once: a worker's transaction commits, run on a thread of their
//! own so that the worker goes on scoring while the broker commits.
//!
//! A commit is four round trips to the coordinators (the offsets added to
//! the transaction, their commit, the flush of what is in flight, the end
//! of the transaction), about 12 ms on a busy broker; run by the worker
//! itself, every commit stopped scoring for that long, ten times a second,
//! and exactly_once drained at 0.70x at_least_once's rate. Now the worker
//! hands the commit over and keeps taking batches; their outputs wait in
//! the worker (nothing may be sent while a transaction commits: librdkafka
//! refuses) and open the next transaction once this one has ended. The
//! commit still carries only the offsets taken when it was handed over,
//! so each transaction covers exactly the events whose outputs it holds.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::kafka::transaction::{Failure, Transactions};

/// Input offsets a commit carries: (topic, partition, next offset).
pub type Offsets = Vec<(Arc<str>, i32, i64)>;

/// How a commit handed over ended.
#[derive(Debug)]
pub enum Ended {
    /// Committed: its offsets are the group's now.
    Committed(Offsets),
    /// It failed, and the transaction was aborted (or the producer
    /// replaced) before the answer came: the worker rewinds.
    Failed(Failure),
    /// The committer's thread is gone (it panicked): the transaction's
    /// fate is unknown, and the worker cannot go on.
    ThreadGone,
}

/// A commit for the committer's thread.
struct Request {
    offsets: Offsets,
    group: Arc<ConsumerGroupMetadata>,
}

/// A worker's committer thread and the commit it runs, if any.
pub struct Committer {
    requests: Option<mpsc::Sender<Request>>,
    answers: mpsc::Receiver<Result<(), Failure>>,
    thread: Option<JoinHandle<()>>,
    /// The offsets of the commit in flight, marked committed once it is.
    in_flight: Option<Offsets>,
}

impl Committer {
    /// Starts worker `worker`'s committer for its transactions `txn`;
    /// `done` is called when a commit has ended (it wakes the worker).
    pub fn start(
        worker: usize,
        txn: Arc<Mutex<Transactions>>,
        done: Box<dyn Fn() + Send>,
    ) -> std::io::Result<Committer> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (answer, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ces-commit-{worker}"))
            .spawn(move || {
                for request in inbox {
                    let mut offsets = TopicPartitionList::new();
                    for (topic, partition, next) in &request.offsets {
                        let _ =
                            offsets.add_partition_offset(topic, *partition, Offset::Offset(*next));
                    }
                    let result = txn.lock().commit(&offsets, request.group);
                    if answer.send(result).is_err() {
                        return;
                    }
                    done();
                }
            })?;
        Ok(Committer {
            requests: Some(requests),
            answers,
            thread: Some(thread),
            in_flight: None,
        })
    }

    /// Whether a commit runs: nothing may be sent meanwhile.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Hands the open transaction's commit over, with the input
    /// `offsets` it covers, in the group of `group`. One commit at a
    /// time: the caller waits for the last one first. False when the
    /// committer's thread is gone.
    pub fn begin(&mut self, group: Arc<ConsumerGroupMetadata>, offsets: Offsets) -> bool {
        debug_assert!(self.in_flight.is_none(), "one commit at a time");
        let request = Request {
            offsets: offsets.clone(),
            group,
        };
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(request).is_ok());
        if sent {
            self.in_flight = Some(offsets);
        }
        sent
    }

    /// How the commit in flight ended, once it has; `None` while it
    /// runs, or when none was handed over.
    pub fn poll(&mut self) -> Option<Ended> {
        self.in_flight.as_ref()?;
        match self.answers.try_recv() {
            Ok(result) => self.ended(result),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => self.gone(),
        }
    }

    /// Waits for the commit in flight to end (its calls are bounded by
    /// their deadlines) and says how it ended; `None` when none runs.
    pub fn wait(&mut self) -> Option<Ended> {
        self.in_flight.as_ref()?;
        match self.answers.recv() {
            Ok(result) => self.ended(result),
            Err(_) => self.gone(),
        }
    }

    fn ended(&mut self, result: Result<(), Failure>) -> Option<Ended> {
        let moved = self.in_flight.take()?;
        Some(match result {
            Ok(()) => Ended::Committed(moved),
            Err(failure) => Ended::Failed(failure),
        })
    }

    fn gone(&mut self) -> Option<Ended> {
        self.in_flight = None;
        Some(Ended::ThreadGone)
    }
}

impl Drop for Committer {
    /// Waits for the commit in flight, if any: a worker that stops leaves
    /// no commit running behind it.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
