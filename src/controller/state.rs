//! The controller's logic, free of I/O.
//!
//! Every event — a client request, an engine message, a lost connection, a clock tick — is one
//! synchronous `on_*` call on [`State`]; the only way out is the [`Comm`] trait. The socket
//! code in [`super`] feeds events in; tests feed them directly and read what came out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::proto::{
    now_micros, Assignment, ClientRequest, ClusterStatus, ControllerToClient, ControllerToEngine,
    EngineId, EngineSlot, EngineState, EngineStatus, EngineToController, JobId, JobInfo, JobKind,
    JobSpec, LostEngine, Mapper, Outcome, RemoteError, Reply, TaskId, TaskResult, Value, Work,
};

/// Every engine may hold this many tasks (the running one included) whatever their cost, so it
/// never waits for its next task.
const MIN_PREFETCH: usize = 2;
/// Beyond [`MIN_PREFETCH`], an engine is given more tasks while the work queued on it is
/// estimated to take less than this — a few controller round trips. Cheap tasks then travel
/// hundreds a frame; expensive ones stay in the shared queue, where any engine can take them.
const PREFETCH_TIME: Duration = Duration::from_millis(20);
/// The most tasks one engine holds at once.
const MAX_PREFETCH: usize = 4096;
/// Adaptive chunking gives an engine `remaining / (GSS_DIVISOR × engines)` items at a time:
/// large chunks while much is left, ever smaller ones towards the end, so the engines finish
/// together (guided self-scheduling, halved as in "factoring").
const GSS_DIVISOR: usize = 2;
/// Finished jobs whose results the controller keeps in memory for clients that attach later,
/// at most this many; older ones are forgotten (the task store keeps their record).
const KEEP_FINISHED_JOBS: usize = 1000;
/// …and at most this many result slots (items or tasks) across them…
const KEEP_FINISHED_SLOTS: u64 = 5_000_000;
/// …and about this many bytes of results: a few large results do not grow the controller
/// without bound. The last finished job is kept whatever its size, for `starling result`.
pub const KEEP_FINISHED_BYTES: usize = 128 << 20;
/// How long the work of load-balanced maps waits for an engine when none is left (one that
/// comes back, restarted by its node or reconnected, takes it) before it fails.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(30);
/// The largest adaptive chunk, so a big map starts on every engine quickly and frames stay small.
const MAX_CHUNK: usize = 5000;

/// One connection, client or engine, as the controller numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What the controller's logic can do to the world.
pub trait Comm {
    fn to_client(&mut self, conn: ConnId, msg: ControllerToClient);
    fn to_engine(&mut self, conn: ConnId, msg: ControllerToEngine);
    /// Drops a connection (an engine declared lost).
    fn close(&mut self, conn: ConnId);
    /// Records a submitted job in the task store.
    fn record_job(&mut self, info: &JobInfo, spec: &JobSpec);
    /// Records finished tasks in the task store.
    fn record_results(&mut self, job: JobId, results: &[TaskResult]);
    /// Stops the controller once the messages queued so far are sent.
    fn shutdown(&mut self);
}

#[derive(Debug)]
struct Engine {
    conn: ConnId,
    node: String,
    host: String,
    /// Which engine of its node it is.
    slot: u32,
    /// The kernel's pid.
    pid: u32,
    /// The pid of the engine process that hosts it.
    process_pid: u32,
    tasks_done: u64,
    /// Assigned and not finished, in order, with their item counts; the front one is running.
    assigned: VecDeque<(TaskId, u64)>,
    /// Items in `assigned`.
    outstanding: u64,
}

#[derive(Debug)]
struct EngineConn {
    engines: Vec<EngineId>,
    last_seen: Instant,
    /// Map jobs whose mapper this engine process has been sent.
    defs: HashSet<JobId>,
}

#[derive(Debug)]
struct Job {
    info: JobInfo,
    /// Finished tasks, in the order they finished.
    done: Vec<TaskResult>,
    /// Result slots not yet filled.
    remaining: u64,
    subscribers: Vec<ConnId>,
    mapper: Option<Mapper>,
    feed: Option<Feed>,
    /// Mean engine time per item, from finished chunks (µs); guides prefetching.
    item_micros: Option<f64>,
    /// About how many bytes `done` holds.
    bytes: usize,
}

/// The items of a load-balanced map not yet handed out.
#[derive(Debug)]
struct Feed {
    items: VecDeque<Value>,
    next: u64,
    chunksize: Option<u32>,
    /// Chunks whose engine was lost, to run again (before new items).
    again: VecDeque<Requeued>,
}

impl Feed {
    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.again.is_empty()
    }
}

/// A load-balanced chunk that runs again elsewhere: its first slot, its items, and how many
/// times it was handed out.
#[derive(Debug)]
struct Requeued {
    first: u64,
    items: Vec<Value>,
    attempts: u32,
}

#[derive(Debug)]
struct WaitEngines {
    conn: ConnId,
    id: u64,
    count: u32,
    deadline: Instant,
}

/// Where a task is: its job, its first result slot and how many slots it fills.
#[derive(Debug, Clone)]
struct TaskRef {
    job: JobId,
    first: u64,
    slots: u64,
    /// A load-balanced chunk keeps its items and the times it was handed out, so it can run
    /// elsewhere when its engine is lost.
    balanced: Option<(Vec<Value>, u32)>,
}

/// The whole state of a controller.
pub struct State {
    cluster: String,
    heartbeat: Duration,
    attempts: u32,
    engines: BTreeMap<EngineId, Engine>,
    engine_conns: HashMap<ConnId, EngineConn>,
    clients: HashSet<ConnId>,
    jobs: HashMap<JobId, Job>,
    tasks: HashMap<TaskId, TaskRef>,
    /// Load-balanced maps with items still to hand out, oldest first.
    feeds: VecDeque<JobId>,
    /// When the clock last ticked.
    last_tick: Option<Instant>,
    /// Finished jobs still held in memory, oldest first, and their slots in all.
    finished: VecDeque<JobId>,
    finished_slots: u64,
    finished_bytes: usize,
    waiting: Vec<WaitEngines>,
    /// Since when no engine has been registered, the last one lost and why.
    orphaned: Option<(Instant, EngineId, String)>,
    /// The id each node slot was given, so an engine that comes back gets its id again.
    slot_ids: HashMap<(String, u32), EngineId>,
    /// Engines gone and not back, by node slot (bounded by the slots there are).
    lost: BTreeMap<(String, u32), LostEngine>,
    /// Why the engines of these node slots cannot start, until one of them registers: whoever
    /// waits for engines hears it at once, whenever they ask.
    cannot_start: BTreeMap<(String, u32), String>,
    /// Per id: how often it was lost and came back, and the last reason it was lost.
    returns: HashMap<EngineId, (u32, String)>,
    next_engine: u32,
    next_job: u64,
    next_task: u64,
}

impl State {
    /// `attempts`: how many times a load-balanced task is handed out, at most, when the engines
    /// running it are lost.
    pub fn new(cluster: &str, heartbeat: Duration, attempts: u32) -> Self {
        Self {
            cluster: cluster.to_string(),
            heartbeat,
            attempts: attempts.max(1),
            engines: BTreeMap::new(),
            engine_conns: HashMap::new(),
            clients: HashSet::new(),
            jobs: HashMap::new(),
            tasks: HashMap::new(),
            feeds: VecDeque::new(),
            last_tick: None,
            finished: VecDeque::new(),
            finished_slots: 0,
            finished_bytes: 0,
            waiting: Vec::new(),
            orphaned: None,
            slot_ids: HashMap::new(),
            lost: BTreeMap::new(),
            cannot_start: BTreeMap::new(),
            returns: HashMap::new(),
            next_engine: 0,
            next_job: 0,
            next_task: 0,
        }
    }

