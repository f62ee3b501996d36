//! [`AsyncResult`]: a job in flight or done, like ipyparallel's `AsyncResult`.
//!
//! A job has result *slots*: one per task for direct jobs (`execute` on four engines has four),
//! one per item for maps. The connection's reader task files each arriving [`TaskResult`] into
//! its slots and wakes whoever waits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use super::ClientError;
use crate::proto::{
    EngineId, JobId, JobInfo, JobKind, Outcome, RemoteError, TaskId, TaskOutput, TaskResult, Value,
};

/// One filled slot.
#[derive(Debug, Clone)]
struct Slot {
    engine: EngineId,
    task: TaskId,
    value: Result<Value, RemoteError>,
}

#[derive(Default)]
struct Filled {
    slots: Vec<Option<Slot>>,
    /// Slot indices in the order they were filled.
    order: Vec<usize>,
    /// Every finished task, in the order they finished; map items are moved out into `slots`.
    tasks: Vec<TaskResult>,
    /// What running tasks wrote, in the order it came (see [`AsyncResult::streamed`]).
    streamed: Vec<TaskOutput>,
}

/// What the client knows of one job; filled by the connection's reader task.
pub(crate) struct JobState {
    pub(crate) info: JobInfo,
    filled: Mutex<Filled>,
    /// Number of filled slots; `Err` once the connection is gone.
    done: watch::Sender<Result<usize, String>>,
    /// Whether every slot is filled or the connection is gone: what a wait for the whole job
    /// listens to, so that it is not woken by every result before the last.
    ended: watch::Sender<bool>,
    /// Submitters that asked to hear back only once the job has ended: the controller's reply
    /// to each, held until then (see [`Self::answer_at_end`]).
    at_end: Mutex<Vec<Held>>,
}

/// A reply held back, with the sender it goes to and the job state it travels with.
type Held = (super::ReplySender, crate::proto::Reply, Arc<JobState>);

impl JobState {
    pub(crate) fn new(info: JobInfo) -> Self {
        let filled = Filled {
            slots: vec![None; info.slots as usize],
            ..Filled::default()
        };
        // A job with nothing to do (a map over no items) has ended as it starts.
        let ended = info.slots == 0;
        Self {
            info,
            filled: Mutex::new(filled),
            done: watch::channel(Ok(0)).0,
            ended: watch::channel(ended).0,
            at_end: Mutex::new(Vec::new()),
        }
    }

    /// Hands `reply` to `tx` once the job has ended (at once if it has): a submitter that
    /// waits for the whole job anyway is woken once, not also when the job is accepted.
    pub(crate) fn answer_at_end(
        self: &Arc<Self>,
        tx: super::ReplySender,
        reply: crate::proto::Reply,
    ) {
        let mut held = self.at_end.lock().expect("not poisoned");
        if *self.ended.borrow() {
            drop(held);
            let _ = tx.send((reply, Some(self.clone())));
        } else {
            held.push((tx, reply, self.clone()));
        }
    }

    /// Marks the job ended and answers the submitters held until then. Output streamed while
    /// it ran is dropped: its results have all of it.
    fn end(&self) {
        std::mem::take(&mut self.filled.lock().expect("not poisoned").streamed);
        self.ended.send_replace(true);
        let held = std::mem::take(&mut *self.at_end.lock().expect("not poisoned"));
        for (tx, reply, state) in held {
            let _ = tx.send((reply, Some(state)));
        }
    }

    fn total(&self) -> usize {
        self.info.slots as usize
    }

    /// Whether the job has ended (every slot filled, or the connection gone).
    pub(crate) fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    pub(crate) fn add(&self, results: Vec<TaskResult>) {
        let mut f = self.filled.lock().expect("not poisoned");
        for mut r in results {
            let first = r.first as usize;
            let values: Vec<Result<Value, RemoteError>> = match &mut r.outcome {
                Outcome::Items(items) => {
                    let items = std::mem::take(items);
                    // The task keeps how it went: its first error, if an item failed.
                    if let Some(e) = items.iter().find_map(|i| i.as_ref().err()) {
                        r.outcome = Outcome::Err(e.clone());
                    }
                    items.into_iter().map(|i| i.map_err(|e| *e)).collect()
                }
                Outcome::Ok { value, .. } => vec![Ok(value.clone())],
                Outcome::Err(e) => vec![Err((**e).clone())],
            };
            for (i, value) in values.into_iter().enumerate() {
                let index = first + i;
                if let Some(slot) = f.slots.get_mut(index) {
                    if slot.is_none() {
                        *slot = Some(Slot {
                            engine: r.engine,
                            task: r.task,
                            value,
                        });
                        f.order.push(index);
                    }
                }
            }
            f.tasks.push(r);
        }
        let n = f.order.len();
        drop(f);
        let _ = self.done.send_replace(Ok(n));
        if n >= self.total() {
            self.end();
        }
    }

