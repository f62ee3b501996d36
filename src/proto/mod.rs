//! Every message between client, controller and engine, and how they travel.
//!
//! - [`tls`]: TLS 1.3 with the cluster's own pinned certificate.
//! - [`auth`]: the handshake — protocol version and an HMAC challenge with separate client and
//!   engine keys — as a pure state machine.
//! - [`conn`]: length-delimited MessagePack frames with a hard size limit, and connections
//!   typed by what they receive and send, so a message cannot go down the wrong socket.
//! - [`value`]: the values that code returns and takes.
//!
//! One enum per direction: [`ClientToController`], [`ControllerToClient`],
//! [`EngineToController`], [`ControllerToEngine`].

pub mod auth;
pub mod conn;
pub mod huge;
pub mod tls;
pub mod value;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use value::{Pickled, Value};

/// Bumped whenever a message changes shape; checked in the handshake.
pub const PROTOCOL_VERSION: u32 = 7;

/// Default hard limit on one frame (64 MiB): large enough for a big push or a map chunk, small
/// enough that a garbage length prefix cannot make a peer allocate gigabytes.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Errors of the wire layer. Each closes only the connection it happened on.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("a frame could not be decoded ({0}); the peer is not speaking starling's protocol")]
    Malformed(String),
    #[error("the connection closed")]
    Closed,
    #[error("the other side went away without closing the connection (its process was killed, or the network between failed)")]
    Dropped,
    #[error("the controller refused this connection: {0}")]
    Refused(#[from] auth::Refusal),
    #[error("no answer within {0} s during the handshake")]
    HandshakeTimeout(u64),
    #[error("unexpected message during the handshake")]
    Unexpected,
    #[error("the connection was cut: {0}")]
    Cut(String),
}

/// Microseconds since the Unix epoch: timestamps on the wire and in the task store.
pub type Micros = u64;

/// Now, as [`Micros`].
pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An engine's number, stable for its life, also across kernel restarts.
    EngineId(u32)
);
impl EngineId {
    /// No engine: what a task that never ran (aborted, timed out or impossible before it was
    /// handed out) reports as its engine.
    pub const NONE: EngineId = EngineId(u32::MAX);
}

id_type!(
    /// One submission from a client: a `px`, a map, a push.
    JobId(u64)
);
id_type!(
    /// One unit of work on one engine.
    TaskId(u64)
);

/// Which engines a direct job runs on. Python slice syntax counts positions in the sorted list of
/// engine ids, like ipyparallel's `--targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Targets {
    All,
    Ids(Vec<EngineId>),
    Slice {
        start: Option<i64>,
        stop: Option<i64>,
        step: Option<i64>,
    },
}

impl Targets {
    /// Parses `all`, `3`, `0,2,5` or a slice such as `::2`, `:-1`, `1:3`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text == "all" {
            return Ok(Targets::All);
        }
        let bad = || {
            format!(
                "bad --targets '{text}': use an engine id (3), a list (0,2,5), a slice (::2, :-1, 1:3) or 'all'"
            )
        };
        if text.contains(':') {
            let parts: Vec<&str> = text.split(':').collect();
            if parts.len() > 3 {
                return Err(bad());
            }
            let num = |s: &str| -> Result<Option<i64>, String> {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse().map(Some).map_err(|_| bad())
                }
            };
            let step = if parts.len() == 3 {
                num(parts[2])?
            } else {
                None
            };
            if step == Some(0) {
                return Err(format!(
                    "bad --targets '{text}': a slice step cannot be zero"
                ));
            }
            return Ok(Targets::Slice {
                start: num(parts[0])?,
                stop: num(parts[1])?,
                step,
            });
        }
        let ids = text
            .split(',')
            .map(|s| s.trim().parse::<u32>().map(EngineId).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Targets::Ids(ids))
    }

    /// The engines these targets name, given the registered ids in ascending order.
    pub fn resolve(&self, ids: &[EngineId]) -> Result<Vec<EngineId>, String> {
        let chosen = match self {
            Targets::All => ids.to_vec(),
            Targets::Ids(want) => {
                for id in want {
                    if !ids.contains(id) {
                        return Err(format!(
                            "there is no engine {id}; the engines are {}",
                            format_ids(ids)
                        ));
                    }
                }
                want.clone()
            }
            Targets::Slice { start, stop, step } => slice(ids, *start, *stop, step.unwrap_or(1)),
        };
        if chosen.is_empty() {
            return Err(if ids.is_empty() {
                "no engine is registered yet; `starling status` shows the cluster".to_string()
            } else {
                format!(
                    "the targets select no engine; the engines are {}",
                    format_ids(ids)
                )
            });
        }
        Ok(chosen)
    }
}

