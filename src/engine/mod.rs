//! Engines: `starlingd engine` on a node is a [`supervisor`] that keeps one engine process per
//! engine running; each engine process runs [`run`].
//!
//! [`run`] starts the kernels while it connects to the controller, registers them by their
//! slot on the node (the controller hands out engine ids, the same ones again to an engine
//! that comes back), then routes each [`Assignment`] to its engine's slot. A slot runs its
//! tasks in order, consecutive Python tasks as one batch per kernel round trip, and sends
//! results back as they finish. A kernel that dies is reported as that task's error and
//! replaced; the engine keeps its id. When the connection to the controller is lost, the engine
//! keeps its kernels and reconnects with backoff (for `reconnect_s`); when the controller says
//! stop, it exits and its kernels with it.

pub mod kernel;
pub mod mpi;
pub mod supervisor;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::proto::auth::{Key, Role};
use crate::proto::conn::{self, PeerStream};
use crate::proto::{
    Assignment, ControllerToEngine, EngineId, EngineSlot, EngineToController, Func, JobId, Mapper,
    Outcome, ProtoError, RemoteError, TaskId, TaskOutput, TaskResult, Value, Work,
};
use kernel::{Batch, Control, KernelFrame, KernelReply, PythonKernel, StreamedOutput};

/// How long a task that was cancelled while running has, after its interrupt, to stop before
/// its kernel is killed (and replaced, with an empty namespace).
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// How long an engine keeps trying to reach its controller when it starts: long enough for a
/// controller that is still starting on a slow node.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// First pause between attempts to reach the controller; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Exit status of an engine process that gave up reaching its controller: its node does not
/// restart it.
pub const EXIT_GAVE_UP: u8 = 3;
/// Exit status of an engine process that cannot start (its Python cannot run): restarting it
/// would not help.
pub const EXIT_CANNOT_START: u8 = 4;

fn default_reconnect() -> u64 {
    600
}

/// What `starlingd engine` reads from its config file (mode 0600: it holds the engine key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub cluster: String,
    /// `host:port` of the controller.
    pub controller: String,
    pub cert_pem: String,
    pub engine_key: Key,
    /// The node's name, as the provider knows it.
    pub node: String,
    /// The address this node is known by, reported in `status`.
    pub host: String,
    /// Engines on this node, each in a process of its own.
    pub engines: u32,
    /// The Python interpreter for kernels.
    pub python: String,
    /// Working directory of kernels and shell tasks.
    pub workdir: PathBuf,
    /// Where kernels' own stdout/stderr go (what user code writes outside a task's capture).
    pub log: Option<PathBuf>,
    pub max_frame: usize,
    /// How long an engine that lost its controller keeps trying to reach it again (s).
    #[serde(default = "default_reconnect")]
    pub reconnect_s: u64,
    /// On an MPI cluster: the kernels are MPI ranks that attach to their engines.
    #[serde(default)]
    pub mpi: Option<mpi::NodeMpi>,
}

/// Why an engine process stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the controller at {addr} within {secs} s: {last}")]
    Unreachable {
        addr: String,
        secs: u64,
        last: ProtoError,
    },
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("cannot start: {0}")]
    CannotStart(String),
}

impl EngineError {
    /// The process exit status that tells the node's supervisor whether to start it again.
    pub fn exit_status(&self) -> u8 {
        match self {
            EngineError::Unreachable { .. } => EXIT_GAVE_UP,
            // A refused key or protocol version will not get better by restarting either.
            EngineError::CannotStart(_) | EngineError::Proto(ProtoError::Refused(_)) => {
                EXIT_CANNOT_START
            }
            EngineError::Proto(_) => 1,
        }
    }
}

type Conn = conn::Conn<PeerStream, ControllerToEngine, EngineToController>;

