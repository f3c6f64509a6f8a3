//! The group-commit writer, shared by every backend: one thread takes every job that
//! queued up while the previous commit was running, and the backend writes them in one
//! transaction (`Batches`). Each caller waits on its own `Answer`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::{NewChat, NewLog, ReplayShares, Result, Retired, StoreError, Stored};

/// Most rows one group commit takes; bounds the latency a batch adds to its last member.
const MAX_BATCH: usize = 512;

/// A write for the writer thread, with the answer its caller waits on (if any).
pub enum Job {
    Chat(NewChat, Answer<Result<Stored>>),
    Log(NewLog, Answer<Result<Stored>>),
    Delivered(Vec<i64>),
    PlanReplay(
        i64,
        ReplayShares,
        Answer<Result<(Vec<Retired>, Option<i64>)>>,
    ),
    LastSeen(i64, String),
    Barrier(Answer<()>),
}

/// Counters the writer keeps for `/metrics`.
#[derive(Default)]
pub struct WriterStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub rows: std::sync::atomic::AtomicU64,
    /// Writes of every kind (rows, delivery flags, last-seen times) in committed batches.
    pub jobs: std::sync::atomic::AtomicU64,
    pub commit_micros_total: std::sync::atomic::AtomicU64,
    pub failed_commits: std::sync::atomic::AtomicU64,
}

/// What one job of a batch produced, for its caller.
pub enum Outcome {
    Stored(Result<Stored>),
    Plan(Result<(Vec<Retired>, Option<i64>)>),
    Nothing,
}

/// A backend's side of the writer: runs one batch in one transaction.
pub trait Batches: Send + 'static {
    /// The outcome of every job, in order, and whether the transaction committed. When it did
    /// not, the outcomes of rows say so (`StoreError::BatchFailed`).
    fn write(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool);
}

/// The writer thread: takes every job that queued up (at most `MAX_BATCH`), writes them in
/// one transaction, answers each caller.
pub fn run(mut backend: impl Batches, rx: Receiver<Job>, stats: &WriterStats) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let (outcomes, committed) = backend.write(&batch);
        if committed {
            stats.commits.fetch_add(1, Relaxed);
            stats.jobs.fetch_add(batch.len() as u64, Relaxed);
            stats.rows.fetch_add(
                outcomes
                    .iter()
                    .filter(|o| matches!(o, Outcome::Stored(Ok(s)) if !s.duplicate))
                    .count() as u64,
                Relaxed,
            );
            stats
                .commit_micros_total
                .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        } else {
            stats.failed_commits.fetch_add(1, Relaxed);
        }
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            match (job, outcome) {
                (Job::Chat(_, reply), Outcome::Stored(r))
                | (Job::Log(_, reply), Outcome::Stored(r)) => {
                    reply.send(if committed {
                        r
                    } else {
                        Err(StoreError::BatchFailed)
                    });
                }
                (Job::PlanReplay(_, _, reply), Outcome::Plan(r)) => {
                    reply.send(if committed {
                        r
                    } else {
                        Err(StoreError::BatchFailed)
                    });
                }
                (Job::Barrier(done), _) => done.send(()),
                // An answer dropped unsent wakes its caller with "the store is gone"; a
                // failed batch is said explicitly above.
                _ => {}
            }
        }
    }
}

/// A row submitted to the writer: `wait` returns once its batch is committed (or failed).
pub struct Pending(Option<Wait<Result<Stored>>>);

impl Pending {
    pub(super) fn new(wait: Option<Wait<Result<Stored>>>) -> Pending {
        Pending(wait)
    }

    pub fn wait(self) -> Result<Stored> {
        self.0
            .and_then(Wait::wait)
            .unwrap_or(Err(StoreError::Closed))
    }
}

/// The writer thread's answer to one caller: a mutex and a condition variable rather than a
/// channel, because crossbeam's channels spin and `sched_yield` before they sleep, and with
/// one waiting reader per connection that spinning took ~12% of all server CPU in the
/// closed-loop benchmark on 2 cores (perf). An answer dropped unsent wakes its caller with
/// `None` (the writer is gone).
pub struct Answer<T> {
    slot: Arc<Slot<T>>,
    sent: bool,
}

pub struct Wait<T> {
    slot: Arc<Slot<T>>,
}

struct Slot<T> {
    value: Mutex<Option<Option<T>>>,
    ready: std::sync::Condvar,
}

pub fn answer<T>() -> (Answer<T>, Wait<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        ready: std::sync::Condvar::new(),
    });
    (
        Answer {
            slot: slot.clone(),
            sent: false,
        },
        Wait { slot },
    )
}

impl<T> Answer<T> {
    pub fn send(mut self, value: T) {
        self.put(Some(value));
        self.sent = true;
    }

    fn put(&self, value: Option<T>) {
        *self.slot.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        self.slot.ready.notify_one();
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        if !self.sent {
            self.put(None);
        }
    }
}

impl<T> Wait<T> {
    pub fn wait(self) -> Option<T> {
        let mut value = self.slot.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(answered) = value.take() {
                return answered;
            }
            value = self
                .slot
                .ready
                .wait(value)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}