impl From<EngineId> for Targets {
    fn from(id: EngineId) -> Self {
        Targets::Ids(vec![id])
    }
}

impl From<Vec<EngineId>> for Targets {
    fn from(ids: Vec<EngineId>) -> Self {
        Targets::Ids(ids)
    }
}

/// Formats ids like Python prints a list: `[0, 1, 2]`.
pub fn format_ids(ids: &[EngineId]) -> String {
    let inner: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!("[{}]", inner.join(", "))
}

fn slice<T: Clone>(items: &[T], start: Option<i64>, stop: Option<i64>, step: i64) -> Vec<T> {
    let len = items.len() as i64;
    let clamp = |i: i64, lo: i64, hi: i64| i.max(lo).min(hi);
    let norm = |i: i64| if i < 0 { i + len } else { i };
    let mut out = Vec::new();
    if step > 0 {
        let s = start.map_or(0, |i| clamp(norm(i), 0, len));
        let e = stop.map_or(len, |i| clamp(norm(i), 0, len));
        let mut i = s;
        while i < e {
            out.push(items[i as usize].clone());
            let Some(next) = i.checked_add(step) else {
                break;
            };
            i = next;
        }
    } else {
        let s = start.map_or(len - 1, |i| clamp(norm(i), -1, len - 1));
        let e = stop.map_or(-1, |i| clamp(norm(i), -1, len - 1));
        let mut i = s;
        while i > e {
            out.push(items[i as usize].clone());
            let Some(next) = i.checked_add(step) else {
                break;
            };
            i = next;
        }
    }
    out
}

/// Which kernel runs a piece of code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelKind {
    /// A persistent `python3` with its own namespace.
    Python,
    /// `bash -c` per task, in the engine's working directory.
    Shell,
}

/// A Python callable, travelling as source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Func {
    /// An expression that evaluates to a callable in the engine's namespace: `lambda x: x*x`,
    /// `math.sqrt`, or the name of a function defined there.
    Expr(String),
    /// The attribute `attr` of a module built from `source` and registered as `module` (so the
    /// functions in it pickle by reference): `work.py:simulate`, or code given with `--def`.
    Module {
        module: String,
        source: String,
        attr: String,
    },
    /// A callable pickled by a Python client (cloudpickle, protocol 5), with the buffers it
    /// pickled out of band and the client's Python version (`3.11`): functions travel as
    /// bytecode, so the engine refuses one from another minor version by name. A function
    /// defined interactively (in `__main__`) resolves its global names in the engine's
    /// namespace.
    Pickle {
        #[serde(with = "conn::shared_bytes")]
        bytes: bytes::Bytes,
        #[serde(with = "conn::shared_buffers")]
        buffers: Vec<bytes::Bytes>,
        python: String,
    },
}

impl Func {
    /// A function named `attr` in a Python file, which travels whole.
    pub fn from_file(path: &std::path::Path, attr: &str) -> std::io::Result<Self> {
        let source = std::fs::read_to_string(path)?;
        let module = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("starling_module")
            .to_string();
        Ok(Func::Module {
            module,
            source,
            attr: attr.to_string(),
        })
    }

    /// A function named `attr` defined by `source`.
    pub fn from_source(source: &str, attr: &str) -> Self {
        Func::Module {
            module: "starling_def".into(),
            source: source.to_string(),
            attr: attr.to_string(),
        }
    }
}

impl From<&str> for Func {
    fn from(expr: &str) -> Self {
        Func::Expr(expr.to_string())
    }
}

impl From<String> for Func {
    fn from(expr: String) -> Self {
        Func::Expr(expr)
    }
}

/// What a map applies to each item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mapper {
    /// A Python callable called with the item as its one argument.
    Python(Func),
    /// A Python callable called with the item's members as its arguments (`func(*item)`):
    /// a map over several sequences, or a load-balanced apply (one item, its argument list).
    Star(Func),
    /// A shell command line; `{}` stands for the item, shell-quoted. Its stdout is the result.
    Shell(String),
}

