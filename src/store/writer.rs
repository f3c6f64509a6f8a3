//! The group-commit writer, shared by every backend: one thread takes every job that
//! queued up while the previous commit was running, and the backend writes them in one
//! transaction (`Batches`). Each caller waits on its own `Answer`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{
    NewChat, NewLog, Pruned, ReplayShares, Result, Retention, Retired, StoreError, Stored,
};

/// Most rows one group commit takes; bounds the latency a batch adds to its last member.
const MAX_BATCH: usize = 512;
/// How often the writer prunes (when retention is on) and checkpoints when nothing is due.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// While a prune step still finds work, the next comes this soon (hot-path batches run in
/// between, so pruning never holds the write lock for long).
const PRUNE_AGAIN_AFTER: Duration = Duration::from_millis(200);
/// This many log rows since the last budget check bring the next one forward: a flooding
/// agent is trimmed within about this many rows of its budget, not a minute later. (A tenth
/// of a smaller row budget, when there is one.)
const LOG_ROWS_PER_CHECK: u64 = 20_000;
/// The same in bytes of log content (a tenth of a smaller byte budget, at least 1 MiB).
const LOG_BYTES_PER_CHECK: u64 = 64 << 20;
/// The first housekeeping after retention is switched on: soon, so a server that starts on
/// an old database prunes it at once.
const FIRST_HOUSEKEEPING: Duration = Duration::from_secs(1);

/// A machine user's presence as the database keeps it, with the time it changed.
pub enum Presence {
    Online(String),
    Offline(String),
}

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
    Presence(i64, Presence),
    /// A frame that is not stored, for the other nodes (the cross-node bus): published with
    /// the batch it falls in, in order with the rows around it.
    Publish(super::Audience, String),
    Barrier(Answer<()>),
    /// Turns background retention on (the server does; the command line does not).
    Retention(Retention),
    /// Prunes until nothing is past the retention rules, and says what it deleted.
    Prune(Retention, Answer<Result<Pruned>>),
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
    /// Rows retention deleted, by rule.
    pub pruned_logs_by_age: std::sync::atomic::AtomicU64,
    pub pruned_logs_by_budget: std::sync::atomic::AtomicU64,
    pub pruned_chat_by_age: std::sync::atomic::AtomicU64,
}

impl WriterStats {
    fn count_pruned(&self, p: &Pruned) {
        self.pruned_logs_by_age.fetch_add(p.logs_by_age, Relaxed);
        self.pruned_logs_by_budget
            .fetch_add(p.logs_by_budget, Relaxed);
        self.pruned_chat_by_age.fetch_add(p.chat_by_age, Relaxed);
    }
}

/// What one job of a batch produced, for its caller.
pub enum Outcome {
    Stored(Result<Stored>),
    Plan(Result<(Vec<Retired>, Option<i64>)>),
    Nothing,
}

/// The outcomes of a batch that did not commit: every row and plan is told so.
pub fn failed(batch: &[Job]) -> Vec<Outcome> {
    batch
        .iter()
        .map(|job| match job {
            Job::Chat(..) | Job::Log(..) => Outcome::Stored(Err(StoreError::BatchFailed)),
            Job::PlanReplay(..) => Outcome::Plan(Err(StoreError::BatchFailed)),
            _ => Outcome::Nothing,
        })
        .collect()
}

/// A backend's side of the writer.
pub trait Batches: Send + 'static {
    /// Runs one batch in one transaction: the outcome of every job, in order, and whether
    /// the transaction committed. When it did not, the outcomes of rows say so
    /// (`StoreError::BatchFailed`).
    fn write(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool);
    /// One bounded step of retention, in a transaction of its own; nothing deleted means
    /// nothing is left to do.
    fn prune_step(&mut self, retention: &Retention) -> Result<Pruned>;
    /// Periodic upkeep when the writer is idle (SQLite: a checkpoint, so the database file
    /// itself stays current).
    fn idle(&mut self);
}

/// The writer thread: takes every job that queued up (at most `MAX_BATCH`), writes them in
/// one transaction, answers each caller; between batches, retention and upkeep.
pub fn run(mut backend: impl Batches, rx: Receiver<Job>, stats: &WriterStats) {
    let mut retention: Option<Retention> = None;
    let mut next_housekeeping = Instant::now() + HOUSEKEEPING_EVERY;
    let mut log_rows_since_check = 0u64;
    let mut log_bytes_since_check = 0u64;
    loop {
        let wait = next_housekeeping.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            for job in &batch {
                if let Job::Log(l, _) = job {
                    log_rows_since_check += 1;
                    log_bytes_since_check += l.content.len() as u64;
                }
            }
            write_and_answer(
                &mut backend,
                batch,
                stats,
                &mut retention,
                &mut next_housekeeping,
            );
        }
        let per_check = retention
            .as_ref()
            .and_then(|r| r.max_log_rows_per_agent)
            .map_or(LOG_ROWS_PER_CHECK, |m| {
                (m / 10).clamp(100, LOG_ROWS_PER_CHECK)
            });
        // Long lines reach the byte budget long before the row budget's tenth.
        let per_check_bytes = retention
            .as_ref()
            .and_then(|r| r.max_log_bytes_per_agent)
            .map_or(LOG_BYTES_PER_CHECK, |m| {
                (m / 10).clamp(1 << 20, LOG_BYTES_PER_CHECK)
            });
        let flood = retention.is_some()
            && (log_rows_since_check >= per_check || log_bytes_since_check >= per_check_bytes);
        if Instant::now() < next_housekeeping && !flood {
            continue;
        }
        log_rows_since_check = 0;
        log_bytes_since_check = 0;
        next_housekeeping = Instant::now() + HOUSEKEEPING_EVERY;
        if let Some(r) = &retention {
            match backend.prune_step(r) {
                Ok(p) if p.total() > 0 => {
                    stats.count_pruned(&p);
                    next_housekeeping = Instant::now() + PRUNE_AGAIN_AFTER;
                }
                Ok(_) => {}
                Err(e) => crate::log_warn!("store: retention failed: {e}"),
            }
        }
        backend.idle();
    }
}

fn write_and_answer(
    backend: &mut impl Batches,
    batch: Vec<Job>,
    stats: &WriterStats,
    retention: &mut Option<Retention>,
    next_housekeeping: &mut Instant,
) {
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
            (Job::Retention(r), _) => {
                *retention = Some(r);
                *next_housekeeping = Instant::now() + FIRST_HOUSEKEEPING;
            }
            (Job::Prune(r, reply), _) => reply.send(prune_all(backend, &r, stats)),
            // An answer dropped unsent wakes its caller with "the store is gone"; a failed
            // batch is said explicitly above.
            _ => {}
        }
    }
}

/// Prune steps until one finds nothing left.
fn prune_all(backend: &mut impl Batches, r: &Retention, stats: &WriterStats) -> Result<Pruned> {
    let mut total = Pruned::default();
    loop {
        let step = backend.prune_step(r)?;
        stats.count_pruned(&step);
        if step.total() == 0 {
            backend.idle();
            return Ok(total);
        }
        total.add(&step);
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
    /// The answer, or None if none came within `timeout`.
    pub fn wait_for(self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut value = self.slot.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(answered) = value.take() {
                return answered;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            value = self
                .slot
                .ready
                .wait_timeout(value, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

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
