//! The engine process: `starlingd engine` hosts N engines on one node, each with its kernel.
//!
//! [`run`] starts the kernels while it connects to the controller, registers them (the
//! controller hands out engine ids), then routes each [`Assignment`] to its engine's slot. A
//! slot runs its tasks in order, consecutive Python tasks as one batch per kernel round trip,
//! and sends results back as they finish. A kernel that dies is reported as that task's error
//! and replaced; the engine keeps its id. When the controller goes away, the process exits and
//! its kernels with it.

pub mod kernel;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::proto::auth::{Key, Role};
use crate::proto::conn::{self, PeerStream};
use crate::proto::{
    Assignment, ControllerToEngine, EngineId, EngineToController, Outcome, ProtoError, RemoteError,
    TaskResult, Work,
};
use kernel::{KernelReply, PythonKernel};

/// How long an engine keeps trying to reach its controller before it gives up: long enough for
/// a controller that is still starting on a slow node.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// Pause between attempts to reach the controller.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

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
    /// Engines in this process.
    pub engines: u32,
    /// The Python interpreter for kernels.
    pub python: String,
    /// Working directory of kernels and shell tasks.
    pub workdir: PathBuf,
    /// Where kernels' own stdout/stderr go (what user code writes outside a task's capture).
    pub log: Option<PathBuf>,
    pub max_frame: usize,
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
    #[error("kernel: {0}")]
    Kernel(#[from] kernel::KernelError),
    #[error("the controller answered the registration with something else")]
    NotRegistered,
}

type Conn = conn::Conn<PeerStream, ControllerToEngine, EngineToController>;

async fn connect(config: &EngineConfig) -> Result<Conn, EngineError> {
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
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
                    secs: CONNECT_DEADLINE.as_secs(),
                    last: e,
                })
            }
            Err(e) => {
                tracing::debug!("controller not reachable yet: {e}");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    }
}

/// Runs the engine process until the controller says stop or goes away.
pub async fn run(config: EngineConfig) -> Result<(), EngineError> {
    let n = config.engines.max(1) as usize;
    let spawn_all = futures::future::join_all(
        (0..n).map(|_| PythonKernel::spawn(&config.python, &config.workdir, config.log.as_deref())),
    );
    let (kernels, conn) = tokio::join!(spawn_all, connect(&config));
    let mut conn = conn?;
    let kernels = kernels.into_iter().collect::<Result<Vec<_>, _>>()?;
    conn.send(&EngineToController::Register {
        node: config.node.clone(),
        host: config.host.clone(),
        kernel_pids: kernels.iter().map(|k| k.pid).collect(),
    })
    .await?;
    let (ids, heartbeat) = match conn.recv().await? {
        Some(ControllerToEngine::Registered { ids, heartbeat_ms }) => {
            (ids, Duration::from_millis(heartbeat_ms.max(10)))
        }
        _ => return Err(EngineError::NotRegistered),
    };
    tracing::info!(engines = %crate::proto::format_ids(&ids), "registered");

    let (mut reader, writer) = conn.split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<EngineToController>();
    let pump = tokio::spawn(writer.pump(out_rx));

    let mut slots: HashMap<EngineId, mpsc::UnboundedSender<Vec<Assignment>>> = HashMap::new();
    let mut slot_tasks = Vec::new();
    for (id, kernel) in ids.iter().copied().zip(kernels) {
        let (tx, rx) = mpsc::unbounded_channel();
        slots.insert(id, tx);
        let slot = Slot {
            id,
            kernel: Some(kernel),
            config: config.clone(),
            out: out_tx.clone(),
        };
        slot_tasks.push(tokio::spawn(slot.run(rx)));
    }

    let beat = out_tx.clone();
    let heart = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tick.tick().await;
            if beat.send(EngineToController::Heartbeat).is_err() {
                break;
            }
        }
    });

    let why = loop {
        match reader.recv().await {
            Ok(Some(ControllerToEngine::Run(batch))) => {
                let mut per_slot: HashMap<EngineId, Vec<Assignment>> = HashMap::new();
                for a in batch {
                    per_slot.entry(a.engine).or_default().push(a);
                }
                for (id, tasks) in per_slot {
                    match slots.get(&id) {
                        Some(tx) => {
                            let _ = tx.send(tasks);
                        }
                        None => {
                            tracing::warn!(engine = %id, "work for an engine this process does not host");
                        }
                    }
                }
            }
            Ok(Some(ControllerToEngine::Shutdown)) => {
                break "the controller asked this engine to stop".to_string()
            }
            Ok(Some(ControllerToEngine::Registered { .. })) => {
                tracing::warn!("registered twice; ignored");
            }
            Ok(None) => break "the controller closed the connection".to_string(),
            Err(e) => break format!("the connection to the controller failed: {e}"),
        }
    };
    tracing::info!("stopping: {why}");
    heart.abort();
    drop(slots);
    for t in slot_tasks {
        t.abort();
    }
    drop(out_tx);
    pump.abort();
    Ok(())
}