/// What one task asks of an engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Work {
    /// Python code; the value of a final expression is the result, like IPython's `Out`.
    Execute { code: String },
    /// A shell command; its exit status decides success.
    Shell { command: String },
    /// Calls a Python callable with these arguments; its return value is the result.
    Apply { func: Func, args: Vec<Value> },
    /// A chunk of a map: the job's mapper (sent once per engine process, see
    /// [`ControllerToEngine::Run`]) applied to each item.
    MapChunk { job: JobId, items: Vec<Value> },
    /// Sets names in the engine's namespace.
    Push { values: Vec<(String, Value)> },
    /// Reads names from the engine's namespace: one name gives its value, several a list.
    Pull { names: Vec<String> },
    /// Sets `name` to the list of `items` (this engine's part of a scatter).
    Scatter { name: String, items: Vec<Value> },
}

/// A submission from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobSpec {
    /// The same work on each of the targeted engines.
    Direct { targets: Targets, work: Work },
    /// Items split into contiguous chunks, one per target, each pushed as `name` there.
    Scatter {
        targets: Targets,
        name: String,
        items: Vec<Value>,
    },
    /// A map on fixed engines: items split into contiguous chunks, one per target; results in
    /// item order (ipyparallel's `DirectView.map`).
    DirectMap {
        targets: Targets,
        mapper: Mapper,
        items: Vec<Value>,
    },
    /// A load-balanced map: the controller hands out chunks as engines free up. `chunksize`
    /// fixes the chunk size; by default it adapts (large chunks first, small at the end).
    Map {
        mapper: Mapper,
        items: Vec<Value>,
        chunksize: Option<u32>,
    },
}

/// Jobs another job depends on, with ipyparallel's flags: with `all`, every one of them must
/// have ended as the flags ask (else any one); `success` and `failure` say which endings
/// count. The default waits for every job to succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    pub jobs: Vec<JobId>,
    pub all: bool,
    pub success: bool,
    pub failure: bool,
}

impl Dependency {
    /// Waits for every one of `jobs` to succeed.
    pub fn on(jobs: Vec<JobId>) -> Self {
        Self {
            jobs,
            all: true,
            success: true,
            failure: false,
        }
    }
}

/// How the scheduler treats a job, besides what it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOptions {
    /// Free text to find the job by in `history`.
    pub label: Option<String>,
    /// Who submitted it (`user@host`), for the record.
    pub submitter: String,
    /// Start only once these jobs have ended (as the flags ask).
    pub after: Option<Dependency>,
    /// Run only on the engines where these jobs ran (load-balanced work).
    pub follow: Option<Dependency>,
    /// Run a task that raised again, up to this many times, on another engine where there is
    /// one (load-balanced work).
    pub retries: u32,
    /// Fail a task with `TaskTimeout` once it has not finished this long after it could start;
    /// a running one is interrupted.
    pub timeout_ms: Option<u64>,
    /// Run only on these engines (load-balanced work: ipyparallel's
    /// `load_balanced_view(targets)`); the controller resolves them to ids when it takes the job.
    /// Last, and defaulted: the task store keeps options as a positional array, and records
    /// written before this field existed end one element short.
    #[serde(default)]
    pub engines: Option<Targets>,
}

/// What kind of job a [`JobInfo`] describes, so a client that re-attaches knows how to show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Execute,
    Shell,
    Apply,
    Push,
    Pull,
    Scatter,
    Map,
}

impl JobKind {
    /// Whether results are one per item (maps) rather than one per task.
    pub fn per_item(self) -> bool {
        self == JobKind::Map
    }
}

/// What a job is, as the controller reports it on submit or subscribe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub job: JobId,
    pub kind: JobKind,
    pub submitted: Micros,
    /// The tasks known up front and their engines: one per target for direct jobs, one per
    /// target's chunk for a direct map, none for a load-balanced map.
    pub tasks: Vec<(TaskId, EngineId)>,
    /// Result slots: one per task, or one per item for maps.
    pub slots: u64,
}

/// An error raised by user code, or by the cluster on its behalf (a lost engine, a dead kernel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The exception's type name (`ZeroDivisionError`), or `EngineLost`, `KernelDied`, …
    pub ename: String,
    pub evalue: String,
    /// The formatted traceback, as Python prints it; may be empty.
    pub traceback: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.ename, self.evalue)
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// `display` is the `repr` of a final expression's value, like IPython's `Out[...]`; `None`
    /// when the code ended in a statement or the value was `None`.
    Ok {
        value: Value,
        display: Option<String>,
    },
    /// Errors are boxed: rare, and a box keeps every result small (a controller holds a
    /// million of them for a map at chunksize 1).
    Err(Box<RemoteError>),
    /// A map chunk: each item's result or error, in item order.
    Items(Vec<Result<Value, Box<RemoteError>>>),
}

