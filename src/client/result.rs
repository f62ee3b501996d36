//! [`AsyncResult`]: a job in flight or done, like ipyparallel's `AsyncResult`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::ClientError;
use crate::proto::{EngineId, JobId, JobInfo, Outcome, RemoteError, TaskId, TaskResult, Value};

/// What the client knows of one job; filled by the connection's reader task.
pub(crate) struct JobState {
    pub(crate) info: JobInfo,
    index: HashMap<TaskId, usize>,
    results: Mutex<Vec<Option<TaskResult>>>,
    /// Number of finished tasks; `Err` once the connection is gone.
    done: watch::Sender<Result<usize, String>>,
}

impl JobState {
    pub(crate) fn new(info: JobInfo) -> Self {
        let index = info
            .tasks
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (*t, i))
            .collect();
        let results = Mutex::new(vec![None; info.tasks.len()]);
        Self {
            info,
            index,
            results,
            done: watch::channel(Ok(0)).0,
        }
    }

    pub(crate) fn add(&self, results: Vec<TaskResult>) {
        let mut slots = self.results.lock().expect("not poisoned");
        for r in results {
            if let Some(i) = self.index.get(&r.task) {
                slots[*i] = Some(r);
            }
        }
        let n = slots.iter().filter(|r| r.is_some()).count();
        drop(slots);
        let _ = self.done.send_replace(Ok(n));
    }

    pub(crate) fn broken(&self, why: &str) {
        self.done.send_if_modified(|d| {
            let total = self.info.tasks.len();
            if matches!(d, Ok(n) if *n == total) {
                false
            } else {
                *d = Err(why.to_string());
                true
            }
        });
    }
}

/// A job submitted to the cluster: wait for it, look at its progress, get its results.
///
/// Cheap to clone; every clone sees the same results.
#[derive(Clone)]
pub struct AsyncResult {
    pub(crate) state: Arc<JobState>,
}

/// One engine's error in a [`CompositeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub engine: EngineId,
    pub task: TaskId,
    /// The task's position in the job (for a map, the item's index).
    pub index: usize,
    pub error: RemoteError,
}

/// Errors from one or more engines, each with its engine id and traceback — like ipyparallel's
/// `CompositeError`. The results that did succeed stay available through
/// [`AsyncResult::results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompositeError {
    pub errors: Vec<EngineError>,
}

impl std::fmt::Display for CompositeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{n} task{} raised an error:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n[engine {}] {}", e.engine, e.error)?;
        }
        Ok(())
    }
}

impl std::error::Error for CompositeError {}

impl AsyncResult {
    /// The job's id, for `starling result JOB` or [`super::Client::result`].
    pub fn job_id(&self) -> JobId {
        self.state.info.job
    }

    /// Which engine runs each task, in result order.
    pub fn engines(&self) -> Vec<EngineId> {
        self.state.info.tasks.iter().map(|(_, e)| *e).collect()
    }

    /// `(finished, total)` tasks.
    pub fn progress(&self) -> (usize, usize) {
        let done = self.state.done.borrow().clone().unwrap_or(0);
        (done, self.state.info.tasks.len())
    }

    /// Whether every task has finished.
    pub fn ready(&self) -> bool {
        let (done, total) = self.progress();
        done == total
    }

    /// Waits until the job is done or `timeout` passes; returns whether it is done.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<bool, ClientError> {
        let total = self.state.info.tasks.len();
        let mut rx = self.state.done.subscribe();
        let until_done = async {
            loop {
                match &*rx.borrow_and_update() {
                    Ok(n) if *n == total => return Ok(()),
                    Ok(_) => {}
                    Err(why) => return Err(ClientError::Disconnected(why.clone())),
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::Disconnected("the client was dropped".into()));
                }
            }
        };
        match timeout {
            None => until_done.await.map(|()| true),
            Some(t) => match tokio::time::timeout(t, until_done).await {
                Ok(r) => r.map(|()| true),
                Err(_) => Ok(false),
            },
        }
    }

    /// Waits for the job and returns one value per task, in order. If any task failed, the
    /// error lists every failure with its engine and traceback.
    pub async fn get(&self) -> Result<Vec<Value>, ClientError> {
        self.wait(None).await?;
        let results = self.results();
        let mut values = Vec::with_capacity(results.len());
        let mut errors = Vec::new();
        for (index, r) in results.into_iter().enumerate() {
            let r = r.expect("every task finished");
            match r.outcome {
                Outcome::Ok { value, .. } => values.push(value),
                Outcome::Err(error) => errors.push(EngineError {
                    engine: r.engine,
                    task: r.task,
                    index,
                    error,
                }),
            }
        }
        if errors.is_empty() {
            Ok(values)
        } else {
            Err(ClientError::Remote(CompositeError { errors }))
        }
    }

    /// Every task's result so far (`None` for those still running), in order, with captured
    /// stdout/stderr, execution count and timestamps.
    pub fn results(&self) -> Vec<Option<TaskResult>> {
        self.state.results.lock().expect("not poisoned").clone()
    }

    /// Each engine's captured stdout, for the tasks finished so far.
    pub fn stdout(&self) -> Vec<(EngineId, String)> {
        self.results()
            .into_iter()
            .flatten()
            .map(|r| (r.engine, r.stdout))
            .collect()
    }

    /// Each engine's captured stderr, for the tasks finished so far.
    pub fn stderr(&self) -> Vec<(EngineId, String)> {
        self.results()
            .into_iter()
            .flatten()
            .map(|r| (r.engine, r.stderr))
            .collect()
    }

    /// When the controller accepted the job (µs since the epoch).
    pub fn submitted(&self) -> u64 {
        self.state.info.submitted
    }

    /// Wall time from submission to the last task's completion (or to now, if still running).
    pub fn elapsed(&self) -> Duration {
        let start = self.state.info.submitted;
        let end = if self.ready() {
            self.results()
                .iter()
                .flatten()
                .map(|r| r.completed)
                .max()
                .unwrap_or(start)
        } else {
            crate::proto::now_micros()
        };
        Duration::from_micros(end.saturating_sub(start))
    }

    /// Time the engines spent computing, summed over tasks: compare with [`Self::elapsed`] to
    /// see the parallel speed-up.
    pub fn serial_time(&self) -> Duration {
        let micros: u64 = self
            .results()
            .iter()
            .flatten()
            .map(|r| r.completed.saturating_sub(r.started))
            .sum();
        Duration::from_micros(micros)
    }
}