/// Connects to the controller, retrying with backoff for up to `within`.
async fn connect(config: &EngineConfig, within: Duration) -> Result<Conn, EngineError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = RETRY_FIRST;
    loop {
        match conn::connect(
            &config.controller,
            &config.cert_pem,
            Role::Engine,
            &config.engine_key,
            config.max_frame,
        )
        .await
        {
            Ok(c) => return Ok(c),
            // A rejected key or version will not get better by retrying.
            Err(e @ ProtoError::Refused(_)) => return Err(e.into()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(EngineError::Unreachable {
                    addr: config.controller.clone(),
                    secs: within.as_secs(),
                    last: e,
                })
            }
            Err(e) => {
                tracing::debug!("controller not reachable yet: {e}");
                tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Tells the controller that the engines of `slots` cannot start, and why, so that `up` fails
/// at once with the reason instead of waiting for them.
async fn send_cannot_start(conn: &mut Conn, config: &EngineConfig, slots: &[u32], reason: &str) {
    for slot in slots {
        let _ = conn
            .send(&EngineToController::CannotStart {
                node: config.node.clone(),
                host: config.host.clone(),
                slot: *slot,
                reason: reason.to_string(),
            })
            .await;
    }
}

/// [`send_cannot_start`] on a connection of its own, for a node that starts no engine process.
pub async fn report_cannot_start(config: &EngineConfig, slots: &[u32], reason: &str) {
    if let Ok(mut conn) = connect(config, CONNECT_DEADLINE).await {
        send_cannot_start(&mut conn, config, slots, reason).await;
    }
}

/// Runs the engines of `slots` (which engines of the node they are) in this process until the
/// controller says stop. When the connection to the controller is lost, they keep their
/// kernels (and namespaces) and reconnect with backoff for `reconnect_s`; the controller gives
/// them back their ids. Work handed out before the loss is dropped here, since the controller
/// has given up on it.
pub async fn run(config: EngineConfig, slots: Vec<u32>) -> Result<(), EngineError> {
    let sources = slots
        .iter()
        .map(|slot| KernelSource::new(&config, *slot))
        .collect::<Result<Vec<_>, _>>()?;
    let spawn_all =
        futures::future::join_all(sources.iter().map(|source| source.start(&config, true)));
    let (kernels, conn) = if config.mpi.is_some() {
        // An MPI rank may take minutes to come (the world starts once every node is set up):
        // a connection made meanwhile would sit silent, and the controller drops silent ones.
        let kernels = spawn_all.await;
        (kernels, connect(&config, CONNECT_DEADLINE).await)
    } else {
        tokio::join!(spawn_all, connect(&config, CONNECT_DEADLINE))
    };
    let kernels = match kernels.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(k) => k,
        Err(e) => {
            let reason = e.to_string();
            if let Ok(mut conn) = conn {
                send_cannot_start(&mut conn, &config, &slots, &reason).await;
            }
            return Err(EngineError::CannotStart(reason));
        }
    };
    let mut conn = Some(conn?);

    // Frames go out pre-encoded, so results can be fitted to the frame limit before they
    // leave. The queue outlives connections; each connection's writer borrows it.
    let (out_tx, out_rx) = mpsc::unbounded_channel::<conn::Frame>();
    let out_rx = Arc::new(tokio::sync::Mutex::new(out_rx));
    let epoch = Arc::new(AtomicU64::new(0));

    let mut slot_txs: Vec<mpsc::UnboundedSender<SlotMsg>> = Vec::new();
    let mut slot_tasks = Vec::new();
    // Each slot's kernel pid (and MPI rank), kept current when a kernel is replaced: what
    // registering again reports.
    let kernel_pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut shares = Vec::new();
    for (index, (kernel, source)) in kernels.into_iter().zip(sources).enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        slot_txs.push(tx);
        kernel_pids
            .lock()
            .expect("not poisoned")
            .push((kernel.pid, kernel.rank));
        let shared = Arc::new(SlotShared::default());
        shared.set_kernel(Some(&kernel));
        shares.push(shared.clone());
        let slot = Slot {
            shared,
            index,
            kernel_pids: kernel_pids.clone(),
            id: EngineId(0),
            kernel: Some(kernel),
            source,
            world_since: None,
            known: HashSet::new(),
            forget: Vec::new(),
            config: config.clone(),
            out: out_tx.clone(),
            epoch: epoch.clone(),
            batch_epoch: 0,
        };
        slot_tasks.push(tokio::spawn(slot.run(rx)));
    }

    // A connection that fails as soon as it is made (another process serving the same slot,
    // say) is not tried again at once.
    let mut pause = RETRY_FIRST;
    let result = loop {
        let c = match conn.take() {
            Some(c) => c,
            None => match connect(&config, Duration::from_secs(config.reconnect_s)).await {
                Ok(c) => c,
                Err(e) => break Err(e),
            },
        };
        let connected = tokio::time::Instant::now();
        let current = epoch.load(Ordering::SeqCst);
        match serve(
            &config,
            c,
            &slots,
            &kernel_pids,
            &slot_txs,
            &shares,
            current,
            &out_tx,
            &out_rx,
        )
        .await
        {
            Ok(()) => break Ok(()),
            Err(why) => {
                // Whatever was handed out or produced on that connection is the controller's
                // past: it has failed or moved it.
                epoch.fetch_add(1, Ordering::SeqCst);
                let mut rx = out_rx.lock().await;
                while rx.try_recv().is_ok() {}
                tracing::warn!("{why}; reconnecting for up to {} s", config.reconnect_s);
                if connected.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                } else {
                    pause = RETRY_FIRST;
                }
            }
        }
    };
    drop(slot_txs);
    for t in slot_tasks {
        t.abort();
    }
    result
}