impl TaskResult {
    /// A result with no output: what an engine reports for work that did not reach its kernel
    /// (or that it answers itself), started and completed at `at`.
    pub fn bare(task: TaskId, engine: EngineId, first: u64, outcome: Outcome, at: Micros) -> Self {
        TaskResult {
            task,
            engine,
            first,
            outcome,
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            started: at,
            completed: at,
            attempts: 1,
        }
    }

    /// About how many bytes it holds in memory: the struct itself, each item's slot, and what
    /// they point to (with a little for the allocator's own bookkeeping).
    pub fn approx_bytes(&self) -> usize {
        const ALLOC: usize = 16;
        let error =
            |e: &RemoteError| 3 * ALLOC + e.ename.len() + e.evalue.len() + e.traceback.len();
        let outcome = match &self.outcome {
            Outcome::Ok { value, display } => {
                value.approx_bytes() + display.as_ref().map_or(0, |d| ALLOC + d.len())
            }
            Outcome::Err(e) => error(e),
            Outcome::Items(items) => {
                ALLOC
                    + items.capacity() * std::mem::size_of::<Result<Value, Box<RemoteError>>>()
                    + items
                        .iter()
                        .map(|i| match i {
                            Ok(v) => v.approx_bytes(),
                            Err(e) => error(e),
                        })
                        .sum::<usize>()
            }
        };
        std::mem::size_of::<Self>() + outcome + self.stdout.len() + self.stderr.len()
    }
}

/// The result of one task, with its captured output and timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: TaskId,
    pub engine: EngineId,
    /// The job's result slot this task fills first: its position among the job's tasks, or for
    /// a map chunk the index of its first item.
    pub first: u64,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
    /// The engine's execution counter, like IPython's `In [n]`.
    pub execution_count: u64,
    pub started: Micros,
    pub completed: Micros,
    /// How many times the task was handed to an engine: more than one when it ran again after
    /// its engine was lost, its kernel died, or it raised and had retries. Set by the controller.
    pub attempts: u32,
}

/// A message that carries task results, and can be made again around a part of them.
pub trait CarriesResults: Serialize + Sized {
    fn into_results(self) -> Vec<TaskResult>;
    #[must_use]
    fn around(&self, results: Vec<TaskResult>) -> Self;
}

impl CarriesResults for EngineToController {
    fn into_results(self) -> Vec<TaskResult> {
        match self {
            EngineToController::Done(results) => results,
            _ => Vec::new(),
        }
    }
    fn around(&self, results: Vec<TaskResult>) -> Self {
        EngineToController::Done(results)
    }
}

impl CarriesResults for ControllerToClient {
    fn into_results(self) -> Vec<TaskResult> {
        match self {
            ControllerToClient::Results { results, .. } => results,
            ControllerToClient::Reply { .. } | ControllerToClient::Output(_) => Vec::new(),
        }
    }
    fn around(&self, results: Vec<TaskResult>) -> Self {
        match self {
            ControllerToClient::Results { job, .. } => {
                ControllerToClient::Results { job: *job, results }
            }
            other => other.clone(),
        }
    }
}

/// Encodes a message carrying task results as frames within `limit` bytes: one frame when it
/// fits (the usual case, encoded once, nothing copied), else the results split over several,
/// and any single result too large for a frame replaced by an error that says so — so a huge
/// result fails its own task instead of the connection that carries it.
pub fn encode_results<T: CarriesResults>(msg: T, limit: usize) -> Vec<conn::Frame> {
    let whole = conn::encode(&msg);
    if whole.len() <= limit {
        return vec![whole];
    }
    let template = msg.around(Vec::new());
    let results = msg.into_results();
    let wrap = |results| template.around(results);
    // Room for the message around the results.
    let budget = limit.saturating_sub(1024);
    let mut frames = Vec::new();
    let mut group = Vec::new();
    let mut size = 0;
    for r in results {
        let mut len = conn::encode(&r).len();
        let r = if len > budget {
            let error = Box::new(RemoteError {
                ename: "ResultTooLarge".into(),
                evalue: format!(
                    "the result is {} MiB, above the cluster's frame limit of {} MiB (max_frame_mb in the spec); return less per task, e.g. write large data to files",
                    len >> 20,
                    limit >> 20
                ),
                traceback: String::new(),
            });
            let outcome = match &r.outcome {
                Outcome::Items(items) => Outcome::Items(vec![Err(error); items.len()]),
                _ => Outcome::Err(error),
            };
            let small = TaskResult {
                outcome,
                stdout: String::new(),
                stderr: String::new(),
                ..r
            };
            len = conn::encode(&small).len();
            small
        } else {
            r
        };
        if size + len > budget && !group.is_empty() {
            frames.push(conn::encode(&wrap(std::mem::take(&mut group))));
            size = 0;
        }
        size += len;
        group.push(r);
    }
    if !group.is_empty() {
        frames.push(conn::encode(&wrap(group)));
    }
    frames
}