    /// Output of a running task: kept in the order it came, while the job runs.
    pub(crate) fn add_output(&self, out: TaskOutput) {
        if !self.has_ended() {
            let mut f = self.filled.lock().expect("not poisoned");
            f.streamed.push(out);
        }
    }

    pub(crate) fn broken(&self, why: &str) {
        let total = self.total();
        let broke = self.done.send_if_modified(|d| {
            if matches!(d, Ok(n) if *n == total) {
                false
            } else {
                *d = Err(why.to_string());
                true
            }
        });
        if broke {
            self.end();
        }
    }
}

/// A job submitted to the cluster: wait for it, look at its progress, get its results.
///
/// Cheap to clone; every clone sees the same results.
#[derive(Clone)]
pub struct AsyncResult {
    pub(crate) state: Arc<JobState>,
    /// Whether [`Self::stream`] yields in item order (else as results complete).
    pub(crate) ordered: bool,
    /// The connection it came from, for [`Self::abort`]; not kept alive by it.
    pub(crate) client: std::sync::Weak<super::Shared>,
}

/// One failed slot in a [`CompositeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub engine: EngineId,
    pub task: TaskId,
    /// The slot: the task's position in a direct job, the item's index in a map.
    pub index: usize,
    pub error: RemoteError,
}

/// Errors from one or more engines or items, each with its engine id and traceback — like
/// ipyparallel's `CompositeError`. The results that did succeed stay available through
/// [`AsyncResult::values`] and [`AsyncResult::results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompositeError {
    pub per_item: bool,
    pub errors: Vec<EngineError>,
}

impl std::fmt::Display for CompositeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.errors.len();
        let what = if self.per_item { "item" } else { "task" };
        write!(
            f,
            "{n} {what}{} raised an error:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in self.errors.iter().take(20) {
            if self.per_item {
                if e.engine == EngineId::NONE {
                    write!(f, "\n[item {}] {}", e.index, e.error)?;
                } else {
                    write!(f, "\n[item {} on engine {}] {}", e.index, e.engine, e.error)?;
                }
            } else {
                write!(f, "\n[engine {}] {}", e.engine, e.error)?;
            }
        }
        if n > 20 {
            write!(f, "\n… and {} more", n - 20)?;
        }
        Ok(())
    }
}

impl std::error::Error for CompositeError {}

impl AsyncResult {
    /// Drops this job's tasks that have not started (they fail as `TaskAborted`); with
    /// `interrupt`, its running tasks are interrupted too.
    pub async fn abort(&self, interrupt: bool) -> Result<(), ClientError> {
        let shared = self.client.upgrade().ok_or_else(|| {
            ClientError::Disconnected("the client this job came from is closed".into())
        })?;
        super::Client { shared }
            .abort(self.job_id(), interrupt)
            .await
    }

    /// The job's id, for `starling result JOB` or [`super::Client::result`].
    pub fn job_id(&self) -> JobId {
        self.state.info.job
    }

    /// What kind of job this is.
    pub fn kind(&self) -> JobKind {
        self.state.info.kind
    }

    /// The engines the job's tasks were sent to up front, in order (empty for a load-balanced
    /// map, whose chunks go wherever there is room).
    pub fn engines(&self) -> Vec<EngineId> {
        self.state.info.tasks.iter().map(|(_, e)| *e).collect()
    }

    /// `(finished, total)`: tasks for direct jobs, items for maps.
    pub fn progress(&self) -> (usize, usize) {
        let done = self.state.done.borrow().clone().unwrap_or(0);
        (done, self.state.total())
    }

    /// Whether everything has finished.
    pub fn ready(&self) -> bool {
        let (done, total) = self.progress();
        done == total
    }

    /// Whether waiting is over: everything has finished, or the connection was lost first
    /// (then [`Self::wait`] says so).
    pub fn ended(&self) -> bool {
        self.state.has_ended()
    }