/// One connection's life: registers, then routes work to the slots until the controller says
/// stop (`Ok`) or the connection is lost (`Err` with the reason).
#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &EngineConfig,
    mut conn: Conn,
    slots: &[u32],
    kernel_pids: &KernelPids,
    slot_txs: &[mpsc::UnboundedSender<SlotMsg>],
    shares: &[Arc<SlotShared>],
    epoch: u64,
    out_tx: &mpsc::UnboundedSender<conn::Frame>,
    out_rx: &Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<conn::Frame>>>,
) -> Result<(), String> {
    let register = EngineToController::Register {
        node: config.node.clone(),
        host: config.host.clone(),
        pid: std::process::id(),
        engines: slots
            .iter()
            .zip(kernel_pids.lock().expect("not poisoned").iter())
            .map(|(slot, (pid, rank))| EngineSlot {
                slot: *slot,
                kernel_pid: *pid,
                rank: *rank,
            })
            .collect(),
    };
    let lost = |e: ProtoError| format!("the connection to the controller failed: {e}");
    conn.send(&register).await.map_err(lost)?;
    let (ids, heartbeat) = match conn.recv().await.map_err(lost)? {
        Some(ControllerToEngine::Registered { ids, heartbeat_ms }) => {
            (ids, Duration::from_millis(heartbeat_ms.max(10)))
        }
        Some(_) => {
            return Err("the controller answered the registration with something else".into())
        }
        None => return Err("the controller closed the connection while registering".into()),
    };
    tracing::info!(engines = %crate::proto::format_ids(&ids), "registered");
    let mut by_id: HashMap<EngineId, &mpsc::UnboundedSender<SlotMsg>> = HashMap::new();
    let mut share_of: HashMap<EngineId, &Arc<SlotShared>> = HashMap::new();
    for ((id, tx), share) in ids.iter().zip(slot_txs).zip(shares) {
        let _ = tx.send(SlotMsg::Registered(*id));
        by_id.insert(*id, tx);
        share_of.insert(*id, share);
    }

    let (mut reader, writer) = conn.split();
    let rx = out_rx.clone();
    let mut pump = tokio::spawn(async move {
        let mut rx = rx.lock().await;
        writer.pump_frames(&mut rx, &conn::Backlog::default()).await
    });
    let beat = out_tx.clone();
    let heart = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tick.tick().await;
            if beat
                .send(conn::encode(&EngineToController::Heartbeat))
                .is_err()
            {
                break;
            }
        }
    });
    let _stop_heart = AbortOnDrop(heart);

    let mut mappers: HashMap<JobId, Arc<Mapper>> = HashMap::new();
    let mut pump_done = false;
    let outcome = loop {
        let msg = tokio::select! {
            m = reader.recv() => m,
            sent = &mut pump => {
                pump_done = true;
                break Err(match sent {
                    Ok(Err(e)) => format!("sending to the controller failed: {e}"),
                    _ => "the writer to the controller stopped".to_string(),
                });
            }
        };
        match msg {
            Ok(Some(ControllerToEngine::Forget(jobs))) => {
                for job in &jobs {
                    mappers.remove(job);
                }
                for tx in slot_txs {
                    let _ = tx.send(SlotMsg::Forget(jobs.clone()));
                }
            }
            Ok(Some(ControllerToEngine::Run { defs, tasks })) => {
                for (job, mapper) in defs {
                    mappers.insert(job, Arc::new(mapper));
                }
                let mut per_slot: HashMap<EngineId, Vec<Task>> = HashMap::new();
                // One clock read per frame: when its tasks reached this engine process.
                let arrived = std::time::Instant::now();
                for a in tasks {
                    let mapper = match &a.work {
                        Work::MapChunk { job, .. } => mappers.get(job).cloned(),
                        _ => None,
                    };
                    per_slot.entry(a.engine).or_default().push(Task {
                        a,
                        mapper,
                        epoch,
                        arrived,
                    });
                }
                for (id, tasks) in per_slot {
                    match by_id.get(&id) {
                        Some(tx) => {
                            let _ = tx.send(SlotMsg::Tasks(tasks));
                        }
                        None => {
                            tracing::warn!(engine = %id, "work for an engine this process does not host");
                        }
                    }
                }
            }
            Ok(Some(ControllerToEngine::Cancel(tasks))) => {
                let mut per_engine: HashMap<EngineId, Vec<u64>> = HashMap::new();
                for (engine, task) in tasks {
                    per_engine.entry(engine).or_default().push(task.0);
                }
                for (engine, tasks) in per_engine {
                    if let Some(share) = share_of.get(&engine) {
                        share.cancel(&tasks);
                    }
                }
            }
            Ok(Some(ControllerToEngine::Interrupt(engines))) => {
                for engine in engines {
                    if let Some(kernel) = share_of.get(&engine).and_then(|s| s.kernel()) {
                        kernel.cancel(&[kernel::INTERRUPT_ANY]);
                    }
                }
            }
            Ok(Some(ControllerToEngine::Shutdown)) => {
                tracing::info!("stopping: the controller asked this engine to stop");
                break Ok(());
            }
            Ok(Some(ControllerToEngine::Registered { .. })) => {
                tracing::warn!("registered twice; ignored");
            }
            Ok(None) => break Err("the controller closed the connection".to_string()),
            Err(e) => break Err(format!("the connection to the controller failed: {e}")),
        }
    };
    if !pump_done {
        // The writer lets go of the queue once it has stopped.
        pump.abort();
        let _ = pump.await;
    }
    outcome
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a slot is told.
enum SlotMsg {
    /// The id the controller gave this engine on the current connection.
    Registered(EngineId),
    Tasks(Vec<Task>),
    /// Finished map jobs whose functions the kernel can drop.
    Forget(Vec<JobId>),
}