/// Client → controller: a request, numbered so replies can be matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientToController {
    pub id: u64,
    pub body: ClientRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// The registered engine ids, ascending.
    Ids,
    Status,
    /// Replies once at least `count` engines are registered, or with an error after the timeout.
    WaitEngines {
        count: u32,
        timeout_ms: u64,
    },
    /// Replies [`Reply::Job`]; results follow as [`ControllerToClient::Results`].
    Submit {
        spec: JobSpec,
        options: Box<JobOptions>,
        /// The submitter waits for the job's end: the reply may be held back a moment (see
        /// the controller's `HOLD`) to travel with the results, so that a short job wakes
        /// the submitter once.
        wait: bool,
    },
    /// Attach to a job by id, also one another client submitted: replies [`Reply::Job`], then
    /// every result already in, then the rest as they complete.
    Subscribe {
        job: JobId,
    },
    /// Drops a job's tasks that have not started (they fail as `TaskAborted`); with
    /// `interrupt`, its running tasks are interrupted and fail the same way. Replies `Done`.
    Abort {
        job: JobId,
        interrupt: bool,
    },
    /// Sends SIGINT to the kernels of these engines: what runs there raises
    /// `KeyboardInterrupt`. Replies `Ids` with the engines interrupted.
    Interrupt {
        targets: Targets,
    },
    /// The jobs in the task store that match a `db_query` dict (JSON text; `{}` for all),
    /// newest first, at most `limit`. Replies `History`.
    History {
        filter: String,
        limit: u32,
    },
    /// What job `job` submitted, from the task store, to submit it again. Replies `Request`.
    Request {
        job: JobId,
    },
    /// Deletes finished jobs that match a `db_query` dict from the task store (and from the
    /// controller's memory). Replies `Count`.
    Purge {
        filter: String,
    },
    /// Stop the engines and the controller.
    Shutdown,
}

/// Client ← controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerToClient {
    Reply {
        id: u64,
        body: Reply,
    },
    /// Results of a job this client submitted or subscribed to, as they complete.
    Results {
        job: JobId,
        results: Vec<TaskResult>,
    },
    /// What a running task of such a job has written since the last of these (see
    /// [`EngineToController::Output`]).
    Output(TaskOutput),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Ids(Vec<EngineId>),
    Status(ClusterStatus),
    Job(JobInfo),
    History(Vec<JobRecord>),
    Request {
        spec: JobSpec,
        options: Box<JobOptions>,
    },
    Count(u64),
    Done,
    Error(String),
}

/// A job as the task store records it: what `history` lists and `db_query` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: JobId,
    pub submitted: Micros,
    pub completed: Option<Micros>,
    /// `user@host` of the client that submitted it.
    pub submitter: String,
    /// `execute`, `shell`, `apply`, `push`, `pull`, `scatter` or `map`.
    pub kind: String,
    pub label: Option<String>,
    /// `pending`, `ok`, `failed`, `aborted`, `timeout` or `impossible`.
    pub status: String,
    /// The first error, if it failed.
    pub error: Option<String>,
    /// Result slots: items of a map, else tasks.
    pub items: u64,
    pub retries: u32,
    /// Seconds.
    pub timeout: Option<f64>,
    pub after: Vec<JobId>,
    pub follow: Vec<JobId>,
    /// What it ran, in short (JSON).
    pub spec: String,
    /// The most times one of its tasks was handed out.
    pub attempts: u32,
    /// The engines that ran its tasks.
    pub engines: Vec<EngineId>,
}