    /// The registered engine ids, ascending.
    pub fn ids(&self) -> Vec<EngineId> {
        self.engines.keys().copied().collect()
    }

    /// How long an engine connection may stay silent before it is lost: two missed heartbeats.
    pub fn lost_after(&self) -> Duration {
        self.heartbeat * 2 + self.heartbeat / 2
    }

    pub fn on_client_connected(&mut self, conn: ConnId) {
        self.clients.insert(conn);
    }

    pub fn on_client_gone(&mut self, conn: ConnId) {
        self.clients.remove(&conn);
        self.waiting.retain(|w| w.conn != conn);
        for job in self.jobs.values_mut() {
            job.subscribers.retain(|c| *c != conn);
        }
    }

    pub fn on_engine_connected(&mut self, conn: ConnId, now: Instant) {
        self.engine_conns.insert(
            conn,
            EngineConn {
                engines: Vec::new(),
                last_seen: now,
                defs: HashSet::new(),
            },
        );
    }

    pub fn on_client_request(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        id: u64,
        body: ClientRequest,
        now: Instant,
    ) {
        let reply = |comm: &mut dyn Comm, body: Reply| {
            comm.to_client(conn, ControllerToClient::Reply { id, body });
        };
        match body {
            ClientRequest::Ids => reply(comm, Reply::Ids(self.ids())),
            ClientRequest::Status => reply(comm, Reply::Status(self.status())),
            ClientRequest::WaitEngines { count, timeout_ms } => {
                if self.engines.len() >= count as usize {
                    reply(comm, Reply::Ids(self.ids()));
                } else if let Some(why) = self.cannot_start.values().next() {
                    reply(comm, Reply::Error(why.clone()));
                } else {
                    self.waiting.push(WaitEngines {
                        conn,
                        id,
                        count,
                        deadline: now + Duration::from_millis(timeout_ms),
                    });
                }
            }
            ClientRequest::Submit(spec) => match self.submit(comm, conn, &spec) {
                Ok(info) => reply(comm, Reply::Job(info)),
                Err(e) => reply(comm, Reply::Error(e)),
            },
            ClientRequest::Subscribe { job } => match self.jobs.get_mut(&job) {
                None if job.0 < self.next_job => reply(
                    comm,
                    Reply::Error(format!(
                        "job {job} finished long ago and its results are no longer held (the controller keeps the last {KEEP_FINISHED_JOBS} jobs and {} MiB of results); the cluster's task store has its record", KEEP_FINISHED_BYTES >> 20
                    )),
                ),
                None => reply(
                    comm,
                    Reply::Error(format!(
                        "there is no job {job} on cluster '{}'; job ids are printed by `px --noblock`",
                        self.cluster
                    )),
                ),
                Some(j) => {
                    reply(comm, Reply::Job(j.info.clone()));
                    if !j.done.is_empty() {
                        comm.to_client(
                            conn,
                            ControllerToClient::Results {
                                job,
                                results: j.done.clone(),
                            },
                        );
                    }
                    if j.remaining > 0 && !j.subscribers.contains(&conn) {
                        j.subscribers.push(conn);
                    }
                }
            },
            ClientRequest::Shutdown => {
                for econn in self.engine_conns.keys() {
                    comm.to_engine(*econn, ControllerToEngine::Shutdown);
                }
                reply(comm, Reply::Done);
                comm.shutdown();
            }
        }
    }

    fn new_task(&mut self, job: JobId, first: u64, slots: u64) -> TaskId {
        let task = TaskId(self.next_task);
        self.next_task += 1;
        self.tasks.insert(
            task,
            TaskRef {
                job,
                first,
                slots,
                balanced: None,
            },
        );
        task
    }

    fn submit(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        spec: &JobSpec,
    ) -> Result<JobInfo, String> {
        let job = JobId(self.next_job);
        // Per target: the work and how many result slots it fills.
        let (kind, targets, mut per_target, mapper, feed): (JobKind, _, Vec<(Work, u64)>, _, _) =
            match spec {
                JobSpec::Direct { targets, work } => {
                    let kind =
                        match work {
                            Work::Execute { .. } => JobKind::Execute,
                            Work::Shell { .. } => JobKind::Shell,
                            Work::Apply { .. } => JobKind::Apply,
                            Work::Push { .. } => JobKind::Push,
                            Work::Pull { .. } => JobKind::Pull,
                            Work::MapChunk { .. } | Work::Scatter { .. } => return Err(
                                "map chunks and scatters are made by the controller, not submitted"
                                    .into(),
                            ),
                        };
                    (kind, Some(targets), vec![(work.clone(), 1)], None, None)
                }
                JobSpec::Scatter {
                    targets,
                    name,
                    items,
                } => {
                    let chosen = targets.resolve(&self.ids())?;
                    let work = split(items, chosen.len())
                        .map(|chunk| {
                            let work = Work::Scatter {
                                name: name.clone(),
                                items: chunk.to_vec(),
                            };
                            (work, 1)
                        })
                        .collect();
                    (JobKind::Scatter, Some(targets), work, None, None)
                }
                JobSpec::DirectMap {
                    targets,
                    mapper,
                    items,
                } => {
                    let chosen = targets.resolve(&self.ids())?;
                    let work = split(items, chosen.len())
                        .map(|chunk| {
                            let n = chunk.len() as u64;
                            (
                                Work::MapChunk {
                                    job,
                                    items: chunk.to_vec(),
                                },
                                n,
                            )
                        })
                        .collect();
                    (
                        JobKind::Map,
                        Some(targets),
                        work,
                        Some(mapper.clone()),
                        None,
                    )
                }
                JobSpec::Map {
                    mapper,
                    items,
                    chunksize,
                } => {
                    if self.engines.is_empty() {
                        return Err(
                            "no engine is registered yet; `starling status` shows the cluster"
                                .into(),
                        );
                    }
                    if *chunksize == Some(0) {
                        return Err("chunksize must be at least 1".into());
                    }
                    let feed = Feed {
                        items: items.iter().cloned().collect(),
                        next: 0,
                        chunksize: *chunksize,
                        again: VecDeque::new(),
                    };
                    (
                        JobKind::Map,
                        None,
                        Vec::new(),
                        Some(mapper.clone()),
                        Some(feed),
                    )
                }
            };
        let chosen = match targets {
            Some(t) => t.resolve(&self.ids())?,
            None => Vec::new(),
        };
        if per_target.len() == 1 && chosen.len() > 1 {
            per_target = vec![per_target[0].clone(); chosen.len()];
        }
        self.next_job += 1;
        let slots = match (&feed, kind) {
            (Some(f), _) => f.items.len() as u64,
            (None, JobKind::Map) => per_target.iter().map(|(_, n)| n).sum(),
            (None, _) => chosen.len() as u64,
        };
        let mut info = JobInfo {
            job,
            kind,
            submitted: now_micros(),
            tasks: Vec::with_capacity(chosen.len()),
            slots,
        };
        let mut per_conn: BTreeMap<ConnId, Vec<Assignment>> = BTreeMap::new();
        let mut first = 0;
        for (engine_id, (work, n)) in chosen.iter().zip(per_target) {
            if kind == JobKind::Map && n == 0 {
                // More engines than items: this one has nothing to do.
                continue;
            }
            let slot_first = if kind == JobKind::Map {
                first
            } else {
                info.tasks.len() as u64
            };
            first += n;
            // Every task fills `n` slots (one, for direct jobs): the job is complete, and its
            // subscribers released, exactly when every task has reported.
            let task = self.new_task(job, slot_first, n);
            info.tasks.push((task, *engine_id));
            let engine = self
                .engines
                .get_mut(engine_id)
                .expect("resolved ids are registered");
            engine.assigned.push_back((task, n));
            engine.outstanding += n;
            per_conn.entry(engine.conn).or_default().push(Assignment {
                task,
                engine: *engine_id,
                first: slot_first,
                work,
            });
        }
        comm.record_job(&info, spec);
        let empty = info.slots == 0;
        self.jobs.insert(
            job,
            Job {
                done: Vec::new(),
                remaining: info.slots,
                subscribers: if empty { Vec::new() } else { vec![conn] },
                info: info.clone(),
                mapper,
                feed: None,
                item_micros: None,
                bytes: 0,
            },
        );
        if empty {
            self.finished.push_back(job);
            self.forget_old_jobs();
        }
        for (econn, tasks) in per_conn {
            let defs = self.defs_for(econn, &tasks);
            comm.to_engine(econn, ControllerToEngine::Run { defs, tasks });
        }
        if let Some(feed) = feed {
            if !feed.items.is_empty() {
                self.jobs.get_mut(&job).expect("just inserted").feed = Some(feed);
                self.feeds.push_back(job);
                self.fill(comm);
            }
        }
        Ok(info)
    }