/// One engine: its id, its kernel, the way out.
struct Slot {
    id: EngineId,
    kernel: Option<PythonKernel>,
    config: EngineConfig,
    out: mpsc::UnboundedSender<EngineToController>,
}

impl Slot {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<Assignment>>) {
        self.init_kernel().await;
        while let Some(mut tasks) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                tasks.extend(more);
            }
            let mut rest = &tasks[..];
            while !rest.is_empty() {
                let python = rest
                    .iter()
                    .take_while(|a| !matches!(a.work, Work::Shell { .. }))
                    .count();
                if python > 0 {
                    let (batch, tail) = rest.split_at(python);
                    self.run_python(batch).await;
                    rest = tail;
                } else {
                    let a = &rest[0];
                    if let Work::Shell { command } = &a.work {
                        let reply = kernel::run_shell(command, self.id, &self.config.workdir).await;
                        self.send(vec![self.result(a, reply)]);
                    }
                    rest = &rest[1..];
                }
            }
        }
    }

    fn send(&self, results: Vec<TaskResult>) {
        let _ = self.out.send(EngineToController::Done(results));
    }

    fn result(&self, a: &Assignment, r: KernelReply) -> TaskResult {
        TaskResult {
            task: a.task,
            engine: self.id,
            outcome: r.outcome,
            stdout: r.stdout,
            stderr: r.stderr,
            execution_count: r.execution_count,
            started: r.started,
            completed: r.completed,
        }
    }

    fn failure(&self, a: &Assignment, ename: &str, evalue: String) -> TaskResult {
        let now = crate::proto::now_micros();
        TaskResult {
            task: a.task,
            engine: self.id,
            outcome: Outcome::Err(RemoteError {
                ename: ename.into(),
                evalue,
                traceback: String::new(),
            }),
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            started: now,
            completed: now,
        }
    }

    /// Tells a fresh kernel which engine it is.
    async fn init_kernel(&mut self) {
        if let Some(k) = &mut self.kernel {
            let out = k.run(&[json!({"op": "init", "engine": self.id.0})]).await;
            if let Some(why) = out.died {
                tracing::error!(engine = %self.id, "the kernel {why} while starting");
                self.kernel = None;
            }
        }
    }

    async fn replace_kernel(&mut self, reason: &str) -> Result<(), String> {
        self.kernel = None;
        match PythonKernel::spawn(
            &self.config.python,
            &self.config.workdir,
            self.config.log.as_deref(),
        )
        .await
        {
            Ok(k) => {
                let pid = k.pid;
                self.kernel = Some(k);
                self.init_kernel().await;
                tracing::warn!(engine = %self.id, pid, "kernel replaced: {reason}");
                let _ = self.out.send(EngineToController::KernelRestarted {
                    engine: self.id,
                    pid,
                    reason: reason.to_string(),
                });
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn run_python(&mut self, mut batch: &[Assignment]) {
        while !batch.is_empty() {
            if self.kernel.is_none() {
                if let Err(e) = self
                    .replace_kernel("the previous kernel could not be used")
                    .await
                {
                    let failed = batch
                        .iter()
                        .map(|a| {
                            self.failure(
                                a,
                                "KernelUnavailable",
                                format!("engine {} has no kernel: {e}", self.id),
                            )
                        })
                        .collect();
                    self.send(failed);
                    return;
                }
            }
            let kernel = self.kernel.as_mut().expect("a kernel was just ensured");
            let requests: Vec<serde_json::Value> = batch
                .iter()
                .map(|a| match &a.work {
                    Work::Execute { code } => json!({"op": "execute", "code": code}),
                    Work::Apply { func, args } => json!({
                        "op": "apply",
                        "func": func,
                        "args": args.iter().map(crate::proto::Value::to_kernel_json).collect::<Vec<_>>(),
                    }),
                    Work::Shell { .. } => unreachable!("shell tasks never reach the kernel"),
                })
                .collect();
            let outcome = kernel.run(&requests).await;
            let done = outcome.replies.len();
            let mut results: Vec<TaskResult> = batch
                .iter()
                .zip(outcome.replies)
                .map(|(a, r)| self.result(a, r))
                .collect();
            match outcome.died {
                None => {
                    self.send(results);
                    return;
                }
                Some(why) => {
                    let killer = &batch[done];
                    let reason = format!("the kernel of engine {} {why} while running this task; a new kernel (with an empty namespace) replaces it", self.id);
                    results.push(self.failure(killer, "KernelDied", reason.clone()));
                    self.send(results);
                    batch = &batch[done + 1..];
                    if let Err(e) = self.replace_kernel(&reason).await {
                        let failed = batch
                            .iter()
                            .map(|a| {
                                self.failure(
                                    a,
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
