//! The Rust client library — and everything the CLI's compute commands call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), starling::client::ClientError> {
//! use starling::client::Client;
//!
//! let client = Client::connect("~/.starling/clusters/local/connection.json").await?;
//! println!("engines: {:?}", client.ids().await?);
//! let ar = client.all().execute("import os; os.getpid()").await?;
//! for value in ar.get().await? {
//!     println!("{value}");
//! }
//! println!("took {:?}, {:?} of engine time", ar.elapsed(), ar.serial_time());
//! # Ok(()) }
//! ```
//!
//! A [`Client`] holds one TLS connection to the controller. Requests are numbered and their
//! replies matched by a reader task; results of jobs arrive as they complete and fill the
//! job's [`AsyncResult`]. Names follow ipyparallel: [`Client::all`] and [`Client::direct`] give a
//! [`DirectView`] (`execute`, `apply`, `shell`), and results are [`AsyncResult`]s with
//! `ready`, `wait`, `get`, `elapsed`, `serial_time`.

pub mod connection;
pub mod result;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::proto::auth::Role;
use crate::proto::conn;
use crate::proto::{
    ClientRequest, ClientToController, ClusterStatus, ControllerToClient, Dependency, EngineId,
    Func, JobId, JobOptions, JobRecord, JobSpec, Mapper, ProtoError, Reply, Targets, Value, Work,
};
pub use connection::ConnectionInfo;
use result::JobState;
pub use result::{AsyncResult, CompositeError, EngineError};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NoConnectionFile(String),
    #[error("the connection file {path} is unusable: {reason}")]
    BadConnectionFile { path: PathBuf, reason: String },
    #[error("cannot reach the controller of cluster '{cluster}' at {addr}: {reason}{hint}")]
    Connect {
        cluster: String,
        addr: String,
        reason: ProtoError,
        /// What to try next: whether the cluster is up, unless the controller answered.
        hint: &'static str,
    },
    #[error("lost the connection to the controller: {0}")]
    Disconnected(String),
    #[error("lost the connection to the controller while waiting for job {job}: {why}\nthe job is in the cluster's task store: `starling result {job}` (in Python `rc.get_result({job})`) waits for it; if the controller is down, `starling restart` starts it again")]
    LostWhileWaiting { job: JobId, why: String },
    #[error("{0}")]
    Controller(String),
    #[error(transparent)]
    Remote(#[from] CompositeError),
    #[error("the request is {mib} MiB, above the cluster's frame limit of {limit_mib} MiB (max_frame_mb in the spec); send the items in several smaller maps, or raise the limit")]
    TooLarge { mib: usize, limit_mib: usize },
}

/// Where a reply goes: the requester, with the job state when the reply creates one.
type ReplySender = oneshot::Sender<(Reply, Option<Arc<JobState>>)>;

/// When a submitter hears back: once the job is accepted (its id), or once it has ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Answer {
    #[default]
    Accepted,
    Ended,
}

/// Requests waiting for their replies; once the connection is gone, why, and no more requests.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, (ReplySender, Answer)>,
    closed: Option<String>,
}

/// The connection's sending side. A request is written by the thread that makes it, when the
/// socket is free and nothing waits before it: no other thread is woken to send it. Large
/// frames, frames that find the socket busy, and the rest of a write the socket could not take
/// at once go to the writer task, which keeps them in order.
struct Out {
    writer: Arc<tokio::sync::Mutex<ClientWriter>>,
    /// Frames for the writer task; an empty one asks it to finish a flush.
    queue: mpsc::UnboundedSender<conn::Frame>,
    /// Frames in `queue` the writer task has not fed yet; a request only skips the queue when
    /// this is 0.
    queued: Arc<AtomicUsize>,
}

type ClientWriter = conn::Writer<conn::PeerStream, ClientToController>;