    /// Waits until the job is done or `timeout` passes; returns whether it is done.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<bool, ClientError> {
        let until_done = self.wait_for(self.state.total());
        match timeout {
            None => until_done.await,
            Some(t) => tokio::time::timeout(t, until_done)
                .await
                .unwrap_or(Ok(false)),
        }
    }

    /// Waits until at least `n` slots are filled, the job ends with fewer (`n` is more than
    /// it has), or `timeout` passes; returns whether they are. For iterating over results as
    /// they arrive.
    pub async fn wait_count(
        &self,
        n: usize,
        timeout: Option<Duration>,
    ) -> Result<bool, ClientError> {
        match timeout {
            None => self.wait_for(n).await,
            Some(t) => tokio::time::timeout(t, self.wait_for(n))
                .await
                .unwrap_or(Ok(false)),
        }
    }

    /// The filled slots' indices, in the order they were filled.
    pub fn completion_order(&self) -> Vec<usize> {
        self.state
            .filled
            .lock()
            .expect("not poisoned")
            .order
            .clone()
    }

    /// One slot: `None` while pending, else the engine that filled it and its value or error.
    pub fn slot(&self, index: usize) -> Option<(EngineId, Result<Value, RemoteError>)> {
        let f = self.state.filled.lock().expect("not poisoned");
        f.slots
            .get(index)
            .and_then(Option::as_ref)
            .map(|s| (s.engine, s.value.clone()))
    }

    /// Every slot so far, with the engine that filled it: `None` while pending.
    pub fn slots(&self) -> Vec<Option<(EngineId, Result<Value, RemoteError>)>> {
        let f = self.state.filled.lock().expect("not poisoned");
        f.slots
            .iter()
            .map(|s| s.as_ref().map(|s| (s.engine, s.value.clone())))
            .collect()
    }

    /// Waits until at least `n` slots are filled (`true`), or the job ended with fewer
    /// (`false`: `n` is more than it has).
    async fn wait_for(&self, n: usize) -> Result<bool, ClientError> {
        // Both are subscribed before the first look, so no change after it is missed.
        let whole = n >= self.state.total();
        let mut rx = self.state.done.subscribe();
        let mut ended = self.state.ended.subscribe();
        loop {
            // `ended` first: the count is final before a job is marked ended, so a job seen
            // ended is never judged on an older count.
            let is_ended = *ended.borrow_and_update();
            match &*rx.borrow_and_update() {
                Ok(done) if *done >= n => return Ok(true),
                Ok(_) if is_ended => return Ok(false),
                Ok(_) => {}
                Err(why) => {
                    return Err(ClientError::LostWhileWaiting {
                        job: self.state.info.job,
                        why: why.clone(),
                    })
                }
            }
            let changed = if whole {
                ended.changed().await
            } else {
                rx.changed().await
            };
            if changed.is_err() {
                return Err(ClientError::Disconnected("the client was dropped".into()));
            }
        }
    }

    /// Waits for the job and returns one value per slot (task, or map item), in order. If any
    /// failed, the error lists every failure with its engine and traceback.
    pub async fn get(&self) -> Result<Vec<Value>, ClientError> {
        self.wait(None).await?;
        let f = self.state.filled.lock().expect("not poisoned");
        let mut values = Vec::with_capacity(f.slots.len());
        let mut errors = Vec::new();
        for (index, slot) in f.slots.iter().enumerate() {
            let slot = slot.as_ref().expect("every slot is filled");
            match &slot.value {
                Ok(v) => values.push(v.clone()),
                Err(error) => errors.push(EngineError {
                    engine: slot.engine,
                    task: slot.task,
                    index,
                    error: error.clone(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(values)
        } else {
            Err(ClientError::Remote(CompositeError {
                per_item: self.kind().per_item(),
                errors,
            }))
        }
    }

    /// The failures so far, each with its slot, engine and traceback.
    pub fn errors(&self) -> Vec<EngineError> {
        let f = self.state.filled.lock().expect("not poisoned");
        f.slots
            .iter()
            .enumerate()
            .filter_map(|(index, s)| match s {
                Some(Slot {
                    engine,
                    task,
                    value: Err(error),
                }) => Some(EngineError {
                    engine: *engine,
                    task: *task,
                    index,
                    error: error.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Every slot so far: `None` while pending, else its value or error. The partial results of
    /// a job that failed in places.
    pub fn values(&self) -> Vec<Option<Result<Value, RemoteError>>> {
        let f = self.state.filled.lock().expect("not poisoned");
        f.slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.value.clone()))
            .collect()
    }

    /// The finished tasks, in the order they finished, with captured stdout/stderr, execution
    /// count and timestamps. (For maps, the per-item values are in [`Self::values`]; a map
    /// chunk's outcome here is its first error if an item failed, else an empty list.)
    pub fn results(&self) -> Vec<TaskResult> {
        self.state
            .filled
            .lock()
            .expect("not poisoned")
            .tasks
            .clone()
    }

    /// What running tasks have written so far, in the order it came, from the `from`-th piece
    /// on: each piece follows the last of its task. Output comes while tasks run (the engines
    /// send it every 0.2 s at most), and is kept until the job ends; a finished task's
    /// [`TaskResult`] has all of its output (unless its value was refused as too large), of
    /// which the pieces of that task are the beginning.
    pub fn streamed(&self, from: usize) -> Vec<TaskOutput> {
        let f = self.state.filled.lock().expect("not poisoned");
        f.streamed.get(from..).map_or_else(Vec::new, <[_]>::to_vec)
    }

    /// Each finished task's captured stdout, with its engine.
    pub fn stdout(&self) -> Vec<(EngineId, String)> {
        self.results()
            .into_iter()
            .map(|r| (r.engine, r.stdout))
            .collect()
    }

    /// Each finished task's captured stderr, with its engine.
    pub fn stderr(&self) -> Vec<(EngineId, String)> {
        self.results()
            .into_iter()
            .map(|r| (r.engine, r.stderr))
            .collect()
    }

    /// The same result, streamed in item order (`true`, the default) or as results complete.
    #[must_use]
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Results as they complete, like iterating over ipyparallel's `AsyncMapResult`:
    /// `(slot, value or error)`. Ordered (the default, see [`Self::ordered`] and
    /// [`super::LoadBalancedView::ordered`]) yields in slot order, each waiting for the ones
    /// before it; unordered yields in the order they finish. Ends when every slot has been
    /// yielded, or with an error if the connection drops.
    pub fn stream(
        &self,
    ) -> impl Stream<Item = Result<(usize, Result<Value, RemoteError>), ClientError>> + '_ {
        let ordered = self.ordered;
        futures::stream::unfold(0usize, move |cursor| async move {
            if cursor >= self.state.total() {
                return None;
            }
            if let Err(e) = self.wait_for(if ordered { 0 } else { cursor + 1 }).await {
                return Some((Err(e), usize::MAX));
            }
            loop {
                // The check and the count under one lock: a result landing in between would
                // otherwise leave us waiting for one more than will ever come.
                let (next, have) = {
                    let f = self.state.filled.lock().expect("not poisoned");
                    let index = if ordered {
                        Some(cursor)
                    } else {
                        f.order.get(cursor).copied()
                    };
                    let next =
                        index.and_then(|i| f.slots[i].as_ref().map(|s| (i, s.value.clone())));
                    (next, f.order.len())
                };
                if let Some(item) = next {
                    return Some((Ok(item), cursor + 1));
                }
                match self.wait_for(have + 1).await {
                    Ok(true) => {}
                    // Ended with no more to come (it cannot, with a slot missing, unless the
                    // connection broke, which is an error).
                    Ok(false) => return None,
                    Err(e) => return Some((Err(e), usize::MAX)),
                }
            }
        })
    }

    /// When the controller accepted the job (µs since the epoch).
    pub fn submitted(&self) -> u64 {
        self.state.info.submitted
    }

    /// Wall time from submission to the last task's completion (or to now, if still running).
    pub fn elapsed(&self) -> Duration {
        let start = self.state.info.submitted;
        let end = if self.ready() {
            let f = self.state.filled.lock().expect("not poisoned");
            f.tasks.iter().map(|r| r.completed).max().unwrap_or(start)
        } else {
            crate::proto::now_micros()
        };
        Duration::from_micros(end.saturating_sub(start))
    }

    /// Time the engines spent computing, summed over tasks: compare with [`Self::elapsed`] to
    /// see the parallel speed-up.
    pub fn serial_time(&self) -> Duration {
        let f = self.state.filled.lock().expect("not poisoned");
        let micros: u64 = f
            .tasks
            .iter()
            .map(|r| r.completed.saturating_sub(r.started))
            .sum();
        Duration::from_micros(micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(task: u64) -> TaskResult {
        let value = Value::from(42);
        let outcome = Outcome::Ok {
            value,
            display: None,
        };
        TaskResult::bare(TaskId(task), EngineId(task as u32), task, outcome, 0)
    }

    #[tokio::test]
    async fn waiting_for_more_results_than_a_finished_job_has_returns_at_once() {
        let ar = AsyncResult {
            state: Arc::new(JobState::new(JobInfo {
                job: JobId(1),
                kind: JobKind::Execute,
                submitted: 0,
                tasks: vec![(TaskId(0), EngineId(0)), (TaskId(1), EngineId(1))],
                slots: 2,
            })),
            ordered: true,
            client: std::sync::Weak::new(),
        };
        ar.state.add(vec![done(0)]);
        assert!(ar.wait_count(1, None).await.unwrap());
        // The job ends before the wait for a third result starts: the wait must not hang.
        ar.state.add(vec![done(1)]);
        let waited = tokio::time::timeout(Duration::from_secs(5), ar.wait_count(3, None)).await;
        assert!(!waited.expect("returns, not hangs").unwrap());
        assert!(ar.wait(None).await.unwrap());
    }
}