/// What `starling status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub controller_pid: u32,
    pub engines: Vec<EngineStatus>,
    /// Engines that were registered (or tried to start) and are gone, each with the reason;
    /// an engine that comes back leaves this list.
    pub lost: Vec<LostEngine>,
    /// Tasks waiting for an engine (items of load-balanced maps not yet handed out included).
    pub queued: u64,
    /// Tasks running on engines now.
    pub running: u64,
    /// Tasks (items of load-balanced maps) of jobs that wait for their dependencies.
    pub waiting: u64,
    /// Jobs submitted to the cluster, finished or not.
    pub jobs: u64,
}

/// An engine that is gone, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostEngine {
    /// `None` for an engine that failed before it ever registered.
    pub id: Option<EngineId>,
    pub node: String,
    pub host: String,
    pub reason: String,
    /// When it was lost, µs since the epoch.
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub id: EngineId,
    pub node: String,
    pub host: String,
    /// The kernel's process id (what `os.getpid()` prints on that engine).
    pub pid: u32,
    /// The pid of the `starlingd engine` process that hosts it.
    pub process_pid: u32,
    pub state: EngineState,
    pub tasks_done: u64,
    /// Tasks assigned and not finished, the running one included.
    pub queued: u64,
    /// How often this engine was lost and came back (its process restarted by its node, or
    /// reconnected after a network blip or a stall), and the last reason.
    pub returns: u32,
    pub last_lost: Option<String>,
    /// Its kernel's MPI rank, on an MPI cluster: its id, until a node before it is removed.
    #[serde(default)]
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineState {
    Idle,
    Busy,
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineState::Idle => "idle",
            EngineState::Busy => "busy",
        })
    }
}

/// Engine process → controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EngineToController {
    /// First message after the handshake: one engine process and its engines. An engine that
    /// registers again with a slot of its node (its process restarted, or reconnected) gets
    /// back the id that slot had.
    Register {
        node: String,
        host: String,
        /// The `starlingd engine` process's pid.
        pid: u32,
        engines: Vec<EngineSlot>,
    },
    /// An engine that cannot start at all (its Python cannot run, say): the controller fails
    /// whoever waits for engines at once, with this reason, instead of letting them time out.
    CannotStart {
        node: String,
        host: String,
        slot: u32,
        reason: String,
    },
    Heartbeat,
    Done(Vec<TaskResult>),
    /// What a task has written to stdout and stderr since it started or since the last of
    /// these, sent while it runs (every 0.2 s at most); its result still carries all of it.
    Output(TaskOutput),
    /// A kernel died and was replaced; the engine keeps its id.
    KernelRestarted {
        engine: EngineId,
        pid: u32,
        reason: String,
        /// On an MPI cluster, the new kernel's rank: a world started again without a removed
        /// node's ranks numbers the later ones anew.
        #[serde(default)]
        rank: Option<u32>,
    },
}

/// Output of a running task, as it is written (for `%px --stream`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// Filled in by the controller; the engine leaves it at 0.
    pub job: JobId,
    pub task: TaskId,
    pub engine: EngineId,
    pub stdout: String,
    pub stderr: String,
}

/// One engine of a registering process: which engine of its node it is, and its kernel's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSlot {
    pub slot: u32,
    pub kernel_pid: u32,
    /// On an MPI cluster, the kernel's rank: a new engine's id is this rank when no other
    /// engine holds that id (after a `remove-node`, ids and ranks can differ).
    #[serde(default)]
    pub rank: Option<u32>,
}