/// A task and, for a map chunk, its job's mapper.
struct Task {
    a: Assignment,
    mapper: Option<Arc<Mapper>>,
    /// The connection it came on: work from an earlier one is the controller's past.
    epoch: u64,
    /// When it reached this engine process.
    arrived: std::time::Instant,
}

impl Task {
    /// Whether the Python kernel runs it (else the engine runs it with bash).
    fn in_kernel(&self) -> bool {
        match &self.a.work {
            Work::Shell { .. } => false,
            Work::MapChunk { .. } => !matches!(self.mapper.as_deref(), Some(Mapper::Shell(_))),
            _ => true,
        }
    }

    fn items(&self) -> Option<usize> {
        match &self.a.work {
            Work::MapChunk { items, .. } => Some(items.len()),
            _ => None,
        }
    }
}

/// What the connection side knows of a slot, to cancel and interrupt its tasks while the slot
/// is busy running them.
#[derive(Default)]
struct SlotShared {
    /// The task the kernel runs now, plus one (0: none).
    running: AtomicU64,
    /// Tasks not to run.
    cancelled: std::sync::Mutex<HashSet<u64>>,
    /// The current kernel's control pipe.
    kernel: std::sync::Mutex<Option<Arc<Control>>>,
}

impl SlotShared {
    fn set_kernel(&self, kernel: Option<&PythonKernel>) {
        *self.kernel.lock().expect("not poisoned") = kernel.map(|k| k.control.clone());
    }

    fn kernel(&self) -> Option<Arc<Control>> {
        self.kernel.lock().expect("not poisoned").clone()
    }

    /// Drops tasks before they start, or interrupts the one that runs now: the kernel gets
    /// [`INTERRUPT_GRACE`] to stop it, else it is killed (and the slot replaces it).
    fn cancel(self: &Arc<Self>, tasks: &[u64]) {
        self.cancelled
            .lock()
            .expect("not poisoned")
            .extend(tasks.iter().copied());
        let Some(kernel) = self.kernel() else { return };
        let now = self.running.load(Ordering::SeqCst);
        kernel.cancel(tasks);
        if let Some(&task) = tasks.iter().find(|t| **t + 1 == now) {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(INTERRUPT_GRACE).await;
                let same_kernel = me.kernel().is_some_and(|k| Arc::ptr_eq(&k, &kernel));
                if same_kernel && me.running.load(Ordering::SeqCst) == task + 1 {
                    tracing::warn!(
                        task,
                        "the task did not stop when interrupted; killing its kernel"
                    );
                    kernel.signal(nix::sys::signal::Signal::SIGKILL);
                }
            });
        }
    }
}