    /// The mapper definitions an engine process needs for these tasks and has not had yet.
    fn defs_for(&mut self, econn: ConnId, tasks: &[Assignment]) -> Vec<(JobId, Mapper)> {
        let mut defs = Vec::new();
        let Some(ec) = self.engine_conns.get_mut(&econn) else {
            return defs;
        };
        for a in tasks {
            if let Work::MapChunk { job, .. } = &a.work {
                if ec.defs.insert(*job) {
                    if let Some(m) = self.jobs.get(job).and_then(|j| j.mapper.clone()) {
                        defs.push((*job, m));
                    }
                }
            }
        }
        defs
    }

    /// Whether an engine should be given another task of a job whose items take `item_micros`.
    fn has_room(engine: &Engine, item_micros: Option<f64>) -> bool {
        let n = engine.assigned.len();
        if n < MIN_PREFETCH {
            return true;
        }
        if n >= MAX_PREFETCH {
            return false;
        }
        match item_micros {
            Some(us) => (engine.outstanding as f64) * us < PREFETCH_TIME.as_micros() as f64,
            None => false,
        }
    }

    /// Hands out chunks of load-balanced maps to the least-loaded engines with room.
    fn fill(&mut self, comm: &mut impl Comm) {
        let mut per_conn: BTreeMap<ConnId, Vec<Assignment>> = BTreeMap::new();
        let n_engines = self.engines.len().max(1);
        while let Some(&job_id) = self.feeds.front() {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                self.feeds.pop_front();
                continue;
            };
            let item_micros = job.item_micros;
            let Some(feed) = job.feed.as_mut().filter(|f| !f.is_empty()) else {
                job.feed = None;
                self.feeds.pop_front();
                continue;
            };
            let Some((engine_id, engine)) = self
                .engines
                .iter_mut()
                .filter(|(_, e)| Self::has_room(e, item_micros))
                .min_by_key(|(_, e)| (e.outstanding, e.assigned.len()))
            else {
                break;
            };
            let (first, items, attempts) = match feed.again.pop_front() {
                Some(r) => (r.first, r.items, r.attempts + 1),
                None => {
                    let remaining = feed.items.len();
                    let size = match feed.chunksize {
                        Some(c) => c as usize,
                        None => remaining
                            .div_ceil(GSS_DIVISOR * n_engines)
                            .clamp(1, MAX_CHUNK),
                    }
                    .min(remaining);
                    let items: Vec<Value> = feed.items.drain(..size).collect();
                    let first = feed.next;
                    feed.next += size as u64;
                    (first, items, 1)
                }
            };
            let size = items.len() as u64;
            let task = TaskId(self.next_task);
            self.next_task += 1;
            self.tasks.insert(
                task,
                TaskRef {
                    job: job_id,
                    first,
                    slots: size,
                    balanced: Some((items.clone(), attempts)),
                },
            );
            engine.assigned.push_back((task, size));
            engine.outstanding += size;
            per_conn.entry(engine.conn).or_default().push(Assignment {
                task,
                engine: *engine_id,
                first,
                work: Work::MapChunk { job: job_id, items },
            });
        }
        for (econn, tasks) in per_conn {
            let defs = self.defs_for(econn, &tasks);
            comm.to_engine(econn, ControllerToEngine::Run { defs, tasks });
        }
    }

    pub fn on_engine_message(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        msg: EngineToController,
        now: Instant,
    ) {
        let Some(ec) = self.engine_conns.get_mut(&conn) else {
            return;
        };
        ec.last_seen = now;
        match msg {
            EngineToController::Heartbeat => {}
            EngineToController::Register {
                node,
                host,
                pid,
                engines,
            } => {
                if !ec.engines.is_empty() {
                    tracing::warn!(?conn, "engine process registered twice; ignored");
                    return;
                }
                self.register(comm, conn, &node, &host, pid, &engines, now);
            }
            EngineToController::CannotStart {
                node,
                host,
                slot,
                reason,
            } => {
                let reason =
                    format!("engine {slot} of node {node} ({host}) cannot start: {reason}");
                tracing::error!("{reason}");
                self.cannot_start
                    .insert((node.clone(), slot), reason.clone());
                let id = self.slot_ids.get(&(node.clone(), slot)).copied();
                self.lost.insert(
                    (node.clone(), slot),
                    LostEngine {
                        id,
                        node,
                        host,
                        reason: reason.clone(),
                        since: now_micros(),
                    },
                );
                for w in std::mem::take(&mut self.waiting) {
                    comm.to_client(
                        w.conn,
                        ControllerToClient::Reply {
                            id: w.id,
                            body: Reply::Error(reason.clone()),
                        },
                    );
                }
            }
            EngineToController::Done(results) => self.finish(comm, results),
            EngineToController::KernelRestarted {
                engine,
                pid,
                reason,
            } => {
                tracing::warn!(%engine, pid, reason, "kernel replaced");
                if let Some(e) = self.engines.get_mut(&engine) {
                    e.pid = pid;
                }
            }
        }
    }

    /// Gives a registering engine process its ids: a node slot seen before gets its old id
    /// back (an engine restarted by its node, or reconnected), a new one the next free id.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        node: &str,
        host: &str,
        process_pid: u32,
        slots: &[EngineSlot],
        now: Instant,
    ) {
        let mut ids = Vec::with_capacity(slots.len());
        for s in slots {
            let key = (node.to_string(), s.slot);
            let id = match self.slot_ids.get(&key) {
                Some(id) => *id,
                None => {
                    let id = EngineId(self.next_engine);
                    self.next_engine += 1;
                    self.slot_ids.insert(key.clone(), id);
                    id
                }
            };
            // The same engine on a connection the controller still holds: that one is stale
            // (a half-open socket after a network blip).
            if let Some(stale) = self.engines.get(&id).map(|e| e.conn) {
                if stale != conn {
                    self.on_engine_gone(
                        comm,
                        stale,
                        "it registered again on a new connection",
                        now,
                    );
                }
            }
            self.cannot_start.remove(&key);
            if let Some(gone) = self.lost.remove(&key) {
                let entry = self.returns.entry(id).or_insert((0, String::new()));
                entry.0 += 1;
                entry.1 = gone.reason;
                tracing::info!(engine = %id, node, "engine is back");
            }
            ids.push(id);
            self.engines.insert(
                id,
                Engine {
                    conn,
                    node: node.to_string(),
                    host: host.to_string(),
                    slot: s.slot,
                    pid: s.kernel_pid,
                    process_pid,
                    tasks_done: 0,
                    assigned: VecDeque::new(),
                    outstanding: 0,
                },
            );
        }
        tracing::info!(node, host, engines = %crate::proto::format_ids(&ids), "engines registered");
        if let Some(ec) = self.engine_conns.get_mut(&conn) {
            ec.engines.clone_from(&ids);
        }
        comm.to_engine(
            conn,
            ControllerToEngine::Registered {
                ids,
                heartbeat_ms: self.heartbeat.as_millis() as u64,
            },
        );
        self.answer_waiters(comm, now);
        self.fill(comm);
    }

    /// Puts a load-balanced task that was handed out fewer than `attempts` times back in its
    /// map's queue, first in line; gives the task back when it cannot run again. Its old task
    /// id is gone, so a late result for it is ignored.
    fn requeue(&mut self, tref: TaskRef) -> Result<(), TaskRef> {
        let runs_again = tref
            .balanced
            .as_ref()
            .is_some_and(|(_, attempts)| *attempts < self.attempts);
        let Some(job) = self.jobs.get_mut(&tref.job).filter(|_| runs_again) else {
            return Err(tref);
        };
        let (items, attempts) = tref.balanced.expect("checked");
        let feed = job.feed.get_or_insert_with(|| Feed {
            items: VecDeque::new(),
            next: tref.first + tref.slots,
            chunksize: None,
            again: VecDeque::new(),
        });
        feed.again.push_back(Requeued {
            first: tref.first,
            items,
            attempts,
        });
        if !self.feeds.contains(&tref.job) {
            self.feeds.push_front(tref.job);
        }
        Ok(())
    }

    fn finish(&mut self, comm: &mut impl Comm, results: Vec<TaskResult>) {
        let mut by_job: BTreeMap<JobId, Vec<TaskResult>> = BTreeMap::new();
        for result in results {
            let Some(mut tref) = self.tasks.remove(&result.task) else {
                tracing::warn!(task = %result.task, "result for an unknown task; ignored");
                continue;
            };
            if let Some(engine) = self.engines.get_mut(&result.engine) {
                engine.tasks_done += 1;
                if let Some(i) = engine.assigned.iter().position(|(t, _)| *t == result.task) {
                    let (_, n) = engine.assigned.remove(i).expect("found");
                    engine.outstanding -= n;
                }
            }
            // Its kernel died under it: like work on a lost engine, it runs again elsewhere
            // while it has attempts left.
            if kernel_died(&result.outcome) {
                match self.requeue(tref) {
                    Ok(()) => continue,
                    Err(t) => tref = t,
                }
            }
            if let Some(job) = self.jobs.get_mut(&tref.job) {
                job.remaining = job.remaining.saturating_sub(tref.slots);
                if matches!(result.outcome, Outcome::Items(_)) && result.completed > result.started
                {
                    let per_item = (result.completed - result.started) as f64 / tref.slots as f64;
                    job.item_micros = Some(match job.item_micros {
                        None => per_item,
                        Some(old) => 0.7 * old + 0.3 * per_item,
                    });
                }
            }
            by_job.entry(tref.job).or_default().push(result);
        }
        for (job_id, results) in by_job {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            comm.record_results(job_id, &results);
            for sub in &job.subscribers {
                if self.clients.contains(sub) {
                    comm.to_client(
                        *sub,
                        ControllerToClient::Results {
                            job: job_id,
                            results: results.clone(),
                        },
                    );
                }
            }
            job.bytes += results.iter().map(TaskResult::approx_bytes).sum::<usize>();
            job.done.extend(results);
            if job.remaining == 0 {
                job.subscribers.clear();
                if job.mapper.is_some() {
                    for (econn, ec) in &mut self.engine_conns {
                        if ec.defs.remove(&job_id) {
                            comm.to_engine(*econn, ControllerToEngine::Forget(vec![job_id]));
                        }
                    }
                }
                self.finished.push_back(job_id);
                self.finished_slots += job.info.slots;
                self.finished_bytes += job.bytes;
            }
        }
        self.forget_old_jobs();
        if !self.feeds.is_empty() {
            self.fill(comm);
        }
    }

    /// Drops the oldest finished jobs beyond the memory bounds.
    fn forget_old_jobs(&mut self) {
        while self.finished.len() > 1
            && (self.finished.len() > KEEP_FINISHED_JOBS
                || self.finished_slots > KEEP_FINISHED_SLOTS
                || self.finished_bytes > KEEP_FINISHED_BYTES)
        {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if let Some(job) = self.jobs.remove(&old) {
                self.finished_slots -= job.info.slots;
                self.finished_bytes -= job.bytes;
            }
        }
    }

    /// An engine connection closed or went silent: its engines are gone, and every task they
    /// held fails with a reason that names them.
    pub fn on_engine_gone(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        reason: &str,
        now: Instant,
    ) {
        let Some(ec) = self.engine_conns.remove(&conn) else {
            return;
        };
        let mut failed = Vec::new();
        let mut requeued = false;
        let ec_had_engines = !ec.engines.is_empty();
        let lost = ec.engines.first().copied().unwrap_or(EngineId(0));
        for id in ec.engines {
            let Some(engine) = self.engines.remove(&id) else {
                continue;
            };
            tracing::warn!(engine = %id, node = engine.node, reason, "engine lost");
            let now = now_micros();
            self.lost.insert(
                (engine.node.clone(), engine.slot),
                LostEngine {
                    id: Some(id),
                    node: engine.node.clone(),
                    host: engine.host.clone(),
                    reason: reason.to_string(),
                    since: now,
                },
            );
            for (task, _) in engine.assigned {
                let Some(tref) = self.tasks.remove(&task) else {
                    continue;
                };
                let lost_here = format!(
                    "engine {id} (node {}, host {}) was lost: {reason}",
                    engine.node, engine.host
                );
                let attempts = tref.balanced.as_ref().map_or(1, |(_, a)| *a);
                let tref = match self.requeue(tref) {
                    Ok(()) => {
                        requeued = true;
                        continue;
                    }
                    Err(t) => t,
                };
                // `finish` takes it from here.
                self.tasks.insert(
                    task,
                    TaskRef {
                        balanced: None,
                        ..tref
                    },
                );
                let error = RemoteError {
                    ename: "EngineLost".into(),
                    evalue: if attempts > 1 {
                        format!("{lost_here} (it had been handed out {attempts} times, the most a task is: task_attempts)")
                    } else {
                        lost_here
                    },
                    traceback: String::new(),
                };
                let per_item = self
                    .jobs
                    .get(&tref.job)
                    .is_some_and(|j| j.info.kind.per_item());
                failed.push(TaskResult {
                    task,
                    engine: id,
                    first: tref.first,
                    outcome: if per_item {
                        Outcome::Items(vec![Err(error); tref.slots as usize])
                    } else {
                        Outcome::Err(error)
                    },
                    stdout: String::new(),
                    stderr: String::new(),
                    execution_count: 0,
                    started: now,
                    completed: now,
                });
            }
        }
        if self.engines.is_empty() && self.orphaned.is_none() && ec_had_engines {
            // Nobody is left to take the rest of the load-balanced maps: an engine that comes
            // back soon (restarted by its node) takes them; after a while they fail instead
            // of waiting for ever.
            self.orphaned = Some((now, lost, reason.to_string()));
        }
        if !failed.is_empty() || requeued {
            self.finish(comm, failed);
        }
        comm.close(conn);
    }

    /// Fails the work of load-balanced maps once no engine has been there to take it for
    /// [`ORPHAN_GRACE`].
    fn fail_orphaned(&mut self, comm: &mut impl Comm, now: Instant) {
        if !self.engines.is_empty() {
            self.orphaned = None;
            return;
        }
        let Some((since, lost, reason)) = &self.orphaned else {
            return;
        };
        if now.saturating_duration_since(*since) < ORPHAN_GRACE {
            return;
        }
        let why = format!(
            "no engine was left to run it for {} s (engine {lost} was lost: {reason})",
            ORPHAN_GRACE.as_secs()
        );
        let lost = *lost;
        self.orphaned = None;
        let failed = self.drain_feeds(lost, &why);
        if !failed.is_empty() {
            self.finish(comm, failed);
        }
    }

    /// Takes every item not yet handed out and makes it an `EngineLost` failure.
    fn drain_feeds(&mut self, lost: EngineId, why: &str) -> Vec<TaskResult> {
        let now = now_micros();
        let mut failed = Vec::new();
        for job_id in std::mem::take(&mut self.feeds) {
            let Some(feed) = self.jobs.get_mut(&job_id).and_then(|j| j.feed.take()) else {
                continue;
            };
            let mut runs: Vec<(u64, u64)> = feed
                .again
                .iter()
                .map(|r| (r.first, r.items.len() as u64))
                .collect();
            if !feed.items.is_empty() {
                runs.push((feed.next, feed.items.len() as u64));
            }
            for (first, n) in runs {
                let task = self.new_task(job_id, first, n);
                let error = RemoteError {
                    ename: "EngineLost".into(),
                    evalue: why.to_string(),
                    traceback: String::new(),
                };
                failed.push(TaskResult {
                    task,
                    engine: lost,
                    first,
                    outcome: Outcome::Items(vec![Err(error); n as usize]),
                    stdout: String::new(),
                    stderr: String::new(),
                    execution_count: 0,
                    started: now,
                    completed: now,
                });
            }
        }
        failed
    }

    /// The clock: loses silent engines and answers waiters whose time ran out.
    pub fn on_tick(&mut self, comm: &mut impl Comm, now: Instant) {
        let limit = self.lost_after();
        // If the controller itself was stalled (a suspended VM, a starved CPU), the engines'
        // heartbeats may still sit unread in its sockets: judge nobody on this tick.
        let stalled = self
            .last_tick
            .is_some_and(|t| now.saturating_duration_since(t) > limit / 2);
        self.last_tick = Some(now);
        if stalled {
            for ec in self.engine_conns.values_mut() {
                ec.last_seen = ec.last_seen.max(now - self.heartbeat);
            }
        }
        let silent: Vec<(ConnId, Duration)> = self
            .engine_conns
            .iter()
            .filter_map(|(c, ec)| {
                let quiet = now.saturating_duration_since(ec.last_seen);
                (quiet > limit).then_some((*c, quiet))
            })
            .collect();
        for (conn, quiet) in silent {
            let reason = format!(
                "no heartbeat for {:.1} s (heartbeats are due every {:.1} s)",
                quiet.as_secs_f64(),
                self.heartbeat.as_secs_f64()
            );
            self.on_engine_gone(comm, conn, &reason, now);
        }
        self.fail_orphaned(comm, now);
        self.answer_waiters(comm, now);
    }

    fn answer_waiters(&mut self, comm: &mut impl Comm, now: Instant) {
        let have = self.engines.len();
        let ids = self.ids();
        let cluster = self.cluster.clone();
        self.waiting.retain(|w| {
            let body = if have >= w.count as usize {
                Reply::Ids(ids.clone())
            } else if now >= w.deadline {
                Reply::Error(format!(
                    "only {have} of {} engines registered with cluster '{cluster}' in time; the engine logs say why",
                    w.count
                ))
            } else {
                return true;
            };
            comm.to_client(w.conn, ControllerToClient::Reply { id: w.id, body });
            false
        });
    }

    pub fn status(&self) -> ClusterStatus {
        let engines = self
            .engines
            .iter()
            .map(|(id, e)| {
                let (returns, last_lost) = match self.returns.get(id) {
                    Some((n, why)) => (*n, Some(why.clone())),
                    None => (0, None),
                };
                EngineStatus {
                    id: *id,
                    node: e.node.clone(),
                    host: e.host.clone(),
                    pid: e.pid,
                    process_pid: e.process_pid,
                    state: if e.assigned.is_empty() {
                        EngineState::Idle
                    } else {
                        EngineState::Busy
                    },
                    tasks_done: e.tasks_done,
                    queued: e.assigned.len() as u64,
                    returns,
                    last_lost,
                }
            })
            .collect();
        let running = self
            .engines
            .values()
            .filter(|e| !e.assigned.is_empty())
            .count() as u64;
        ClusterStatus {
            cluster: self.cluster.clone(),
            controller_pid: std::process::id(),
            engines,
            lost: self.lost.values().cloned().collect(),
            queued: (self.tasks.len() as u64).saturating_sub(running)
                + self
                    .feeds
                    .iter()
                    .filter_map(|j| self.jobs.get(j))
                    .filter_map(|j| j.feed.as_ref())
                    .map(|f| {
                        (f.items.len() + f.again.iter().map(|r| r.items.len()).sum::<usize>())
                            as u64
                    })
                    .sum::<u64>(),
            running,
            jobs: self.next_job,
        }
    }
}