/// Controller → engine process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerToEngine {
    /// The ids of this process's engines, in slot order, and how often to send heartbeats.
    Registered {
        ids: Vec<EngineId>,
        heartbeat_ms: u64,
    },
    /// These map jobs are finished: their mappers can be dropped.
    Forget(Vec<JobId>),
    /// These tasks are no longer wanted (aborted, timed out): those not started are dropped,
    /// a running one is interrupted, and its kernel replaced if it does not stop. Their
    /// results, if any come, are ignored.
    Cancel(Vec<(EngineId, TaskId)>),
    /// Interrupt whatever these engines' kernels are running (SIGINT).
    Interrupt(Vec<EngineId>),
    /// Work to do, several tasks a frame; each engine runs its tasks in order. `defs` carries
    /// the mapper of each map job this engine process has not seen yet.
    Run {
        defs: Vec<(JobId, Mapper)>,
        tasks: Vec<Assignment>,
    },
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub task: TaskId,
    pub engine: EngineId,
    /// The result slot of the task's first item or of the task itself (see [`TaskResult::first`]).
    pub first: u64,
    pub work: Work,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<EngineId> {
        (0..n).map(EngineId).collect()
    }

    fn pick(t: &str) -> Vec<u32> {
        Targets::parse(t)
            .unwrap()
            .resolve(&ids(4))
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect()
    }

    #[test]
    fn targets_follow_python_slices() {
        assert_eq!(pick("all"), vec![0, 1, 2, 3]);
        assert_eq!(pick(":-1"), vec![0, 1, 2]);
        assert_eq!(pick("::2"), vec![0, 2]);
        assert_eq!(pick("1:3"), vec![1, 2]);
        assert_eq!(pick("-1:"), vec![3]);
        assert_eq!(pick("::-1"), vec![3, 2, 1, 0]);
        assert_eq!(pick("1"), vec![1]);
        assert_eq!(pick("0,3"), vec![0, 3]);
        assert_eq!(pick("1::9223372036854775807"), vec![1]);
        assert_eq!(pick("::-9223372036854775807"), vec![3]);
    }

    #[test]
    fn bad_targets_say_what_is_allowed() {
        assert!(Targets::parse("x")
            .unwrap_err()
            .contains("use an engine id"));
        assert!(Targets::parse("::0")
            .unwrap_err()
            .contains("cannot be zero"));
        let err = Targets::parse("7").unwrap().resolve(&ids(4)).unwrap_err();
        assert_eq!(err, "there is no engine 7; the engines are [0, 1, 2, 3]");
        let err = Targets::parse("5:").unwrap().resolve(&ids(4)).unwrap_err();
        assert!(err.contains("select no engine"), "{err}");
    }
}

#[cfg(test)]
mod fit_tests {
    use super::*;

    #[test]
    fn results_stay_small_in_memory() {
        use std::mem::size_of;
        // A controller holds a result per task, a million of them for a map at chunksize 1,
        // and an item result per item: errors are boxed so that neither pays for them. (A
        // JSON value is 72 bytes: the AWS SDK turns on serde_json's `preserve_order`, which
        // also keeps a Python dict's key order.)
        let item = size_of::<Result<Value, Box<RemoteError>>>();
        let outcome = size_of::<Outcome>();
        let result = size_of::<TaskResult>();
        println!("item result {item} B, outcome {outcome} B, task result {result} B");
        assert!(item <= 72, "{item}");
        assert!(outcome <= 96, "{outcome}");
        assert!(result <= 192, "{result}");
    }

    fn result(task: u64, text_len: usize) -> TaskResult {
        TaskResult {
            task: TaskId(task),
            engine: EngineId(0),
            first: task,
            outcome: Outcome::Ok {
                value: Value::Json("x".repeat(text_len).into()),
                display: None,
            },
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 1,
            started: 0,
            completed: 0,
            attempts: 1,
        }
    }

    #[test]
    fn results_are_split_to_fit_frames_and_a_result_too_large_fails_alone() {
        let limit = 10_000;
        let small = encode_results(
            EngineToController::Done(vec![result(0, 10), result(1, 10)]),
            limit,
        );
        assert_eq!(small.len(), 1, "what fits is one frame");

        let many: Vec<TaskResult> = (0..10).map(|i| result(i, 3000)).collect();
        let frames = encode_results(EngineToController::Done(many), limit);
        assert!(frames.len() > 2 && frames.iter().all(|f| f.len() <= limit));
        let back: usize = frames
            .iter()
            .map(
                |f| match conn::decode::<EngineToController>(&f.clone().into_bytes()).unwrap() {
                    EngineToController::Done(r) => r.len(),
                    _ => 0,
                },
            )
            .sum();
        assert_eq!(back, 10, "nothing is lost");

        let frames = encode_results(
            EngineToController::Done(vec![result(0, 10), result(1, 50_000)]),
            limit,
        );
        let EngineToController::Done(rs) = conn::decode(&frames[0].clone().into_bytes()).unwrap()
        else {
            panic!()
        };
        assert!(
            matches!(&rs[1].outcome, Outcome::Err(e) if e.ename == "ResultTooLarge" && e.evalue.contains("frame limit"))
        );
        assert!(matches!(&rs[0].outcome, Outcome::Ok { .. }));
    }
}