/// Each slot's kernel pid and, on an MPI cluster, its rank.
type KernelPids = std::sync::Mutex<Vec<(u32, Option<u32>)>>;

/// Where a slot's kernels come from: started by the engine, or, on an MPI cluster, the rank
/// of the world that attaches to the slot's socket.
enum KernelSource {
    Spawn,
    Attach { listener: tokio::net::UnixListener },
}

impl KernelSource {
    /// Binds the slot's socket on an MPI cluster (replacing what a previous engine process
    /// left there).
    fn new(config: &EngineConfig, slot: u32) -> Result<Self, EngineError> {
        let Some(m) = &config.mpi else {
            return Ok(Self::Spawn);
        };
        let path = m.socket(slot);
        let cannot = |e: std::io::Error| {
            EngineError::CannotStart(format!(
                "cannot listen for its MPI kernel at {}: {e}",
                path.display()
            ))
        };
        crate::home::create_private_dir(&m.run_dir).map_err(cannot)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cannot(e)),
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(cannot)?;
        Ok(Self::Attach { listener })
    }

    /// A kernel: a new one, or the next rank of the world (`first`: the engine's first).
    async fn start(
        &self,
        config: &EngineConfig,
        first: bool,
    ) -> Result<PythonKernel, kernel::KernelError> {
        match self {
            Self::Spawn => {
                PythonKernel::spawn(
                    &config.python,
                    &config.workdir,
                    config.log.as_deref(),
                    config.max_frame,
                )
                .await
            }
            Self::Attach { listener } => {
                let wait = if first {
                    mpi::FIRST_ATTACH_TIMEOUT
                } else {
                    mpi::ATTACH_TIMEOUT
                };
                PythonKernel::attach(listener, wait, config.max_frame).await
            }
        }
    }
}

/// One engine: its id, its kernel, the way out.
struct Slot {
    /// Shared with the connection side, for cancelling.
    shared: Arc<SlotShared>,
    id: EngineId,
    kernel: Option<PythonKernel>,
    /// Where its kernels come from.
    source: KernelSource,
    /// When its MPI kernel was last replaced by a rank of a new world: Python tasks that
    /// reached the engine before then were meant for the old world.
    world_since: Option<std::time::Instant>,
    /// Map jobs whose function the current kernel has compiled.
    known: HashSet<JobId>,
    /// Finished jobs the kernel is to drop with its next request.
    forget: Vec<u64>,
    config: EngineConfig,
    out: mpsc::UnboundedSender<conn::Frame>,
    /// Which of its process's engines it is, and every engine's kernel pid.
    index: usize,
    kernel_pids: Arc<KernelPids>,
    /// The current connection: results of work from an earlier one are dropped.
    epoch: Arc<AtomicU64>,
    /// The connection the work in hand came on.
    batch_epoch: u64,
}

fn func_json(f: &Func, frame: &mut KernelFrame) -> serde_json::Value {
    match f {
        Func::Expr(e) => json!({ "expr": e }),
        Func::Module {
            module,
            source,
            attr,
        } => json!({ "module": module, "source": source, "attr": attr }),
        Func::Pickle {
            bytes,
            buffers,
            python,
        } => {
            let refs: Vec<usize> = std::iter::once(bytes)
                .chain(buffers)
                .map(|b| frame.add_buffer(b.clone()))
                .collect();
            json!({ "pickle": refs, "python": python })
        }
    }
}