impl Out {
    /// Sends one encoded frame, in order with those sent before; an error means the
    /// connection is broken.
    fn send(&self, frame: conn::Frame) -> Result<(), String> {
        if frame.len() < conn::WRITE_DIRECT && self.queued.load(Ordering::Acquire) == 0 {
            if let Ok(mut w) = self.writer.try_lock() {
                if self.queued.load(Ordering::Acquire) == 0 {
                    // Feeding a small frame into an empty buffer is done at once; a flush the
                    // socket cannot finish now is finished by the writer task, since what was
                    // fed stays in the writer's buffer.
                    match w.feed_frame(frame.clone()).now_or_never() {
                        Some(Ok(())) => {
                            return match w.flush().now_or_never() {
                                Some(Ok(())) => Ok(()),
                                Some(Err(e)) => Err(e.to_string()),
                                None => self.enqueue(conn::Frame::default()),
                            };
                        }
                        Some(Err(e)) => return Err(e.to_string()),
                        None => {}
                    }
                }
            }
        }
        self.enqueue(frame)
    }

    fn enqueue(&self, frame: conn::Frame) -> Result<(), String> {
        let counted = !frame.is_empty();
        if counted {
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        self.queue.send(frame).map_err(|_| {
            if counted {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            "the connection is closed".to_string()
        })
    }
}

/// The writer task: writes what [`Out::send`] queued, in order, holding the writer while it
/// does; closes the connection when the client is gone.
async fn write_queued(
    writer: Arc<tokio::sync::Mutex<ClientWriter>>,
    mut queue: mpsc::UnboundedReceiver<conn::Frame>,
    queued: Arc<AtomicUsize>,
) -> Result<(), ProtoError> {
    while let Some(frame) = queue.recv().await {
        let mut w = writer.lock().await;
        let mut next = Some(frame);
        while let Some(frame) = next {
            if !frame.is_empty() {
                w.feed_frame(frame).await?;
                queued.fetch_sub(1, Ordering::AcqRel);
            }
            next = queue.try_recv().ok();
        }
        w.flush().await?;
    }
    writer.lock().await.close().await;
    Ok(())
}

pub(crate) struct Shared {
    info: ConnectionInfo,
    out: Out,
    next_id: AtomicU64,
    pending: Mutex<Pending>,
    jobs: Mutex<HashMap<JobId, Weak<JobState>>>,
    /// Who submits, for the task store: `user@host`, found once.
    submitter: String,
    /// Closed (its senders dropped) when the reader and writer tasks have ended: see
    /// [`Client::closed`].
    writing: tokio::sync::watch::Receiver<()>,
    /// Notified after every reply from the controller, when a job ends and when the connection
    /// is lost: see [`Client::settled`].
    settle: Arc<tokio::sync::Notify>,
}

impl Drop for Shared {
    /// The connection closes with the last client: the jobs still in flight end for those
    /// holding their results, with the job's id to find it again.
    fn drop(&mut self) {
        let jobs = self.jobs.get_mut().unwrap_or_else(|e| e.into_inner());
        for state in jobs.values().filter_map(Weak::upgrade) {
            state.broken("this client was closed");
        }
    }
}

/// A connection to one cluster's controller. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

fn expand_tilde(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

impl Client {
    /// Connects with a connection file.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let info = ConnectionInfo::load(&expand_tilde(path.as_ref()))?;
        Self::connect_with(info).await
    }

    /// Connects with connection details already in memory.
    pub async fn connect_with(info: ConnectionInfo) -> Result<Self, ClientError> {
        let c: conn::Conn<conn::PeerStream, ControllerToClient, ClientToController> =
            conn::connect(
                &info.controller,
                &info.certificate,
                Role::Client,
                &info.client_key,
                info.max_frame,
            )
            .await
            .map_err(|reason| ClientError::Connect {
                cluster: info.cluster.clone(),
                addr: info.controller.clone(),
                hint: match reason {
                    // The controller is up and said why it would not talk.
                    ProtoError::Refused(_) => "",
                    _ => ". Is the cluster up? (`starling status`; `starling up` starts it)",
                },
                reason,
            })?;
        let (mut reader, writer) = c.split();
        let (queue, queue_rx) = mpsc::unbounded_channel();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let queued = Arc::new(AtomicUsize::new(0));
        let (writer_alive, writing) = tokio::sync::watch::channel(());
        let shared = Arc::new(Shared {
            info,
            out: Out {
                writer: writer.clone(),
                queue,
                queued: queued.clone(),
            },
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Pending::default()),
            jobs: Mutex::new(HashMap::new()),
            submitter: submitter(),
            writing,
            settle: Arc::new(tokio::sync::Notify::new()),
        });
        let weak = Arc::downgrade(&shared);
        let on_write_error = weak.clone();
        let reader_alive = writer_alive.clone();
        tokio::spawn(async move {
            if let Err(e) = write_queued(writer, queue_rx, queued).await {
                if let Some(shared) = on_write_error.upgrade() {
                    shared.on_disconnect(&e.to_string());
                }
            }
            drop(writer_alive);
        });
        tokio::spawn(async move {
            let why = loop {
                let msg = match reader.recv().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break "the controller closed the connection".to_string(),
                    Err(e) => break e.to_string(),
                };
                let Some(shared) = weak.upgrade() else { return };
                shared.on_message(msg);
            };
            if let Some(shared) = weak.upgrade() {
                shared.on_disconnect(&why);
            }
            drop(reader_alive);
        });
        Ok(Self { shared })
    }

