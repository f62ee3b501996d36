//! The controller: registry of engines, heartbeats, scheduling, and the task store.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so `starlingd controller`,
//! the tests and embedders all call the same function. Each connection gets a reader task (TLS,
//! handshake, then frames → events) and a writer task (a queue → frames). One actor task owns
//! the [`state::State`] and turns events into `on_*` calls; everything it sends goes through
//! [`Wire`], the real [`state::Comm`].
//!
//! What a peer can make the controller hold is bounded: at most [`MAX_HANDSHAKES`] connections
//! wait for their handshake (another one arriving drops the one that has waited longest, so a
//! flood of idle sockets cannot shut clients out), and a client that does not read what it asked
//! for is cut off when more than [`client_backlog`] bytes still wait for it as its next message
//! comes.

pub mod state;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proto::auth::Key;
use crate::proto::conn::{self, Accepted, ServerKeys};
use crate::proto::tls::ClusterCert;
use crate::proto::{
    ClientRequest, ControllerToClient, ControllerToEngine, EngineId, EngineToController, JobId,
    JobInfo, JobOptions, JobSpec, ProtoError, Reply, TaskResult,
};
use state::{Comm, ConnId, State};
use store::{Read, Store, StoreOp};

/// Default heartbeat period: an engine is declared lost after missing two, so a dead node is
/// noticed within about 2.5 s, while a busy machine has plenty of slack.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// What `starlingd controller` reads from its config file (mode 0600: it holds the keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub cluster: String,
    /// Address to listen on, e.g. `127.0.0.1:0` or `0.0.0.0:7120`.
    pub listen: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub client_key: Key,
    pub engine_key: Key,
    /// The SQLite task store; `None` keeps no record (tests only).
    pub db: Option<PathBuf>,
    pub heartbeat_ms: u64,
    pub max_frame: usize,
    /// How many times a load-balanced task is handed out, at most, when engines running it
    /// are lost.
    #[serde(default = "default_attempts")]
    pub task_attempts: u32,
}

fn default_attempts() -> u32 {
    2
}

/// Completes when a connection's writer has sent everything queued and closed.
type Flushed = tokio::task::JoinHandle<Result<(), ProtoError>>;

/// How long a stopping controller waits for its last messages (shutdown orders, final replies)
/// to be written before it exits anyway.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(2);

/// How long the reply to a submitter that waits for the job's end may be held back (as long as
/// the controller keeps up), to travel with the results: a short job (an `apply_sync`) then
/// wakes its submitter once, not for the reply and again for each engine's result. A longer
/// job's reply goes out when this has passed, and its results as they come.
pub const HOLD: Duration = Duration::from_millis(5);

/// Connections that may wait for their handshake at once. A real peer finishes it in a few
/// milliseconds; this many is room for a whole cluster's engines reconnecting together.
pub const MAX_HANDSHAKES: usize = 256;
/// The first pause after a failed accept (out of file descriptors, say); it doubles up to
/// [`ACCEPT_PAUSE_MAX`] while accepting keeps failing.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// The most bytes that may wait to be sent to one client when another message for it comes:
/// two frames queued behind the one being written (which does not count). A client that lets
/// more pile up is not reading; it is cut off. (One message may be larger — a finished job's
/// results, in as many frames as they take — and is queued whole; what comes while it drains
/// may wait behind it.)
pub fn client_backlog(max_frame: usize) -> usize {
    2 * max_frame + conn::ENVELOPE_MARGIN
}

/// A client's queue: frames to its writer, and what waits in it.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<conn::Frame>,
    backlog: Arc<conn::Backlog>,
    /// The size of the last message queued whole above the limit, while it may still be
    /// draining: what comes meanwhile may wait behind it.
    oversized: Arc<std::sync::atomic::AtomicUsize>,
}