fn values_json(values: &[Value], frame: &mut KernelFrame) -> Vec<serde_json::Value> {
    values.iter().map(|v| frame.value(v)).collect()
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Slot {
    /// Runs what arrives; the first message is always `Registered`, which initialises the
    /// kernel with its engine id.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SlotMsg>) {
        loop {
            // An MPI kernel ends with its world, also while idle: the slot takes the new
            // world's rank at once, so work sent after the restart finds it there.
            let next = match (&self.source, &mut self.kernel) {
                (KernelSource::Attach { .. }, Some(kernel)) => tokio::select! {
                    msg = rx.recv() => Ok(msg),
                    why = kernel.ended() => Err(why),
                },
                _ => Ok(rx.recv().await),
            };
            let first = match next {
                Ok(Some(first)) => first,
                Ok(None) => break,
                Err(why) => {
                    let reason = format!("the kernel of engine {} {why}", self.id);
                    if let Err(e) = self.replace_kernel(&reason).await {
                        tracing::error!(engine = %self.id, "{e}");
                    }
                    continue;
                }
            };
            let mut tasks = Vec::new();
            for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    SlotMsg::Registered(id) => {
                        // The kernel learns its id (and, since a controller that restarted
                        // may reuse job ids, forgets which functions it was sent).
                        self.id = id;
                        self.init_kernel().await;
                    }
                    SlotMsg::Tasks(more) => tasks.extend(more),
                    SlotMsg::Forget(jobs) => {
                        for job in jobs {
                            if self.known.remove(&job) {
                                self.forget.push(job.0);
                            }
                        }
                    }
                }
            }
            self.batch_epoch = self.epoch.load(Ordering::SeqCst);
            tasks.retain(|t| t.epoch == self.batch_epoch);
            let mut rest = &tasks[..];
            while !rest.is_empty() {
                let python = rest.iter().take_while(|t| t.in_kernel()).count();
                if python > 0 {
                    let (batch, tail) = rest.split_at(python);
                    self.run_python(batch).await;
                    rest = tail;
                } else {
                    let result = self.run_shell(&rest[0]).await;
                    self.send(vec![result]);
                    rest = &rest[1..];
                }
            }
        }
    }

    async fn run_shell(&self, t: &Task) -> TaskResult {
        match (&t.a.work, t.mapper.as_deref()) {
            (Work::Shell { command }, _) => {
                let reply = kernel::run_shell(command, self.id, &self.config.workdir).await;
                self.result(&t.a, reply)
            }
            (Work::MapChunk { items, .. }, Some(Mapper::Shell(template))) => {
                let started = crate::proto::now_micros();
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    let text = match item {
                        Value::Json(serde_json::Value::String(s)) => s.clone(),
                        other => other
                            .as_json()
                            .map_or_else(|| other.to_python_repr(), ToString::to_string),
                    };
                    let command = template.replace("{}", &shell_quote(&text));
                    let reply = kernel::run_shell(&command, self.id, &self.config.workdir).await;
                    outcomes.push(match reply.outcome {
                        Outcome::Ok { .. } => {
                            let out = reply.stdout.strip_suffix('\n').unwrap_or(&reply.stdout);
                            Ok(Value::Json(out.into()))
                        }
                        Outcome::Err(mut e) => {
                            let err = reply.stderr.trim_end();
                            if !err.is_empty() {
                                e.traceback = err.to_string();
                            }
                            Err(e)
                        }
                        Outcome::Items(_) => unreachable!("a shell command has one outcome"),
                    });
                }
                let reply = KernelReply {
                    outcome: Outcome::Items(outcomes),
                    stdout: String::new(),
                    stderr: String::new(),
                    execution_count: 0,
                    started,
                    completed: crate::proto::now_micros(),
                };
                self.result(&t.a, reply)
            }
            _ => self.failure(
                t,
                "EngineError",
                "a map chunk arrived without its function; this is a bug".into(),
            ),
        }
    }

    fn send(&self, results: Vec<TaskResult>) {
        if self.epoch.load(Ordering::SeqCst) != self.batch_epoch {
            return;
        }
        let done = EngineToController::Done(results);
        for frame in crate::proto::encode_results(done, self.config.max_frame) {
            let _ = self.out.send(frame);
        }
    }

    /// Passes on what a running task wrote (see [`EngineToController::Output`]).
    fn send_output(&self, out: StreamedOutput) {
        if self.epoch.load(Ordering::SeqCst) != self.batch_epoch {
            return;
        }
        let frame = conn::encode(&EngineToController::Output(TaskOutput {
            job: JobId(0),
            task: TaskId(out.task),
            engine: self.id,
            stdout: out.stdout,
            stderr: out.stderr,
        }));
        // The kernel sends small pieces; one over the limit is left out rather than cost the
        // connection (the task's result carries all of its output).
        if frame.len() <= self.config.max_frame {
            let _ = self.out.send(frame);
        }
    }

    fn result(&self, a: &Assignment, r: KernelReply) -> TaskResult {
        let outcome = match (&a.work, r.outcome) {
            // A map chunk whose function could not even be made fails item by item.
            (Work::MapChunk { items, .. }, Outcome::Err(e)) => {
                Outcome::Items(vec![Err(e); items.len()])
            }
            (_, o) => o,
        };
        TaskResult {
            task: a.task,
            engine: self.id,
            first: a.first,
            outcome,
            stdout: r.stdout,
            stderr: r.stderr,
            execution_count: r.execution_count,
            started: r.started,
            completed: r.completed,
            attempts: 1,
        }
    }

    fn failure(&self, t: &Task, ename: &str, evalue: String) -> TaskResult {
        let now = crate::proto::now_micros();
        let error = Box::new(RemoteError {
            ename: ename.into(),
            evalue,
            traceback: String::new(),
        });
        let outcome = match t.items() {
            Some(n) => Outcome::Items(vec![Err(error); n]),
            None => Outcome::Err(error),
        };
        TaskResult::bare(t.a.task, self.id, t.a.first, outcome, now)
    }

    /// Why a task sent while this engine's MPI world was restarting did not run.
    fn world_restart_reason(&self) -> String {
        format!(
            "it reached engine {} while its MPI world was ending and starting again (a rank had ended); run it again",
            self.id
        )
    }

    /// Tells a fresh kernel which engine it is.
    async fn init_kernel(&mut self) {
        self.known.clear();
        if let Some(k) = &mut self.kernel {
            let init = Batch {
                frame: KernelFrame {
                    header: json!([{"op": "init", "id": 0, "engine": self.id.0, "max_frame": self.config.max_frame}]),
                    buffers: Vec::new(),
                },
                ids: vec![0],
            };
            let out = k.run(&init, |_| {}, |_| {}).await;
            if let Some(why) = out.died {
                tracing::error!(engine = %self.id, "the kernel {why} while starting");
                self.kernel = None;
            }
        }
    }

    async fn replace_kernel(&mut self, reason: &str) -> Result<(), String> {
        self.kernel = None;
        self.shared.set_kernel(None);
        match self.source.start(&self.config, false).await {
            Ok(k) => {
                if k.rank.is_some() {
                    self.world_since = Some(std::time::Instant::now());
                }
                let (pid, rank) = (k.pid, k.rank);
                self.kernel_pids.lock().expect("not poisoned")[self.index] = (pid, rank);
                self.shared.set_kernel(Some(&k));
                self.kernel = Some(k);
                self.init_kernel().await;
                tracing::warn!(engine = %self.id, pid, "kernel replaced: {reason}");
                let _ = self
                    .out
                    .send(conn::encode(&EngineToController::KernelRestarted {
                        engine: self.id,
                        pid,
                        reason: reason.to_string(),
                        rank,
                    }));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The kernel request for a task, its pickles moved into `frame`'s buffers; a map chunk
    /// carries its function the first time the kernel sees the job.
    fn request(&mut self, t: &Task, frame: &mut KernelFrame) -> serde_json::Value {
        let mut req = match &t.a.work {
            Work::Execute { code } => json!({"op": "execute", "code": code}),
            Work::Apply { func, args } => {
                json!({"op": "apply", "func": func_json(func, frame), "args": values_json(args, frame)})
            }
            Work::Push { values } => {
                let map: serde_json::Map<String, serde_json::Value> = values
                    .iter()
                    .map(|(k, v)| (k.clone(), frame.value(v)))
                    .collect();
                json!({"op": "push", "values": map})
            }
            Work::Scatter { name, items } => {
                json!({"op": "scatter", "name": name, "items": values_json(items, frame)})
            }
            Work::Pull { names } => json!({"op": "pull", "names": names}),
            Work::MapChunk { job, items } => {
                // The common case, items that are all JSON, travels as a plain list: no
                // per-item wrapping on either side.
                let plain: Option<Vec<serde_json::Value>> =
                    items.iter().map(|v| v.as_json().cloned()).collect();
                let mut req = match plain {
                    Some(list) => json!({"op": "map", "job": job.0, "plain": list}),
                    None => json!({"op": "map", "job": job.0, "items": values_json(items, frame)}),
                };
                let (func, star) = match t.mapper.as_deref() {
                    Some(Mapper::Python(func)) => (Some(func), false),
                    Some(Mapper::Star(func)) => (Some(func), true),
                    _ => (None, false),
                };
                if let Some(func) = func {
                    if self.known.insert(*job) {
                        req["func"] = func_json(func, frame);
                        req["star"] = json!(star);
                    }
                }
                req
            }
            Work::Shell { .. } => unreachable!("shell tasks never reach the kernel"),
        };
        req["id"] = json!(t.a.task.0);
        req
    }

    /// Takes out the tasks that were cancelled while they waited here (the controller has
    /// failed them already).
    fn not_cancelled<'t>(&self, tasks: impl IntoIterator<Item = &'t Task>) -> Vec<&'t Task> {
        let mut cancelled = self.shared.cancelled.lock().expect("not poisoned");
        tasks
            .into_iter()
            .filter(|t| !cancelled.remove(&t.a.task.0))
            .collect()
    }

    async fn run_python(&mut self, tasks: &[Task]) {
        let mut pending = self.not_cancelled(tasks);
        if let Some(since) = self.world_since {
            // Sent while the MPI world was ending and starting again: the other ranks' parts
            // ran on the old world or fail, and a rank of the new world alone would wait in a
            // collective for partners that never come.
            let (stale, fresh): (Vec<&Task>, Vec<&Task>) =
                pending.into_iter().partition(|t| t.arrived < since);
            pending = fresh;
            if !stale.is_empty() {
                let failed = stale
                    .iter()
                    .map(|t| self.failure(t, "KernelDied", self.world_restart_reason()))
                    .collect();
                self.send(failed);
            }
        }
        while !pending.is_empty() {
            let batch = &pending[..];
            if self.kernel.is_none() {
                if let Err(e) = self
                    .replace_kernel("the previous kernel could not be used")
                    .await
                {
                    let failed = batch
                        .iter()
                        .map(|t| {
                            self.failure(
                                t,
                                "KernelUnavailable",
                                format!("engine {} has no kernel: {e}", self.id),
                            )
                        })
                        .collect();
                    self.send(failed);
                    return;
                }
            }
            let mut frame = KernelFrame::default();
            let mut requests: Vec<serde_json::Value> =
                batch.iter().map(|t| self.request(t, &mut frame)).collect();
            if !self.forget.is_empty() {
                requests[0]["forget"] = json!(std::mem::take(&mut self.forget));
            }
            frame.header = serde_json::Value::Array(requests);
            let requests = Batch {
                frame,
                ids: batch.iter().map(|t| t.a.task.0).collect(),
            };
            let mut kernel = self.kernel.take().expect("a kernel was just ensured");
            let mut sent = 0;
            let running = |i: usize| batch.get(i).map_or(0, |t| t.a.task.0 + 1);
            self.shared.running.store(running(0), Ordering::SeqCst);
            let outcome = kernel
                .run(
                    &requests,
                    |replies| {
                        let results = batch[sent..]
                            .iter()
                            .zip(replies)
                            .map(|(t, r)| self.result(&t.a, r))
                            .collect::<Vec<_>>();
                        sent += results.len();
                        self.shared.running.store(running(sent), Ordering::SeqCst);
                        self.send(results);
                    },
                    |out| self.send_output(out),
                )
                .await;
            self.shared.running.store(0, Ordering::SeqCst);
            {
                let mut cancelled = self.shared.cancelled.lock().expect("not poisoned");
                for t in &batch[..outcome.done.min(batch.len())] {
                    cancelled.remove(&t.a.task.0);
                }
            }
            self.kernel = Some(kernel);
            let done = outcome.done;
            match outcome.died {
                None => return,
                Some(why) => {
                    let killer = &batch[done];
                    let reason = format!(
                        "the kernel of engine {} {why} while running this task; a new kernel (with an empty namespace) replaces it",
                        self.id
                    );
                    self.send(vec![self.failure(killer, "KernelDied", reason.clone())]);
                    self.shared
                        .cancelled
                        .lock()
                        .expect("not poisoned")
                        .remove(&killer.a.task.0);
                    // What was cancelled meanwhile does not go to the new kernel.
                    pending = self.not_cancelled(batch[done + 1..].iter().copied());
                    if matches!(self.source, KernelSource::Attach { .. }) {
                        // The rest was meant for the world that ended (see `run`).
                        let failed = pending
                            .iter()
                            .map(|t| self.failure(t, "KernelDied", self.world_restart_reason()))
                            .collect();
                        self.send(failed);
                        if let Err(e) = self.replace_kernel(&reason).await {
                            tracing::error!(engine = %self.id, "{e}");
                        }
                        return;
                    }
                    if let Err(e) = self.replace_kernel(&reason).await {
                        let failed = pending
                            .iter()
                            .map(|t| {
                                self.failure(
                                    t,
                                    "KernelUnavailable",
                                    format!("engine {} could not restart its kernel: {e}", self.id),
                                )
                            })
                            .collect();
                        self.send(failed);
                        return;
                    }
                }
            }
        }
    }
}