    /// Resolves once this connection is gone: closed after the last clone of this client was
    /// dropped (and the controller closed its side), or broken. For a caller that drives the
    /// runtime only on demand, so it knows how long to drive after dropping the client.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut writing = self.shared.writing.clone();
        async move { while writing.changed().await.is_ok() {} }
    }

    /// Resolves once nothing this client started is in flight: no request waits for its
    /// reply, and every job whose results it still takes in has ended (or the client is gone).
    /// For a caller that drives the runtime only on demand and stopped waiting midway (Ctrl-C):
    /// what is still on its way must be read, or it piles up at the controller.
    pub fn settled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = Arc::downgrade(&self.shared);
        let settle = self.shared.settle.clone();
        async move {
            loop {
                let notified = settle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match shared.upgrade() {
                    Some(s) if !s.is_settled() => {}
                    _ => return,
                }
                notified.await;
            }
        }
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.shared.info.cluster
    }

    async fn request(&self, body: ClientRequest) -> Result<Reply, ClientError> {
        self.request_job(body, Answer::Accepted)
            .await
            .map(|(reply, _)| reply)
    }

    async fn request_job(
        &self,
        body: ClientRequest,
        answer: Answer,
    ) -> Result<(Reply, Option<Arc<JobState>>), ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = conn::encode(&ClientToController { id, body });
        // Room for the envelope the controller puts around the work on its way to an engine.
        if frame.len() > self.request_limit() {
            return Err(ClientError::TooLarge {
                mib: frame.len() >> 20,
                limit_mib: self.shared.info.max_frame >> 20,
            });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending.lock().expect("not poisoned");
            if let Some(why) = &pending.closed {
                return Err(ClientError::Disconnected(why.clone()));
            }
            pending.waiting.insert(id, (tx, answer));
        }
        if let Err(why) = self.shared.out.send(frame) {
            self.shared.on_disconnect(&why);
            return Err(ClientError::Disconnected(why));
        }
        match rx.await {
            Ok((Reply::Error(e), _)) => Err(ClientError::Controller(e)),
            Ok(reply) => Ok(reply),
            Err(_) => Err(ClientError::Disconnected(
                "the controller went away before answering".into(),
            )),
        }
    }

    /// The largest request the cluster takes, in bytes (its `max_frame_mb`), less the room the
    /// controller needs around the work.
    pub fn request_limit(&self) -> usize {
        self.shared
            .info
            .max_frame
            .saturating_sub(conn::ENVELOPE_MARGIN)
    }

    /// The registered engine ids, ascending.
    pub async fn ids(&self) -> Result<Vec<EngineId>, ClientError> {
        match self.request(ClientRequest::Ids).await? {
            Reply::Ids(ids) => Ok(ids),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits until at least `count` engines are registered; returns their ids.
    pub async fn wait_for_engines(
        &self,
        count: u32,
        timeout: Duration,
    ) -> Result<Vec<EngineId>, ClientError> {
        let body = ClientRequest::WaitEngines {
            count,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.request(body).await? {
            Reply::Ids(ids) => Ok(ids),
            other => Err(unexpected(&other)),
        }
    }

    /// Engines, their state and the queue.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self.request(ClientRequest::Status).await? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// A view that sends work wherever there is room.
    pub fn load_balanced(&self) -> LoadBalancedView {
        LoadBalancedView {
            client: self.clone(),
            chunksize: None,
            ordered: true,
            options: JobOptions::default(),
            answer: Answer::Accepted,
        }
    }

    /// A view on every engine.
    pub fn all(&self) -> DirectView {
        self.direct(Targets::All)
    }

    /// A view on some engines: an id, a list of ids, or [`Targets::parse`] of a slice.
    pub fn direct(&self, targets: impl Into<Targets>) -> DirectView {
        DirectView {
            client: self.clone(),
            targets: targets.into(),
            options: JobOptions::default(),
            answer: Answer::Accepted,
        }
    }

    /// Submits any job as it is: what the views build, for callers that build their own.
    pub async fn submit(&self, spec: JobSpec) -> Result<AsyncResult, ClientError> {
        self.submit_with(spec, JobOptions::default()).await
    }

    /// [`Self::submit`] with scheduler options: dependencies, retries, a timeout, a label.
    pub async fn submit_with(
        &self,
        spec: JobSpec,
        options: JobOptions,
    ) -> Result<AsyncResult, ClientError> {
        self.submit_answered(spec, options, Answer::Accepted).await
    }

    async fn submit_answered(
        &self,
        spec: JobSpec,
        mut options: JobOptions,
        answer: Answer,
    ) -> Result<AsyncResult, ClientError> {
        if options.submitter.is_empty() {
            options.submitter.clone_from(&self.shared.submitter);
        }
        self.submit_or_subscribe(
            ClientRequest::Submit {
                spec,
                options: Box::new(options),
                wait: matches!(answer, Answer::Ended),
            },
            answer,
        )
        .await
    }

    /// Drops the tasks of a job that have not started (they fail as `TaskAborted`); with
    /// `interrupt`, its running tasks are interrupted too. An error if it has finished.
    pub async fn abort(&self, job: JobId, interrupt: bool) -> Result<(), ClientError> {
        self.request(ClientRequest::Abort { job, interrupt })
            .await
            .map(|_| ())
    }

    /// Sends SIGINT to the kernels of these engines (ipyparallel's `send_signal`): what runs
    /// there raises `KeyboardInterrupt`. Returns the engines interrupted.
    pub async fn interrupt(
        &self,
        targets: impl Into<Targets>,
    ) -> Result<Vec<EngineId>, ClientError> {
        match self
            .request(ClientRequest::Interrupt {
                targets: targets.into(),
            })
            .await?
        {
            Reply::Ids(ids) => Ok(ids),
            other => Err(unexpected(&other)),
        }
    }

    /// Re-attaches to a job by id — also one submitted by another client that has since exited.
    pub async fn result(&self, job: JobId) -> Result<AsyncResult, ClientError> {
        self.submit_or_subscribe(ClientRequest::Subscribe { job }, Answer::Accepted)
            .await
    }

    /// The jobs in the cluster's task store that match `query`, newest first, at most `limit`:
    /// ipyparallel's `db_query`. The query is a dict of [`JobRecord`]'s keys to values or to
    /// `{operator: value}` with MongoDB's `$lt`, `$lte`, `$gt`, `$gte`, `$eq`, `$ne`, `$in`,
    /// `$nin`, `$exists`: `{"status": "failed", "submitted": {"$gt": micros}}`. `engine`
    /// selects jobs that ran a task on that engine.
    pub async fn history(
        &self,
        query: &serde_json::Value,
        limit: u32,
    ) -> Result<Vec<JobRecord>, ClientError> {
        let body = ClientRequest::History {
            filter: query.to_string(),
            limit,
        };
        match self.request(body).await? {
            Reply::History(records) => Ok(records),
            other => Err(unexpected(&other)),
        }
    }

    /// Submits what job `job` submitted again, as a new job (ipyparallel's `resubmit`).
    pub async fn resubmit(&self, job: JobId) -> Result<AsyncResult, ClientError> {
        match self.request(ClientRequest::Request { job }).await? {
            Reply::Request { spec, mut options } => {
                options.submitter = String::new();
                self.submit_with(spec, *options).await
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes the finished jobs that match `query` (see [`Self::history`]) from the task
    /// store and the controller's memory; returns how many (ipyparallel's `purge_results`).
    pub async fn purge(&self, query: &serde_json::Value) -> Result<u64, ClientError> {
        let body = ClientRequest::Purge {
            filter: query.to_string(),
        };
        match self.request(body).await? {
            Reply::Count(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    /// Stops the cluster's engines and controller.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.request(ClientRequest::Shutdown).await.map(|_| ())
    }

    async fn submit_or_subscribe(
        &self,
        body: ClientRequest,
        answer: Answer,
    ) -> Result<AsyncResult, ClientError> {
        match self.request_job(body, answer).await? {
            (Reply::Job(_), Some(state)) => Ok(AsyncResult {
                state,
                ordered: true,
                client: Arc::downgrade(&self.shared),
            }),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

/// Job states are created by the reader task itself, before the reply is handed over, and
/// travel with the reply; so results that follow the reply on the wire always find their job.
impl Shared {
    fn is_settled(&self) -> bool {
        self.pending
            .lock()
            .expect("not poisoned")
            .waiting
            .is_empty()
            && self
                .jobs
                .lock()
                .expect("not poisoned")
                .values()
                .filter_map(Weak::upgrade)
                .all(|state| state.has_ended())
    }

    fn on_message(&self, msg: ControllerToClient) {
        match msg {
            ControllerToClient::Reply { id, body } => {
                let job = if let Reply::Job(info) = &body {
                    let mut jobs = self.jobs.lock().expect("not poisoned");
                    jobs.retain(|_, w| w.strong_count() > 0);
                    let state = jobs
                        .get(&info.job)
                        .and_then(Weak::upgrade)
                        .unwrap_or_else(|| {
                            let s = Arc::new(JobState::new(info.clone()));
                            jobs.insert(info.job, Arc::downgrade(&s));
                            s
                        });
                    Some(state)
                } else {
                    None
                };
                let waiter = self
                    .pending
                    .lock()
                    .expect("not poisoned")
                    .waiting
                    .remove(&id);
                match (waiter, job) {
                    (Some((tx, Answer::Ended)), Some(state)) => state.answer_at_end(tx, body),
                    (Some((tx, _)), job) => {
                        let _ = tx.send((body, job));
                    }
                    (None, _) => {}
                }
                self.settle.notify_waiters();
            }
            ControllerToClient::Output(out) => {
                let state = self
                    .jobs
                    .lock()
                    .expect("not poisoned")
                    .get(&out.job)
                    .and_then(Weak::upgrade);
                if let Some(state) = state {
                    state.add_output(out);
                }
            }
            ControllerToClient::Results { job, results } => {
                let state = self
                    .jobs
                    .lock()
                    .expect("not poisoned")
                    .get(&job)
                    .and_then(Weak::upgrade);
                if let Some(state) = state {
                    state.add(results);
                    // Only a job's end can settle the client here, not each of its results.
                    if state.has_ended() {
                        self.settle.notify_waiters();
                    }
                }
            }
        }
    }

    fn on_disconnect(&self, why: &str) {
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            pending.closed = Some(why.to_string());
            pending.waiting.clear();
        }
        for state in self
            .jobs
            .lock()
            .expect("not poisoned")
            .values()
            .filter_map(Weak::upgrade)
        {
            state.broken(why);
        }
        self.settle.notify_waiters();
    }
}

fn unexpected(reply: &Reply) -> ClientError {
    ClientError::Controller(format!("unexpected reply from the controller: {reply:?}"))
}

/// The scheduler options both views take: `options`, `after`, `timeout`, `label`.
macro_rules! scheduler_options {
    () => {
        /// Submitting returns once the job has ended, not once it is accepted: for a caller
        /// that waits for the results anyway, which is then woken once.
        #[must_use]
        pub fn returning_when_done(mut self) -> Self {
            self.answer = Answer::Ended;
            self
        }

        /// Sets every scheduler option at once (dependencies, retries, timeout, label).
        #[must_use]
        pub fn options(mut self, options: JobOptions) -> Self {
            self.options = options;
            self
        }

        /// Work from this view starts only once `dep` is met (by default: every job in it has
        /// succeeded); if it cannot be met any more, it fails with `ImpossibleDependency`.
        #[must_use]
        pub fn after(mut self, dep: impl Into<Dependency>) -> Self {
            self.options.after = Some(dep.into());
            self
        }

        /// Each task of this view's work fails with `TaskTimeout` if it has not finished this
        /// long after it could start; a running one is interrupted.
        #[must_use]
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.options.timeout_ms = Some((timeout.as_millis() as u64).max(1));
            self
        }

        /// A label for this view's jobs, to find them in the history.
        #[must_use]
        pub fn label(mut self, label: &str) -> Self {
            self.options.label = Some(label.to_string());
            self
        }
    };
}

/// Runs work on a fixed set of engines, like ipyparallel's `DirectView`.
#[derive(Clone)]
pub struct DirectView {
    client: Client,
    targets: Targets,
    options: JobOptions,
    answer: Answer,
}

impl DirectView {
    scheduler_options!();

    /// The targets this view names.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    async fn submit_spec(&self, spec: JobSpec) -> Result<AsyncResult, ClientError> {
        self.client
            .submit_answered(spec, self.options.clone(), self.answer)
            .await
    }

    async fn submit(&self, work: Work) -> Result<AsyncResult, ClientError> {
        self.submit_spec(JobSpec::Direct {
            targets: self.targets.clone(),
            work,
        })
        .await
    }

    /// Runs Python code on each engine, in that engine's namespace. The value of a final
    /// expression is the task's result (`None` otherwise), like `%px`.
    pub async fn execute(&self, code: &str) -> Result<AsyncResult, ClientError> {
        self.submit(Work::Execute {
            code: code.to_string(),
        })
        .await
    }

    /// Runs a shell command on each engine with `bash -c`; a non-zero exit is an error.
    pub async fn shell(&self, command: &str) -> Result<AsyncResult, ClientError> {
        self.submit(Work::Shell {
            command: command.to_string(),
        })
        .await
    }

    /// Calls a Python callable on each engine with `args`: `func` is an expression such as
    /// `"lambda x, y: x + y"`, the name of a function defined there, or a [`Func`] from a file.
    pub async fn apply(
        &self,
        func: impl Into<Func>,
        args: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        self.submit(Work::Apply {
            func: func.into(),
            args,
        })
        .await
    }

    /// Maps `func` over `items`, split into contiguous chunks, one per engine; results in item
    /// order, like ipyparallel's `DirectView.map`.
    pub async fn map(
        &self,
        func: impl Into<Func>,
        items: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        self.map_with(Mapper::Python(func.into()), items).await
    }

    /// [`Self::map`] with any [`Mapper`], e.g. a shell command line.
    pub async fn map_with(
        &self,
        mapper: Mapper,
        items: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        self.submit_spec(JobSpec::DirectMap {
            targets: self.targets.clone(),
            mapper,
            items,
        })
        .await
    }

    /// Sets names in each engine's namespace.
    pub async fn push(&self, values: Vec<(String, Value)>) -> Result<AsyncResult, ClientError> {
        self.submit(Work::Push { values }).await
    }

    /// Reads names from each engine: per engine, the value of one name, or a list for several.
    pub async fn pull(&self, names: &[&str]) -> Result<AsyncResult, ClientError> {
        let names = names.iter().map(|n| (*n).to_string()).collect();
        self.submit(Work::Pull { names }).await
    }

    /// Splits `items` into contiguous chunks, one per engine, and sets `name` to its chunk there.
    pub async fn scatter(&self, name: &str, items: Vec<Value>) -> Result<AsyncResult, ClientError> {
        self.submit_spec(JobSpec::Scatter {
            targets: self.targets.clone(),
            name: name.to_string(),
            items,
        })
        .await
    }

    /// The concatenation of the lists named `name` on each engine, in engine order: the
    /// inverse of [`Self::scatter`]. Each engine's part must be a list with a JSON form.
    pub async fn gather(&self, name: &str) -> Result<Vec<Value>, ClientError> {
        let ar = self.pull(&[name]).await?;
        let parts = ar.get().await?;
        let mut out = Vec::new();
        for (engine, part) in ar.engines().into_iter().zip(parts) {
            match part {
                Value::Json(serde_json::Value::Array(items)) => out.extend(items.into_iter().map(Value::Json)),
                other => {
                    return Err(ClientError::Controller(format!(
                        "cannot gather '{name}': on engine {engine} it is {}, not a list with a JSON form; use pull instead",
                        other.to_python_repr()
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// Sends work wherever there is room, like ipyparallel's `LoadBalancedView`.
#[derive(Clone)]
pub struct LoadBalancedView {
    client: Client,
    chunksize: Option<u32>,
    ordered: bool,
    options: JobOptions,
    answer: Answer,
}

impl LoadBalancedView {
    scheduler_options!();

    /// Work from this view runs only on the engines where `dep`'s jobs ran (all of them, or
    /// any, as `dep` says), once they have ended as it asks.
    #[must_use]
    pub fn follow(mut self, dep: impl Into<Dependency>) -> Self {
        self.options.follow = Some(dep.into());
        self
    }

    /// A task that raises runs again, up to `retries` times, on another engine where there
    /// is one with room.
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = retries;
        self
    }

    /// Fixes the number of items per task; by default chunks adapt (large first, small last).
    #[must_use]
    pub fn chunksize(mut self, chunksize: u32) -> Self {
        self.chunksize = Some(chunksize.max(1));
        self
    }

    /// Whether the results of this view's maps stream in item order (the default) or as they
    /// complete ([`AsyncResult::stream`]); `get()` always returns item order.
    #[must_use]
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Maps `func` over `items` as one submission; the controller splits it into chunks and
    /// gives them to engines as they free up. Results keep item order in
    /// [`AsyncResult::get`]; [`AsyncResult::stream`] yields them ordered or as they complete.
    pub async fn map(
        &self,
        func: impl Into<Func>,
        items: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        self.map_with(Mapper::Python(func.into()), items).await
    }

    /// [`Self::map`] with any [`Mapper`], e.g. a shell command line with `{}` for the item.
    pub async fn map_with(
        &self,
        mapper: Mapper,
        items: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        let spec = JobSpec::Map {
            mapper,
            items,
            chunksize: self.chunksize,
        };
        self.client
            .submit_answered(spec, self.options.clone(), self.answer)
            .await
            .map(|ar| ar.ordered(self.ordered))
    }

    /// Calls `func(*args)` once, on whichever engine is free first.
    pub async fn apply(
        &self,
        func: impl Into<Func>,
        args: Vec<Value>,
    ) -> Result<AsyncResult, ClientError> {
        // One item: the argument list. Pickled arguments travel inside it as the kernel's
        // nested form (see `Value::nested_json`).
        let args = serde_json::Value::Array(args.iter().map(Value::nested_json).collect());
        self.map_with(Mapper::Star(func.into()), vec![Value::Json(args)])
            .await
    }
}

/// Who submits, for the task store's record: `user@host`.
fn submitter() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| format!("uid{}", nix::unistd::getuid()));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_string());
    format!("{user}@{host}")
}

impl From<JobId> for Dependency {
    fn from(job: JobId) -> Self {
        Dependency::on(vec![job])
    }
}

impl From<Vec<JobId>> for Dependency {
    fn from(jobs: Vec<JobId>) -> Self {
        Dependency::on(jobs)
    }
}

impl From<&AsyncResult> for Dependency {
    fn from(ar: &AsyncResult) -> Self {
        Dependency::on(vec![ar.job_id()])
    }
}

impl From<&[&AsyncResult]> for Dependency {
    fn from(ars: &[&AsyncResult]) -> Self {
        Dependency::on(ars.iter().map(|ar| ar.job_id()).collect())
    }
}