impl Outbox {
    /// Queues the frames of one message, unless more than `limit` bytes still wait from
    /// earlier ones (beyond a message larger than the limit that is still draining): then the
    /// connection is cut, and this says so (false).
    fn send(&self, conn: ConnId, frames: Vec<conn::Frame>, limit: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let waiting = self.backlog.queued();
        let oversized = self.oversized.load(Relaxed);
        if waiting > limit + oversized {
            tracing::warn!(
                ?conn,
                "a client does not read what it asked for ({} MiB wait for it); its connection is cut",
                waiting >> 20
            );
            self.backlog.cut();
            return false;
        }
        let size: usize = frames.iter().map(conn::Frame::len).sum();
        // Once the queue is back under the limit, the large message has drained.
        let still = if waiting <= limit { 0 } else { oversized };
        self.oversized
            .store(if size > limit { size } else { still }, Relaxed);
        for frame in frames {
            self.backlog.queue(frame.len());
            let _ = self.tx.send(frame);
        }
        true
    }
}

enum Event {
    ClientUp(ConnId, Outbox, Flushed),
    ClientRequest(ConnId, u64, ClientRequest),
    ClientGone(ConnId),
    EngineUp(ConnId, mpsc::UnboundedSender<conn::Frame>, Flushed),
    EngineMessage(ConnId, EngineToController),
    EngineGone(ConnId, String),
}

/// The real [`Comm`]: queues to connection writers, the task store.
struct Wire {
    /// Encoded frames to each client's writer: results are fitted to the frame limit here.
    clients: HashMap<ConnId, Outbox>,
    /// Encoded frames to each engine process's writer.
    engines: HashMap<ConnId, mpsc::UnboundedSender<conn::Frame>>,
    max_frame: usize,
    store: Option<Store>,
    /// The job ids asked of the store so far (see [`Comm::reserve_jobs`]).
    requested_jobs: u64,
    shutdown_requested: bool,
    /// While a client's request is handled: what it answers, sent after the work it starts.
    held: Option<Vec<(ConnId, ControllerToClient)>>,
    /// Replies to submitters that wait, each with the results that followed it, held back
    /// until their job ends or [`HOLD`] has passed.
    holding: HashMap<JobId, Holding>,
}

/// A reply held back, and what followed it for the same client and job.
struct Holding {
    conn: ConnId,
    msgs: Vec<ControllerToClient>,
    until: Instant,
}