/// Whether a task failed because its kernel died under it (the engine reports `KernelDied`
/// for it, for every item of a map chunk).
fn kernel_died(outcome: &Outcome) -> bool {
    let died = |e: &RemoteError| e.ename == "KernelDied";
    match outcome {
        Outcome::Err(e) => died(e),
        Outcome::Items(items) => {
            !items.is_empty() && items.iter().all(|i| i.as_ref().is_err_and(died))
        }
        Outcome::Ok { .. } => false,
    }
}

/// Splits items into `n` contiguous chunks whose sizes differ by at most one, larger first —
/// how ipyparallel scatters.
pub fn split<T>(items: &[T], n: usize) -> impl Iterator<Item = &[T]> {
    let n = n.max(1);
    let (base, extra) = (items.len() / n, items.len() % n);
    let mut start = 0;
    (0..n).map(move |i| {
        let len = base + usize::from(i < extra);
        let chunk = &items[start..start + len];
        start += len;
        chunk
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Targets, Work};

    #[derive(Default)]
    struct Recorder {
        to_clients: Vec<(ConnId, ControllerToClient)>,
        to_engines: Vec<(ConnId, ControllerToEngine)>,
        closed: Vec<ConnId>,
        recorded_jobs: usize,
        recorded_results: usize,
    }

    impl Comm for Recorder {
        fn to_client(&mut self, conn: ConnId, msg: ControllerToClient) {
            self.to_clients.push((conn, msg));
        }
        fn to_engine(&mut self, conn: ConnId, msg: ControllerToEngine) {
            self.to_engines.push((conn, msg));
        }
        fn close(&mut self, conn: ConnId) {
            self.closed.push(conn);
        }
        fn record_job(&mut self, _: &JobInfo, _: &JobSpec) {
            self.recorded_jobs += 1;
        }
        fn record_results(&mut self, _: JobId, r: &[TaskResult]) {
            self.recorded_results += r.len();
        }
        fn shutdown(&mut self) {}
    }

    const CLIENT: ConnId = ConnId(100);

    fn cluster_with(engines_per_conn: &[usize]) -> (State, Recorder, Instant) {
        let now = Instant::now();
        let mut s = State::new("t", Duration::from_secs(1), 2);
        let mut c = Recorder::default();
        for (i, n) in engines_per_conn.iter().enumerate() {
            let conn = ConnId(i as u64);
            s.on_engine_connected(conn, now);
            let msg = EngineToController::Register {
                node: format!("node{i}"),
                host: "127.0.0.1".into(),
                pid: 900 + i as u32,
                engines: (0..*n as u32)
                    .map(|slot| EngineSlot {
                        slot,
                        kernel_pid: 1000,
                    })
                    .collect(),
            };
            s.on_engine_message(&mut c, conn, msg, now);
        }
        s.on_client_connected(CLIENT);
        c.to_engines.clear();
        (s, c, now)
    }

    fn submit(s: &mut State, c: &mut Recorder, targets: Targets, now: Instant) -> JobInfo {
        let spec = JobSpec::Direct {
            targets,
            work: Work::Execute { code: "1".into() },
        };
        s.on_client_request(c, CLIENT, 1, ClientRequest::Submit(spec), now);
        match c.to_clients.pop() {
            Some((
                _,
                ControllerToClient::Reply {
                    body: Reply::Job(info),
                    ..
                },
            )) => info,
            other => panic!("expected a job reply, got {other:?}"),
        }
    }

    fn ok(task: TaskId, engine: EngineId, first: u64) -> TaskResult {
        TaskResult {
            task,
            engine,
            first,
            outcome: Outcome::Ok {
                value: Value::Json(1.into()),
                display: Some("1".into()),
            },
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 1,
            started: 0,
            completed: 0,
        }
    }

    #[test]
    fn engines_get_consecutive_ids_across_processes() {
        let (s, _, _) = cluster_with(&[2, 2]);
        assert_eq!(s.ids(), (0..4).map(EngineId).collect::<Vec<_>>());
    }

    #[test]
    fn a_direct_job_sends_one_frame_per_engine_process() {
        let (mut s, mut c, now) = cluster_with(&[2, 2]);
        let info = submit(&mut s, &mut c, Targets::All, now);
        assert_eq!(info.tasks.len(), 4);
        assert_eq!(c.to_engines.len(), 2, "one Run frame per engine connection");
        assert_eq!(c.recorded_jobs, 1);
        for (_, msg) in &c.to_engines {
            let ControllerToEngine::Run { tasks: batch, .. } = msg else {
                panic!("{msg:?}")
            };
            assert_eq!(batch.len(), 2);
        }
    }

    #[test]
    fn results_reach_the_submitter_and_later_subscribers() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        let info = submit(&mut s, &mut c, Targets::All, now);
        let (t0, e0) = info.tasks[0];
        s.on_engine_message(
            &mut c,
            ConnId(0),
            EngineToController::Done(vec![ok(t0, e0, 0)]),
            now,
        );
        assert!(matches!(
            c.to_clients.last(),
            Some((CLIENT, ControllerToClient::Results { results, .. })) if results.len() == 1
        ));
        assert_eq!(s.status().engines[0].tasks_done, 1);
        assert_eq!(s.status().engines[1].state, EngineState::Busy);

        // The submitter leaves; another client attaches and gets what is in, then the rest.
        s.on_client_gone(CLIENT);
        let other = ConnId(200);
        s.on_client_connected(other);
        c.to_clients.clear();
        s.on_client_request(
            &mut c,
            other,
            9,
            ClientRequest::Subscribe { job: info.job },
            now,
        );
        assert!(matches!(
            c.to_clients[0].1,
            ControllerToClient::Reply {
                id: 9,
                body: Reply::Job(_)
            }
        ));
        assert!(
            matches!(&c.to_clients[1].1, ControllerToClient::Results { results, .. } if results.len() == 1)
        );
        let (t1, e1) = info.tasks[1];
        s.on_engine_message(
            &mut c,
            ConnId(0),
            EngineToController::Done(vec![ok(t1, e1, 1)]),
            now,
        );
        assert_eq!(c.to_clients.len(), 3);
        assert!(c.to_clients.iter().all(|(conn, _)| *conn == other));
        assert_eq!(c.recorded_results, 2);
    }

    #[test]
    fn an_engine_missing_two_heartbeats_is_lost_and_its_work_fails_with_the_reason() {
        let (mut s, mut c, now) = cluster_with(&[1, 1]);
        let info = submit(&mut s, &mut c, Targets::All, now);
        // Engine connection 1 keeps beating; connection 0 goes silent.
        let later = now + Duration::from_millis(1500);
        s.on_engine_message(&mut c, ConnId(1), EngineToController::Heartbeat, later);
        s.on_tick(&mut c, later);
        assert_eq!(s.ids().len(), 2, "one missed heartbeat is not yet lost");
        let much_later = now + Duration::from_millis(2600);
        s.on_engine_message(&mut c, ConnId(1), EngineToController::Heartbeat, much_later);
        s.on_tick(&mut c, much_later);
        assert_eq!(s.ids(), vec![EngineId(1)]);
        assert_eq!(c.closed, vec![ConnId(0)]);
        let failed = c
            .to_clients
            .iter()
            .find_map(|(_, m)| match m {
                ControllerToClient::Results { results, .. } => Some(results[0].clone()),
                ControllerToClient::Reply { .. } => None,
            })
            .expect("the lost engine's task is reported");
        assert_eq!(failed.task, info.tasks[0].0);
        let Outcome::Err(e) = failed.outcome else {
            panic!()
        };
        assert_eq!(e.ename, "EngineLost");
        assert!(
            e.evalue.contains("engine 0 (node node0") && e.evalue.contains("no heartbeat"),
            "{}",
            e.evalue
        );
    }

    #[test]
    fn wait_engines_answers_on_registration_or_times_out_with_a_count() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        s.on_client_request(
            &mut c,
            CLIENT,
            5,
            ClientRequest::WaitEngines {
                count: 3,
                timeout_ms: 1000,
            },
            now,
        );
        assert!(c.to_clients.is_empty());
        s.on_engine_connected(ConnId(7), now);
        let reg = EngineToController::Register {
            node: "n".into(),
            host: "h".into(),
            pid: 3,
            engines: vec![
                EngineSlot {
                    slot: 0,
                    kernel_pid: 1,
                },
                EngineSlot {
                    slot: 1,
                    kernel_pid: 2,
                },
            ],
        };
        s.on_engine_message(&mut c, ConnId(7), reg, now);
        assert!(
            matches!(&c.to_clients[0].1, ControllerToClient::Reply { id: 5, body: Reply::Ids(ids) } if ids.len() == 3)
        );

        s.on_client_request(
            &mut c,
            CLIENT,
            6,
            ClientRequest::WaitEngines {
                count: 9,
                timeout_ms: 1000,
            },
            now,
        );
        s.on_tick(&mut c, now + Duration::from_millis(500));
        assert_eq!(c.to_clients.len(), 1);
        s.on_engine_message(
            &mut c,
            ConnId(0),
            EngineToController::Heartbeat,
            now + Duration::from_millis(1001),
        );
        s.on_engine_message(
            &mut c,
            ConnId(7),
            EngineToController::Heartbeat,
            now + Duration::from_millis(1001),
        );
        s.on_tick(&mut c, now + Duration::from_millis(1001));
        assert!(
            matches!(&c.to_clients[1].1, ControllerToClient::Reply { id: 6, body: Reply::Error(e) } if e.contains("only 3 of 9"))
        );
    }

    #[test]
    fn unknown_targets_and_jobs_are_clear_errors() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        let spec = JobSpec::Direct {
            targets: Targets::Ids(vec![EngineId(5)]),
            work: Work::Execute { code: "1".into() },
        };
        s.on_client_request(&mut c, CLIENT, 1, ClientRequest::Submit(spec), now);
        assert!(
            matches!(&c.to_clients[0].1, ControllerToClient::Reply { body: Reply::Error(e), .. } if e == "there is no engine 5; the engines are [0, 1]")
        );
        s.on_client_request(
            &mut c,
            CLIENT,
            2,
            ClientRequest::Subscribe { job: JobId(42) },
            now,
        );
        assert!(
            matches!(&c.to_clients[1].1, ControllerToClient::Reply { body: Reply::Error(e), .. } if e.contains("no job 42"))
        );
        assert!(c.to_engines.is_empty());
    }

    fn map_spec(n: usize, chunksize: Option<u32>) -> JobSpec {
        JobSpec::Map {
            mapper: Mapper::Python(crate::proto::Func::Expr("lambda x: x".into())),
            items: (0..n as i64).map(Value::from).collect(),
            chunksize,
        }
    }

    /// The client submits a load-balanced map of `n` items as request `id`.
    fn submit_map(
        s: &mut State,
        c: &mut Recorder,
        id: u64,
        n: usize,
        chunksize: Option<u32>,
        now: Instant,
    ) {
        s.on_client_request(
            c,
            CLIENT,
            id,
            ClientRequest::Submit(map_spec(n, chunksize)),
            now,
        );
    }

    /// Every Run frame sent so far, as (engine process, assignments), and forgets them.
    fn runs(c: &mut Recorder) -> Vec<(ConnId, Vec<Assignment>, usize)> {
        c.to_engines
            .drain(..)
            .filter_map(|(conn, m)| match m {
                ControllerToEngine::Run { defs, tasks } => Some((conn, tasks, defs.len())),
                _ => None,
            })
            .collect()
    }

    fn items_of(a: &Assignment) -> usize {
        match &a.work {
            Work::MapChunk { items, .. } => items.len(),
            _ => 0,
        }
    }

    /// The engine finishes a map chunk, at `micros` per item.
    fn finish_chunk(s: &mut State, c: &mut Recorder, conn: ConnId, a: &Assignment, micros: u64) {
        let n = items_of(a);
        let r = TaskResult {
            task: a.task,
            engine: a.engine,
            first: a.first,
            outcome: Outcome::Items(vec![Ok(Value::from(0)); n]),
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            started: 1_000,
            completed: 1_000 + micros * n as u64,
        };
        s.on_engine_message(c, conn, EngineToController::Done(vec![r]), Instant::now());
    }

    #[test]
    fn a_load_balanced_map_is_one_submission_split_into_shrinking_chunks() {
        let (mut s, mut c, now) = cluster_with(&[1, 1]);
        let spec = map_spec(1000, None);
        s.on_client_request(&mut c, CLIENT, 1, ClientRequest::Submit(spec), now);
        let first = runs(&mut c);
        // Two tasks per engine up front, the mapper sent once per engine process.
        assert_eq!(first.len(), 2);
        assert!(first
            .iter()
            .all(|(_, tasks, defs)| tasks.len() == 2 && *defs == 1));
        let sizes: Vec<usize> = first
            .iter()
            .flat_map(|(_, t, _)| t.iter().map(items_of))
            .collect();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            250 + 188 + 141 + 106,
            "{sizes:?}"
        );

        // Finishing chunks hands out ever smaller ones until every item went out exactly once.
        let mut pending: Vec<(ConnId, Assignment)> = first
            .into_iter()
            .flat_map(|(conn, t, _)| t.into_iter().map(move |a| (conn, a)))
            .collect();
        let mut seen = vec![0u32; 1000];
        let mut last_size = usize::MAX;
        while let Some((conn, a)) = pending.pop() {
            for i in a.first..a.first + items_of(&a) as u64 {
                seen[i as usize] += 1;
            }
            finish_chunk(&mut s, &mut c, conn, &a, 10_000);
            for (conn, tasks, defs) in runs(&mut c) {
                assert_eq!(defs, 0, "the mapper is not sent twice");
                for a in tasks {
                    assert!(items_of(&a) <= last_size.max(items_of(&a)));
                    last_size = items_of(&a);
                    pending.push((conn, a));
                }
            }
        }
        assert!(seen.iter().all(|n| *n == 1));
        assert_eq!(last_size, 1, "the last chunks are single items");
        assert!(matches!(
            c.to_clients.last(),
            Some((_, ControllerToClient::Results { .. }))
        ));
        assert_eq!(s.jobs[&JobId(0)].remaining, 0);
    }

    #[test]
    fn cheap_tasks_are_prefetched_deeply_and_expensive_ones_stay_queued() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        submit_map(&mut s, &mut c, 1, 10_000, Some(1), now);
        let first = runs(&mut c);
        assert_eq!(
            first[0].1.len(),
            MIN_PREFETCH,
            "nothing is known of the cost yet"
        );
        // Cheap items (2 µs): the engine is given hundreds at once.
        finish_chunk(&mut s, &mut c, ConnId(0), &first[0].1[0], 2);
        let next = runs(&mut c);
        assert!(next[0].1.len() > 100, "{}", next[0].1.len());

        let (mut s, mut c, now) = cluster_with(&[1]);
        submit_map(&mut s, &mut c, 1, 100, Some(1), now);
        let first = runs(&mut c);
        // Expensive items (1 s): one more task to replace the finished one, no more.
        finish_chunk(&mut s, &mut c, ConnId(0), &first[0].1[0], 1_000_000);
        assert_eq!(runs(&mut c)[0].1.len(), 1);
        // One finished, one running, the rest waits (the prefetched one included).
        assert_eq!(s.status().running, 1);
        assert_eq!(s.status().queued, 100 - 2);
    }

    #[test]
    fn a_direct_map_splits_items_contiguously_one_chunk_per_target() {
        let (mut s, mut c, now) = cluster_with(&[3]);
        let spec = JobSpec::DirectMap {
            targets: Targets::All,
            mapper: Mapper::Shell("echo {}".into()),
            items: (0..10).map(Value::from).collect(),
        };
        s.on_client_request(&mut c, CLIENT, 1, ClientRequest::Submit(spec), now);
        let (_, tasks, defs) = runs(&mut c).remove(0);
        assert_eq!(defs, 1);
        let chunks: Vec<(u64, usize)> = tasks.iter().map(|a| (a.first, items_of(a))).collect();
        assert_eq!(chunks, vec![(0, 4), (4, 3), (7, 3)]);
    }

    #[test]
    fn split_is_even_and_contiguous() {
        let v: Vec<u32> = (0..7).collect();
        let parts: Vec<&[u32]> = split(&v, 3).collect();
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4], &[5, 6]]);
        assert_eq!(split(&v, 10).filter(|p| !p.is_empty()).count(), 7);
    }

    #[test]
    fn a_direct_map_with_fewer_items_than_engines_completes_whatever_the_order() {
        let (mut s, mut c, now) = cluster_with(&[3]);
        let spec = JobSpec::DirectMap {
            targets: Targets::All,
            mapper: Mapper::Python(crate::proto::Func::Expr("lambda x: x".into())),
            items: vec![Value::from(7)],
        };
        s.on_client_request(&mut c, CLIENT, 1, ClientRequest::Submit(spec), now);
        let (_, tasks, _) = runs(&mut c).remove(0);
        assert_eq!(tasks.len(), 1, "engines with no items get no task");
        c.to_clients.clear();
        finish_chunk(&mut s, &mut c, ConnId(0), &tasks[0], 1);
        assert!(matches!(
            &c.to_clients[..],
            [(CLIENT, ControllerToClient::Results { .. })]
        ));
        assert!(s.jobs[&JobId(0)].subscribers.is_empty());
    }

    #[test]
    fn finished_jobs_are_forgotten_beyond_the_memory_bound_with_a_clear_answer() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        for _ in 0..=KEEP_FINISHED_JOBS {
            let info = submit(&mut s, &mut c, Targets::All, now);
            let (t, e) = info.tasks[0];
            s.on_engine_message(
                &mut c,
                ConnId(0),
                EngineToController::Done(vec![ok(t, e, 0)]),
                now,
            );
        }
        assert_eq!(s.jobs.len(), KEEP_FINISHED_JOBS);
        c.to_clients.clear();
        s.on_client_request(
            &mut c,
            CLIENT,
            3,
            ClientRequest::Subscribe { job: JobId(0) },
            now,
        );
        s.on_client_request(
            &mut c,
            CLIENT,
            4,
            ClientRequest::Subscribe { job: JobId(1) },
            now,
        );
        assert!(
            matches!(&c.to_clients[0].1, ControllerToClient::Reply { body: Reply::Error(e), .. } if e.contains("no longer held"))
        );
        assert!(matches!(
            &c.to_clients[1].1,
            ControllerToClient::Reply {
                body: Reply::Job(_),
                ..
            }
        ));
        assert_eq!(s.status().jobs, KEEP_FINISHED_JOBS as u64 + 1);
    }

    #[test]
    fn large_results_are_held_up_to_a_byte_bound_and_the_last_job_always() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        let big = bytes::Bytes::from(vec![7u8; 30 << 20]);
        let jobs = 12;
        for _ in 0..jobs {
            let info = submit(&mut s, &mut c, Targets::All, now);
            let (t, e) = info.tasks[0];
            let mut r = ok(t, e, 0);
            r.outcome = Outcome::Ok {
                value: Value::Pickle {
                    repr: "b'...'".into(),
                    bytes: big.clone(),
                    buffers: Vec::new(),
                    json: None,
                },
                display: None,
            };
            s.on_engine_message(&mut c, ConnId(0), EngineToController::Done(vec![r]), now);
        }
        assert!(
            s.finished_bytes <= KEEP_FINISHED_BYTES,
            "{}",
            s.finished_bytes
        );
        assert_eq!(s.jobs.len(), KEEP_FINISHED_BYTES / (30 << 20));
        assert!(s.jobs.contains_key(&JobId(jobs - 1)));

        // One job larger than the whole bound is still there for `starling result`.
        let (mut s, mut c, now) = cluster_with(&[1]);
        let info = submit(&mut s, &mut c, Targets::All, now);
        let (t, e) = info.tasks[0];
        let mut r = ok(t, e, 0);
        r.stdout = "x".repeat(KEEP_FINISHED_BYTES + 1);
        s.on_engine_message(&mut c, ConnId(0), EngineToController::Done(vec![r]), now);
        assert!(s.jobs.contains_key(&JobId(0)));
    }

    #[test]
    fn an_engine_that_cannot_start_fails_waiters_before_and_after_it_said_so() {
        let (mut s, mut c, now) = cluster_with(&[]);
        let wait = |s: &mut State, c: &mut Recorder, id| {
            s.on_client_request(
                c,
                CLIENT,
                id,
                ClientRequest::WaitEngines {
                    count: 1,
                    timeout_ms: 60_000,
                },
                now,
            );
        };
        wait(&mut s, &mut c, 1);
        s.on_engine_connected(ConnId(5), now);
        let cannot = EngineToController::CannotStart {
            node: "node000".into(),
            host: "127.0.0.1".into(),
            slot: 0,
            reason: "cannot start `/nonexistent/python3`".into(),
        };
        s.on_engine_message(&mut c, ConnId(5), cannot, now);
        // A waiter that asks only now hears it too, at once.
        wait(&mut s, &mut c, 2);
        let errors: Vec<u64> = c
            .to_clients
            .iter()
            .filter_map(|(_, m)| match m {
                ControllerToClient::Reply {
                    id,
                    body: Reply::Error(e),
                } if e.contains("engine 0 of node node000 (127.0.0.1) cannot start") => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(errors, vec![1, 2]);
        assert_eq!(s.status().lost.len(), 1);
    }

    fn failed_items(c: &Recorder) -> usize {
        c.to_clients
            .iter()
            .filter_map(|(_, m)| match m {
                ControllerToClient::Results { results, .. } => Some(
                    results
                        .iter()
                        .map(|r| match &r.outcome {
                            Outcome::Items(items) => items.iter().filter(|i| i.is_err()).count(),
                            Outcome::Err(_) => 1,
                            Outcome::Ok { .. } => 0,
                        })
                        .sum::<usize>(),
                ),
                ControllerToClient::Reply { .. } => None,
            })
            .sum()
    }

    #[test]
    fn a_lost_engines_balanced_work_waits_for_an_engine_and_fails_only_when_none_comes() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        submit_map(&mut s, &mut c, 1, 100, Some(1), now);
        c.to_clients.clear();
        s.on_engine_gone(&mut c, ConnId(0), "its connection closed", now);
        assert_eq!(
            failed_items(&c),
            0,
            "nothing fails while an engine may come back"
        );
        assert_eq!(s.status().queued, 100);
        s.on_tick(&mut c, now + ORPHAN_GRACE / 2);
        assert_eq!(failed_items(&c), 0);
        s.on_tick(&mut c, now + ORPHAN_GRACE + Duration::from_secs(1));
        assert_eq!(
            failed_items(&c),
            100,
            "the two assigned items and the 98 queued ones"
        );
        assert_eq!(s.jobs[&JobId(0)].remaining, 0);
        assert_eq!(s.status().queued, 0);
    }

    #[test]
    fn an_engine_that_comes_back_gets_its_id_and_the_work_it_lost_first() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        submit_map(&mut s, &mut c, 1, 100, Some(1), now);
        c.to_engines.clear();
        s.on_engine_gone(&mut c, ConnId(0), "its connection closed", now);
        assert!(s.ids().is_empty());
        // The same node's slots register again, from a new connection.
        s.on_engine_connected(ConnId(9), now);
        let reg = EngineToController::Register {
            node: "node0".into(),
            host: "127.0.0.1".into(),
            pid: 4,
            engines: vec![EngineSlot {
                slot: 1,
                kernel_pid: 5,
            }],
        };
        s.on_engine_message(&mut c, ConnId(9), reg, now);
        assert_eq!(s.ids(), vec![EngineId(1)], "slot 1 had id 1");
        let run = runs(&mut c);
        let firsts: Vec<u64> = run[0].1.iter().map(|a| a.first).collect();
        // Engine 0 held items 0 and 2, engine 1 items 1 and 3: the lost ones go first.
        assert_eq!(&firsts[..2], &[0, 2], "{firsts:?}");
        let st = s.status();
        assert_eq!(st.engines[0].returns, 1);
        assert_eq!(st.lost.len(), 1, "slot 0 is still gone: {:?}", st.lost);
        assert_eq!(st.lost[0].id, Some(EngineId(0)));
        assert_eq!(failed_items(&c), 0);
    }

    #[test]
    fn engines_are_told_to_forget_a_finished_maps_function() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        submit_map(&mut s, &mut c, 1, 2, Some(2), now);
        let (_, tasks, defs) = runs(&mut c).remove(0);
        assert_eq!(defs, 1);
        finish_chunk(&mut s, &mut c, ConnId(0), &tasks[0], 1);
        assert!(c
            .to_engines
            .iter()
            .any(|(_, m)| *m == ControllerToEngine::Forget(vec![JobId(0)])));
        // A later map sends its own function again.
        submit_map(&mut s, &mut c, 2, 2, Some(2), now);
        assert_eq!(runs(&mut c)[0].2, 1);
    }

    #[test]
    fn a_controller_that_was_itself_stalled_does_not_declare_its_engines_lost() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        s.on_tick(&mut c, now);
        // Nothing ticked, nothing was read for 5 s; then the clock comes back first.
        let later = now + Duration::from_secs(5);
        s.on_tick(&mut c, later);
        assert_eq!(
            s.ids().len(),
            1,
            "a stall of the controller is not the engine's fault"
        );
        // The engine really is silent: lost on the next ticks, once it had its chance.
        let mut t = later;
        while s.ids().len() == 1 && t < later + Duration::from_secs(5) {
            t += Duration::from_millis(250);
            s.on_tick(&mut c, t);
        }
        assert!(s.ids().is_empty());
        assert!(t - later <= Duration::from_millis(1750), "{:?}", t - later);
    }
}