impl Wire {
    /// Handles one client request: the work it starts goes to the engines before the answer
    /// goes to the client, so the engines start while the submitter learns the job id (a
    /// submitter that waits for the results does not need it sooner).
    fn client_request(
        &mut self,
        state: &mut State,
        conn: ConnId,
        id: u64,
        body: ClientRequest,
        now: Instant,
    ) {
        let waits = matches!(body, ClientRequest::Submit { wait: true, .. });
        self.held = Some(Vec::new());
        state.on_client_request(self, conn, id, body, now);
        let mut holds = None;
        for (client, msg) in self.held.take().unwrap_or_default() {
            if client == conn {
                match &msg {
                    ControllerToClient::Reply {
                        body: Reply::Job(info),
                        ..
                    } if waits && state.is_unfinished(info.job) => {
                        holds = Some(info.job);
                        self.holding.insert(
                            info.job,
                            Holding {
                                conn,
                                msgs: vec![msg],
                                until: now + HOLD,
                            },
                        );
                        continue;
                    }
                    ControllerToClient::Results { job, .. } if holds == Some(*job) => {
                        if let Some(h) = self.holding.get_mut(job) {
                            h.msgs.push(msg);
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            self.send_to_client(client, msg);
        }
    }

    /// Sends what was held for `job`, in the order it came.
    fn release(&mut self, job: JobId) {
        if let Some(h) = self.holding.remove(&job) {
            for msg in h.msgs {
                self.to_client(h.conn, msg);
            }
        }
    }

    /// Sends what has been held for [`HOLD`].
    fn release_due(&mut self, now: Instant) {
        let due: Vec<JobId> = self
            .holding
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(job, _)| *job)
            .collect();
        for job in due {
            self.release(job);
        }
    }

    /// Sends everything held (the controller stops).
    fn release_all(&mut self) {
        let jobs: Vec<JobId> = self.holding.keys().copied().collect();
        for job in jobs {
            self.release(job);
        }
    }

    /// When the next held reply is due.
    fn next_release(&self) -> Option<Instant> {
        self.holding.values().map(|h| h.until).min()
    }

    fn client_gone(&mut self, conn: ConnId) {
        self.clients.remove(&conn);
        self.holding.retain(|_, h| h.conn != conn);
    }

    fn send_to_client(&mut self, conn: ConnId, msg: ControllerToClient) {
        let Some(out) = self.clients.get(&conn) else {
            return;
        };
        let frames = crate::proto::encode_results(msg, self.max_frame);
        if !out.send(conn, frames, client_backlog(self.max_frame)) {
            // Its writer and reader stop; the reader's ClientGone tells the state.
            self.clients.remove(&conn);
        }
    }
}

impl Comm for Wire {
    fn to_client(&mut self, conn: ConnId, msg: ControllerToClient) {
        if let ControllerToClient::Results { job, .. } = &msg {
            if let Some(h) = self.holding.get_mut(job).filter(|h| h.conn == conn) {
                h.msgs.push(msg);
                return;
            }
        }
        match &mut self.held {
            Some(held) => held.push((conn, msg)),
            None => self.send_to_client(conn, msg),
        }
    }
    fn to_engine(&mut self, conn: ConnId, msg: ControllerToEngine) {
        let Some(tx) = self.engines.get(&conn) else {
            return;
        };
        let frame = conn::encode(&msg);
        match msg {
            // The same large push to every engine of a process can outgrow one frame: then
            // each task goes in a frame of its own (each fits, since its request did).
            ControllerToEngine::Run { mut defs, tasks }
                if frame.len() > self.max_frame && tasks.len() > 1 =>
            {
                for task in tasks {
                    let run = ControllerToEngine::Run {
                        defs: std::mem::take(&mut defs),
                        tasks: vec![task],
                    };
                    let _ = tx.send(conn::encode(&run));
                }
            }
            _ => {
                let _ = tx.send(frame);
            }
        }
    }
    fn close(&mut self, conn: ConnId) {
        // Dropping the sender ends the writer, which closes the socket.
        self.engines.remove(&conn);
    }
    fn record_job(&mut self, info: &JobInfo, spec: JobSpec, options: &JobOptions) {
        if let Some(store) = &self.store {
            store.send(StoreOp::Job {
                info: info.clone(),
                spec: Box::new(spec),
                options: Box::new(options.clone()),
            });
        }
    }
    fn record_ended(
        &mut self,
        job: JobId,
        status: &'static str,
        error: Option<&str>,
        ran_on: &[EngineId],
    ) {
        self.release(job);
        if let Some(store) = &self.store {
            store.send(StoreOp::Ended {
                job,
                status,
                error: error.map(str::to_string),
                completed: crate::proto::now_micros(),
                ran_on: ran_on.to_vec(),
            });
        }
    }
    fn read_store(&mut self, conn: ConnId, id: u64, read: Read) {
        let Some(out) = self.clients.get(&conn).cloned() else {
            return;
        };
        let max_frame = self.max_frame;
        let send = move |msg: ControllerToClient| {
            out.send(
                conn,
                crate::proto::encode_results(msg, max_frame),
                client_backlog(max_frame),
            );
        };
        let Some(store) = &self.store else {
            send(ControllerToClient::Reply {
                id,
                body: Reply::Error("this controller keeps no task store".into()),
            });
            return;
        };
        store.send(StoreOp::Read {
            read,
            answer: Box::new(move |(body, results)| {
                let job = match &body {
                    Reply::Job(info) => Some(info.job),
                    _ => None,
                };
                send(ControllerToClient::Reply { id, body });
                if let Some(job) = job.filter(|_| !results.is_empty()) {
                    send(ControllerToClient::Results { job, results });
                }
            }),
        });
    }
    fn shutdown(&mut self) {
        self.shutdown_requested = true;
    }
    fn record_engines(&mut self, ids: &[(String, u32, EngineId)]) {
        if let Some(store) = &self.store {
            // Blocks the controller until the store has written what was queued before: rare,
            // since a node slot gets its id once.
            store.send(StoreOp::Engines(ids.to_vec()));
            store.sync();
        }
    }
    fn reserve_jobs(&mut self, upto: u64, needed: u64) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        if upto > self.requested_jobs {
            store.send(StoreOp::ReserveJobs(upto));
            self.requested_jobs = upto;
        }
        if store.reserved_jobs() < needed {
            store.sync();
        }
        store.reserved_jobs() >= needed
    }
    fn record_results(&mut self, job: JobId, results: &[TaskResult]) {
        if let Some(store) = &self.store {
            store.send(StoreOp::Results {
                job,
                results: results.to_vec(),
            });
        }
    }
}

/// Errors that stop a controller from starting.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("cannot open the task store {path}: {source}")]
    Store {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Serves the cluster on `listener` until `shutdown` completes or a client asks for shutdown.
pub async fn run(
    listener: TcpListener,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let acceptor = crate::proto::tls::acceptor(&ClusterCert {
        cert_pem: config.cert_pem.clone(),
        key_pem: config.key_pem.clone(),
    })?;
    let (store, recovered) = match &config.db {
        Some(path) => {
            let (store, recovered) =
                Store::open(path).map_err(|source| ControllerError::Store {
                    path: path.clone(),
                    source,
                })?;
            (Some(store), recovered)
        }
        None => (None, store::Recovered::default()),
    };
    let keys = Arc::new(ServerKeys {
        client: config.client_key.clone(),
        engine: config.engine_key.clone(),
    });
    let heartbeat = Duration::from_millis(config.heartbeat_ms.max(10));
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();

    let max_frame = config.max_frame;
    let accept_loop = async move {
        let mut next = 0u64;
        // Connections waiting for their handshake, oldest first, each with its switch.
        let waiting: Arc<std::sync::Mutex<VecDeque<(ConnId, CancellationToken)>>> = Arc::default();
        let mut dropped = 0u64;
        let mut pause = ACCEPT_PAUSE;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => {
                    pause = ACCEPT_PAUSE;
                    x
                }
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!("accept failed: {e}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            };
            next += 1;
            let conn = ConnId(next);
            let switch = CancellationToken::new();
            {
                let mut w = waiting.lock().expect("not poisoned");
                w.push_back((conn, switch.clone()));
                if w.len() > MAX_HANDSHAKES {
                    if let Some((_, oldest)) = w.pop_front() {
                        oldest.cancel();
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            tracing::warn!(
                                "{dropped} connection(s) dropped so far: more than {MAX_HANDSHAKES} waited for their handshake at once"
                            );
                        }
                    }
                }
            }
            let (acceptor, keys, events) = (acceptor.clone(), keys.clone(), events_tx.clone());
            let waiting = waiting.clone();
            tokio::spawn(async move {
                let accepted = tokio::select! {
                    r = conn::accept(&acceptor, tcp, &keys, max_frame) => r,
                    () = switch.cancelled() => return,
                };
                waiting
                    .lock()
                    .expect("not poisoned")
                    .retain(|(c, _)| *c != conn);
                match accepted {
                    Ok(accepted) => serve(conn, accepted, events).await,
                    Err(e) => tracing::warn!(%peer, "connection refused: {e}"),
                }
            });
        }
    };
    tokio::pin!(accept_loop);
    tokio::pin!(shutdown);

    let mut state = State::new(&config.cluster, heartbeat, config.task_attempts);
    let mut wire = Wire {
        clients: HashMap::new(),
        engines: HashMap::new(),
        store,
        requested_jobs: 0,
        shutdown_requested: false,
        max_frame: config.max_frame,
        held: None,
        holding: HashMap::new(),
    };
    // A store a controller worked on before: its work goes on where it stopped.
    state.restore(&mut wire, recovered, Instant::now());
    let mut writers: Vec<Flushed> = Vec::new();
    let mut ticker = tokio::time::interval(heartbeat / 4);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set to when the first held reply is due, while there is one (see [`HOLD`]); polled only
    // then.
    let release = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(release);
    tracing::info!(cluster = config.cluster, "controller running");
    loop {
        let next_release = wire.next_release();
        if let Some(at) = next_release.filter(|at| *at != release.deadline()) {
            release.as_mut().reset(at);
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = &mut accept_loop => unreachable!("the accept loop never ends"),
            _ = ticker.tick() => state.on_tick(&mut wire, Instant::now()),
            () = &mut release, if next_release.is_some() => wire.release_due(Instant::now()),
            Some(ev) = events.recv() => {
                let now = Instant::now();
                match ev {
                    Event::ClientUp(c, out, flushed) => { wire.clients.insert(c, out); writers.retain(|w| !w.is_finished()); writers.push(flushed); state.on_client_connected(c); }
                    Event::ClientRequest(c, id, body) => wire.client_request(&mut state, c, id, body, now),
                    Event::ClientGone(c) => { wire.client_gone(c); state.on_client_gone(c); }
                    Event::EngineUp(c, tx, flushed) => { wire.engines.insert(c, tx); writers.push(flushed); state.on_engine_connected(c, now); }
                    Event::EngineMessage(c, m) => state.on_engine_message(&mut wire, c, m, now),
                    Event::EngineGone(c, why) => state.on_engine_gone(&mut wire, c, &why, now),
                }
                if wire.shutdown_requested {
                    break;
                }
            }
        }
    }
    tracing::info!("controller stopping");
    if let Some(store) = &wire.store {
        // Every job is recorded by now (the store finishes its queue before it closes): the
        // next controller on this store need not skip the rest of the reserved ids.
        store.send(StoreOp::Stopped(state.next_job().0));
    }
    // Closing the queues ends each writer once it has sent what was queued (the shutdown
    // orders, the last replies, what was held back); wait for that, within bounds.
    wire.release_all();
    wire.clients.clear();
    wire.engines.clear();
    let _ = tokio::time::timeout(FLUSH_ON_EXIT, futures::future::join_all(writers)).await;
    drop(wire);
    Ok(())
}

async fn serve(conn: ConnId, accepted: Accepted, events: mpsc::UnboundedSender<Event>) {
    match accepted {
        Accepted::Client(c) => {
            let (mut reader, writer) = c.split();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let backlog = Arc::new(conn::Backlog::default());
            let on_error = events.clone();
            let pumped = backlog.clone();
            let flushed = tokio::spawn(async move {
                let sent = writer.pump_frames(&mut rx, &pumped).await;
                if let Err(e) = &sent {
                    tracing::warn!(?conn, "sending to a client failed: {e}");
                    let _ = on_error.send(Event::ClientGone(conn));
                }
                sent
            });
            let out = Outbox {
                tx,
                backlog: backlog.clone(),
                oversized: Arc::default(),
            };
            let _ = events.send(Event::ClientUp(conn, out, flushed));
            loop {
                let received = tokio::select! {
                    r = reader.recv() => r,
                    () = backlog.cut_off() => break,
                };
                match received {
                    Ok(Some(req)) => {
                        let _ = events.send(Event::ClientRequest(conn, req.id, req.body));
                    }
                    // Closed, or a client process that exited without closing TLS: nothing
                    // to report.
                    Ok(None) | Err(ProtoError::Dropped) => break,
                    Err(e) => {
                        tracing::warn!(?conn, "client connection closed: {e}");
                        break;
                    }
                }
            }
            let _ = events.send(Event::ClientGone(conn));
        }
        Accepted::Engine(c) => {
            let (mut reader, writer) = c.split();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let on_error = events.clone();
            let flushed = tokio::spawn(async move {
                let sent = writer.pump_frames(&mut rx, &conn::Backlog::default()).await;
                if let Err(e) = &sent {
                    let _ = on_error.send(Event::EngineGone(
                        conn,
                        format!("sending to it failed: {e}"),
                    ));
                }
                sent
            });
            let _ = events.send(Event::EngineUp(conn, tx, flushed));
            let why = loop {
                match reader.recv().await {
                    Ok(Some(msg)) => {
                        let _ = events.send(Event::EngineMessage(conn, msg));
                    }
                    Ok(None) => {
                        break "its connection closed (the engine process exited)".to_string()
                    }
                    Err(e) => break format!("its connection failed: {e}"),
                }
            };
            let _ = events.send(Event::EngineGone(conn, why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Assignment, EngineSlot, Targets, Work};

    /// A controller's state and wire with two engines (one process each) and a client, and
    /// what each of them is sent.
    struct Rig {
        state: State,
        wire: Wire,
        client: mpsc::UnboundedReceiver<conn::Frame>,
        engines: Vec<mpsc::UnboundedReceiver<conn::Frame>>,
        now: Instant,
    }

    const CLIENT: ConnId = ConnId(100);

    impl Rig {
        fn new() -> Self {
            let now = Instant::now();
            let mut state = State::new("t", Duration::from_secs(1), 2);
            let mut wire = Wire {
                clients: HashMap::new(),
                engines: HashMap::new(),
                max_frame: crate::proto::DEFAULT_MAX_FRAME,
                store: None,
                requested_jobs: 0,
                shutdown_requested: false,
                held: None,
                holding: HashMap::new(),
            };
            let mut engines = Vec::new();
            for i in 0..2u32 {
                let conn = ConnId(u64::from(i));
                let (tx, rx) = mpsc::unbounded_channel();
                wire.engines.insert(conn, tx);
                engines.push(rx);
                state.on_engine_connected(conn, now);
                let register = EngineToController::Register {
                    node: format!("node{i}"),
                    host: "127.0.0.1".into(),
                    pid: 900 + i,
                    engines: vec![EngineSlot {
                        slot: 0,
                        kernel_pid: 1000 + i,
                        rank: None,
                    }],
                };
                state.on_engine_message(&mut wire, conn, register, now);
            }
            let (tx, client) = mpsc::unbounded_channel();
            wire.clients.insert(
                CLIENT,
                Outbox {
                    tx,
                    backlog: Arc::default(),
                    oversized: Arc::default(),
                },
            );
            state.on_client_connected(CLIENT);
            let mut rig = Self {
                state,
                wire,
                client,
                engines,
                now,
            };
            for i in 0..2 {
                rig.sent_to_engine(i);
            }
            rig
        }

        /// Submits an apply on both engines, as request 7.
        fn apply(&mut self, wait: bool) {
            self.submit(
                JobSpec::Direct {
                    targets: Targets::All,
                    work: Work::Apply {
                        func: crate::proto::Func::Expr("1".into()),
                        args: Vec::new(),
                    },
                },
                wait,
            );
        }

        fn submit(&mut self, spec: JobSpec, wait: bool) {
            let body = ClientRequest::Submit {
                spec,
                options: Box::default(),
                wait,
            };
            let now = self.now;
            self.wire
                .client_request(&mut self.state, CLIENT, 7, body, now);
        }

        /// What the client has been handed since last asked, in order.
        fn sent_to_client(&mut self) -> Vec<ControllerToClient> {
            std::iter::from_fn(|| self.client.try_recv().ok())
                .map(|f| conn::decode_frame(&f.into_bytes()).expect("a message"))
                .collect()
        }

        /// The tasks engine `i` has been handed since last asked.
        fn sent_to_engine(&mut self, i: usize) -> Vec<Assignment> {
            std::iter::from_fn(|| self.engines[i].try_recv().ok())
                .map(|f| conn::decode_frame(&f.into_bytes()).expect("a message"))
                .flat_map(|m| match m {
                    ControllerToEngine::Run { tasks, .. } => tasks,
                    _ => Vec::new(),
                })
                .collect()
        }

        /// Engine `i` answers the tasks it was handed.
        fn engine_answers(&mut self, i: usize, tasks: &[Assignment]) {
            let results = tasks
                .iter()
                .map(|a| state::tests::ok(a.task, a.engine, a.first))
                .collect();
            let now = self.now;
            let msg = EngineToController::Done(results);
            self.state
                .on_engine_message(&mut self.wire, ConnId(i as u64), msg, now);
        }
    }

    fn kinds(msgs: &[ControllerToClient]) -> Vec<&'static str> {
        msgs.iter()
            .map(|m| match m {
                ControllerToClient::Reply {
                    body: Reply::Job(_),
                    ..
                } => "job",
                ControllerToClient::Reply { .. } => "other reply",
                ControllerToClient::Results { .. } => "results",
                ControllerToClient::Output(_) => "output",
            })
            .collect()
    }

    #[test]
    fn a_waiting_submitter_gets_the_reply_of_a_short_job_together_with_its_results() {
        let mut rig = Rig::new();
        rig.apply(true);
        let (a, b) = (rig.sent_to_engine(0), rig.sent_to_engine(1));
        assert_eq!((a.len(), b.len()), (1, 1), "each engine has its task");
        assert!(
            rig.sent_to_client().is_empty(),
            "the reply waits for the results"
        );
        rig.engine_answers(0, &a);
        assert!(rig.sent_to_client().is_empty(), "one engine of two is in");
        rig.engine_answers(1, &b);
        let sent = rig.sent_to_client();
        assert_eq!(
            kinds(&sent),
            ["job", "results", "results"],
            "the reply, then each engine's result, handed to the writer at once"
        );
        let ControllerToClient::Reply {
            id: 7,
            body: Reply::Job(info),
        } = &sent[0]
        else {
            panic!("the reply to request 7 first: {:?}", sent[0]);
        };
        for m in &sent[1..] {
            assert!(
                matches!(m, ControllerToClient::Results { job, results } if *job == info.job && results.len() == 1),
                "{m:?}"
            );
        }
        assert!(rig.wire.holding.is_empty());
        assert_eq!(rig.wire.next_release(), None);
    }

    #[test]
    fn a_waiting_submission_that_ends_at_once_is_answered_at_once() {
        let mut rig = Rig::new();
        rig.submit(
            JobSpec::Map {
                mapper: crate::proto::Mapper::Python(crate::proto::Func::Expr("str".into())),
                items: Vec::new(),
                chunksize: None,
            },
            true,
        );
        assert_eq!(kinds(&rig.sent_to_client()), ["job"]);
        assert!(rig.wire.holding.is_empty(), "nothing stays held");
    }

    #[test]
    fn what_is_held_goes_out_when_the_controller_stops() {
        let mut rig = Rig::new();
        rig.apply(true);
        let a = rig.sent_to_engine(0);
        rig.engine_answers(0, &a);
        assert!(rig.sent_to_client().is_empty());
        rig.wire.release_all();
        assert_eq!(kinds(&rig.sent_to_client()), ["job", "results"]);
    }

    #[test]
    fn a_submitter_that_does_not_wait_gets_the_reply_at_once() {
        let mut rig = Rig::new();
        rig.apply(false);
        assert_eq!(kinds(&rig.sent_to_client()), ["job"]);
        let a = rig.sent_to_engine(0);
        rig.engine_answers(0, &a);
        assert_eq!(kinds(&rig.sent_to_client()), ["results"]);
    }

    #[test]
    fn the_reply_of_a_longer_job_goes_out_once_the_hold_has_passed_and_results_as_they_come() {
        let mut rig = Rig::new();
        rig.apply(true);
        let (a, b) = (rig.sent_to_engine(0), rig.sent_to_engine(1));
        rig.engine_answers(0, &a);
        assert_eq!(rig.wire.next_release(), Some(rig.now + HOLD));
        rig.wire.release_due(rig.now + HOLD / 2);
        assert!(rig.sent_to_client().is_empty(), "not yet");
        rig.wire.release_due(rig.now + HOLD);
        assert_eq!(
            kinds(&rig.sent_to_client()),
            ["job", "results"],
            "the reply and what came meanwhile"
        );
        rig.engine_answers(1, &b);
        assert_eq!(kinds(&rig.sent_to_client()), ["results"]);
    }

    #[test]
    fn what_is_held_for_a_client_that_left_is_dropped() {
        let mut rig = Rig::new();
        rig.apply(true);
        rig.wire.client_gone(CLIENT);
        rig.state.on_client_gone(CLIENT);
        assert!(rig.wire.holding.is_empty(), "the hold went with its client");
        let (a, b) = (rig.sent_to_engine(0), rig.sent_to_engine(1));
        rig.engine_answers(0, &a);
        rig.engine_answers(1, &b);
        assert!(
            rig.wire.holding.is_empty(),
            "its job's results are not held for it"
        );
    }

    #[test]
    fn what_comes_behind_a_message_larger_than_the_limit_may_wait_but_not_for_ever() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let out = Outbox {
            tx,
            backlog: Arc::default(),
            oversized: Arc::default(),
        };
        let (conn, limit) = (ConnId(1), 100);
        let frame = |n| conn::Frame::from(bytes::Bytes::from(vec![0u8; n]));
        let whole = vec![frame(60), frame(60), frame(60)];
        assert!(
            out.send(conn, whole, limit),
            "a finished job's results go whole"
        );
        assert!(
            out.send(conn, vec![frame(10)], limit),
            "an answer waits behind them"
        );
        // Nobody reads: what piles up beyond the large message is bounded by the limit.
        assert!(out.send(conn, vec![frame(91)], limit));
        assert!(
            !out.send(conn, vec![frame(1)], limit),
            "then the client is cut off"
        );
    }
}
