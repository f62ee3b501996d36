//! The controller's logic, free of I/O.
//!
//! Every event — a client request, an engine message, a lost connection, a clock tick — is one
//! synchronous `on_*` call on [`State`]; the only way out is the [`Comm`] trait. The socket
//! code in [`super`] feeds events in; tests feed them directly and read what came out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Read, Recovered};
use crate::proto::{
    now_micros, Assignment, ClientRequest, ClusterStatus, ControllerToClient, ControllerToEngine,
    Dependency, EngineId, EngineSlot, EngineState, EngineStatus, EngineToController, JobId,
    JobInfo, JobKind, JobOptions, JobSpec, LostEngine, Mapper, Outcome, RemoteError, Reply,
    Targets, TaskId, TaskResult, Value, Work,
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
/// A map's queue of items not yet handed out is shrunk once it is a quarter full, from this
/// capacity on.
const SHRINK_FROM: usize = 4096;
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
/// How long after a restart the engines the controller knew before are expected back: until
/// then, work that is to follow jobs onto them waits for them.
pub const RESTART_GRACE: Duration = Duration::from_secs(60);
/// Job ids are reserved in the task store this many at a time, each block on disk before its
/// first id is given out: a controller that is killed and started again never hands out an id
/// twice, and skips at most this many.
const JOB_ID_BLOCK: u64 = 100;

/// One connection, client or engine, as the controller numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What the controller's logic can do to the world.
pub trait Comm {
    fn to_client(&mut self, conn: ConnId, msg: ControllerToClient);
    fn to_engine(&mut self, conn: ConnId, msg: ControllerToEngine);
    /// Drops a connection (an engine declared lost).
    fn close(&mut self, conn: ConnId);
    /// Records a submitted job in the task store (which summarises and encodes the spec on
    /// its own thread).
    fn record_job(&mut self, info: &JobInfo, spec: JobSpec, options: &JobOptions);
    /// Records finished tasks in the task store.
    fn record_results(&mut self, job: JobId, results: &[TaskResult]);
    /// Records that a job's last task is in: its status, first error, and where it ran.
    fn record_ended(
        &mut self,
        job: JobId,
        status: &'static str,
        error: Option<&str>,
        ran_on: &[EngineId],
    );
    /// Asks the task store; the answer goes to the client as the reply to request `id`.
    fn read_store(&mut self, conn: ConnId, id: u64, read: Read);
    /// Records new engine ids of node slots; returns once they are on disk.
    fn record_engines(&mut self, ids: &[(String, u32, EngineId)]);
    /// Asks the task store to reserve job ids below `upto` (without waiting), and makes sure
    /// that ids below `needed` are reserved on disk, waiting if they are not yet; false if the
    /// store cannot record that.
    fn reserve_jobs(&mut self, upto: u64, needed: u64) -> bool;
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
    /// Its kernel's MPI rank, on an MPI cluster.
    rank: Option<u32>,
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
    options: JobOptions,
    /// Waiting for its dependencies: nothing of it has been handed out.
    waiting: bool,
    /// How many of the jobs it depends on have not ended.
    pending: usize,
    /// The tasks of a direct job that waits for its dependencies, to send once they are met.
    held: Vec<Assignment>,
    /// Where it may run (`follow`); anywhere when `None`.
    allowed: Option<BTreeSet<EngineId>>,
    /// When its unfinished tasks time out.
    deadline: Option<Instant>,
    /// The engines that ran its tasks.
    ran_on: BTreeSet<EngineId>,
    /// Why it failed, if a task did: its first error.
    failure: Option<Arc<str>>,
    /// How it ended, for the store: `ok` until a task fails.
    status: &'static str,
}

impl Job {
    /// A job of `info` that nothing has happened to yet: every slot to fill, nobody waiting.
    fn new(info: JobInfo, options: JobOptions) -> Self {
        Self {
            remaining: info.slots,
            info,
            done: Vec::new(),
            subscribers: Vec::new(),
            mapper: None,
            feed: None,
            item_micros: None,
            bytes: 0,
            options,
            waiting: false,
            pending: 0,
            held: Vec::new(),
            allowed: None,
            deadline: None,
            ran_on: BTreeSet::new(),
            failure: None,
            status: "ok",
        }
    }

    /// Takes note of a finished task: where it ran, and the job's first failure.
    fn took(&mut self, result: &TaskResult) {
        if first_error(&result.outcome)
            .map_or(true, |e| !CONTROLLER_ERRORS.contains(&e.ename.as_str()))
        {
            self.ran_on.insert(result.engine);
        }
        if self.failure.is_none() {
            if let Some(e) = first_error(&result.outcome) {
                self.status = match e.ename.as_str() {
                    "TaskAborted" => "aborted",
                    "TaskTimeout" => "timeout",
                    "ImpossibleDependency" => "impossible",
                    _ => "failed",
                };
                self.failure = Some(if e.ename == "ImpossibleDependency" {
                    e.evalue.as_str().into()
                } else if result.engine == EngineId::NONE {
                    e.to_string().into()
                } else {
                    format!("{e}, on engine {}", result.engine).into()
                });
            }
        }
    }
}

/// How a job ended, kept for every job (a few bytes each) so dependencies on it can be judged
/// long after its results are forgotten.
#[derive(Debug)]
struct Ended {
    ok: bool,
    engines: Box<[EngineId]>,
    /// For a failed job: why, in a few words, for the errors of the jobs that depended on it.
    why: Option<Arc<str>>,
}

/// Whether a job's dependencies are met.
enum Readiness {
    /// It can run — where, for `follow`.
    Ready(Option<BTreeSet<EngineId>>),
    Waiting,
    /// They can no longer be met: why.
    Impossible(String),
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

/// A load-balanced chunk that runs again elsewhere: its first slot, its items, and its past.
#[derive(Debug)]
struct Requeued {
    first: u64,
    items: Vec<Value>,
    past: Past,
}

/// What happened to a load-balanced chunk before: how often its engine was lost (or its kernel
/// died) under it, how often it raised and was retried, and the engines where it raised.
#[derive(Debug, Clone, Default)]
struct Past {
    lost: u32,
    retried: u32,
    /// Handed out before a controller restart, without a result: not counted against
    /// `task_attempts`, since the engines were not at fault.
    restarted: u32,
    avoid: Vec<EngineId>,
    /// The node its engine was lost with: its other engines are likely going the same way
    /// (a node that dies takes its engines one connection at a time), so the work goes to
    /// another node's engine while there is one.
    lost_node: Option<String>,
}

impl Past {
    /// How many times the chunk was handed out, this time included.
    fn attempts(&self) -> u32 {
        1 + self.lost + self.retried + self.restarted
    }
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
    /// A load-balanced chunk keeps its items and its past, so it can run again elsewhere.
    balanced: Option<(Vec<Value>, Past)>,
}

impl TaskRef {
    fn attempts(&self) -> u32 {
        self.balanced.as_ref().map_or(1, |(_, p)| p.attempts())
    }
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
    /// About how many bytes of results the jobs not yet ended hold: finished jobs' results
    /// give way to them.
    running_bytes: usize,
    waiting: Vec<WaitEngines>,
    /// Since when no engine has been registered, the engine to blame (the last one lost) and
    /// why there is none.
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
    /// How every finished job ended.
    ended: HashMap<JobId, Ended>,
    /// Jobs waiting for a job to end, by that job.
    dependents: HashMap<JobId, Vec<JobId>>,
    /// Jobs that just ended, whose dependents are still to be looked at.
    just_ended: Vec<JobId>,
    /// Jobs submitted with dependencies that cannot be met, to fail once their submitter has
    /// its reply.
    impossible: Vec<(JobId, String)>,
    next_engine: u32,
    next_job: u64,
    /// Job ids below this are reserved in the task store.
    reserved_jobs: u64,
    /// After a restart, until when the engines known before it are expected back.
    awaiting_until: Option<Instant>,
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
            running_bytes: 0,
            waiting: Vec::new(),
            orphaned: None,
            slot_ids: HashMap::new(),
            lost: BTreeMap::new(),
            cannot_start: BTreeMap::new(),
            returns: HashMap::new(),
            ended: HashMap::new(),
            dependents: HashMap::new(),
            just_ended: Vec::new(),
            impossible: Vec::new(),
            next_engine: 0,
            next_job: 0,
            reserved_jobs: 0,
            awaiting_until: None,
            next_task: 0,
        }
    }

    /// The id the next job gets.
    pub fn next_job(&self) -> JobId {
        JobId(self.next_job)
    }

    /// Whether a job was submitted here (or restored) and has not ended; one that waits for
    /// its dependencies has not.
    pub fn is_unfinished(&self, job: JobId) -> bool {
        self.jobs.get(&job).is_some_and(|j| j.remaining > 0)
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
            ClientRequest::Submit { spec, options, .. } => {
                match self.submit(comm, conn, spec, *options, now) {
                    Ok(info) => {
                        reply(comm, Reply::Job(info));
                        self.after_change(comm, now);
                    }
                    Err(e) => reply(comm, Reply::Error(e)),
                }
            }
            ClientRequest::Abort { job, interrupt } => match self.abort(comm, job, interrupt) {
                Ok(()) => {
                    reply(comm, Reply::Done);
                    self.after_change(comm, now);
                }
                Err(e) => reply(comm, Reply::Error(e)),
            },
            ClientRequest::Interrupt { targets } => match targets.resolve(&self.ids()) {
                Ok(chosen) => {
                    let mut per_conn: BTreeMap<ConnId, Vec<EngineId>> = BTreeMap::new();
                    for id in &chosen {
                        per_conn.entry(self.engines[id].conn).or_default().push(*id);
                    }
                    for (econn, ids) in per_conn {
                        comm.to_engine(econn, ControllerToEngine::Interrupt(ids));
                    }
                    reply(comm, Reply::Ids(chosen));
                }
                Err(e) => reply(comm, Reply::Error(e)),
            },
            ClientRequest::Subscribe { job } => match self.jobs.get_mut(&job) {
                // Finished and forgotten here: the store has it.
                None if job.0 < self.next_job => comm.read_store(conn, id, Read::Job(job)),
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
            ClientRequest::History { filter, limit } => {
                comm.read_store(conn, id, Read::History { filter, limit });
            }
            ClientRequest::Request { job } => comm.read_store(conn, id, Read::Request(job)),
            ClientRequest::Purge { filter } => {
                if let Err(e) = super::store::where_clause(&filter) {
                    reply(comm, Reply::Error(e));
                    return;
                }
                // The finished results held here are a cache of the store's: dropped whole, so
                // nothing purged is still answered from memory (the rest is read back).
                for job in std::mem::take(&mut self.finished) {
                    self.jobs.remove(&job);
                }
                self.finished_slots = 0;
                self.finished_bytes = 0;
                comm.read_store(conn, id, Read::Purge { filter });
            }
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

    /// Refuses options that cannot work, before anything is made.
    fn check_options(&self, spec: &JobSpec, options: &JobOptions) -> Result<(), String> {
        let balanced = matches!(spec, JobSpec::Map { .. });
        if !balanced && options.follow.is_some() {
            return Err("follow places load-balanced work (map, or apply without --targets); direct work already names its engines".into());
        }
        if !balanced && options.engines.is_some() {
            return Err("a load-balanced view's targets place load-balanced work; direct work already names its engines".into());
        }
        if !balanced && options.retries > 0 {
            return Err("retries apply to load-balanced work (map, or apply without --targets); direct work runs once on each target".into());
        }
        if options.timeout_ms == Some(0) {
            return Err("the timeout must be more than 0 seconds".into());
        }
        for dep in options.after.iter().chain(&options.follow) {
            for j in &dep.jobs {
                if j.0 >= self.next_job {
                    return Err(format!(
                        "there is no job {j} on cluster '{}' to depend on (the last job is {}); dependencies name jobs already submitted",
                        self.cluster,
                        self.next_job.checked_sub(1).map_or("none yet".to_string(), |n| n.to_string())
                    ));
                }
            }
        }
        Ok(())
    }

    /// How `dep` stands now; with `place`, where its jobs ran (for `follow`).
    fn judge(&self, dep: &Dependency, place: bool) -> Readiness {
        let mut met: Vec<&Ended> = Vec::new();
        let mut unmet = None;
        let mut pending = false;
        for j in &dep.jobs {
            match self.ended.get(j) {
                None if !self.jobs.contains_key(j) => {
                    // Purged, or lost with a controller that was killed before it recorded it.
                    if unmet.is_none() {
                        unmet = Some(format!(
                            "job {j} is not known to this controller (purged from its task store, or lost when an earlier controller was killed before recording it)"
                        ));
                    }
                }
                None => pending = true,
                Some(e) if (e.ok && dep.success) || (!e.ok && dep.failure) => met.push(e),
                Some(e) => {
                    if unmet.is_none() {
                        unmet = Some(match &e.why {
                            Some(why) => format!("job {j} failed ({why})"),
                            None if !dep.success => format!(
                                "job {j} succeeded, and only its failure was to be waited for"
                            ),
                            None => format!("job {j} did not end as required"),
                        });
                    }
                }
            }
        }
        let where_met = || {
            let mut sets = met
                .iter()
                .map(|e| e.engines.iter().copied().collect::<BTreeSet<_>>());
            let first = sets.next().unwrap_or_default();
            sets.fold(first, |acc, s| {
                if dep.all {
                    acc.intersection(&s).copied().collect()
                } else {
                    acc.union(&s).copied().collect()
                }
            })
        };
        if dep.all {
            match (unmet, pending) {
                (Some(why), _) => Readiness::Impossible(why),
                (None, true) => Readiness::Waiting,
                (None, false) => Readiness::Ready(place.then(where_met)),
            }
        } else if !met.is_empty() || dep.jobs.is_empty() {
            Readiness::Ready(place.then(where_met))
        } else if pending {
            Readiness::Waiting
        } else {
            Readiness::Impossible(unmet.unwrap_or_default())
        }
    }

    /// Whether a job's `after` and `follow` are met, and where it may run.
    fn readiness(&self, options: &JobOptions) -> Readiness {
        let after = options
            .after
            .as_ref()
            .map_or(Readiness::Ready(None), |d| self.judge(d, false));
        let follow = options
            .follow
            .as_ref()
            .map_or(Readiness::Ready(None), |d| self.judge(d, true));
        match (after, follow) {
            (Readiness::Impossible(why), _) | (_, Readiness::Impossible(why)) => {
                Readiness::Impossible(why)
            }
            (Readiness::Waiting, _) | (_, Readiness::Waiting) => Readiness::Waiting,
            (Readiness::Ready(_), Readiness::Ready(None)) => Readiness::Ready(None),
            (Readiness::Ready(_), Readiness::Ready(Some(engines))) => {
                let dep = options.follow.as_ref().expect("follow was judged");
                if engines.iter().any(|e| self.reachable(*e)) {
                    Readiness::Ready(Some(engines))
                } else if engines.is_empty() {
                    Readiness::Impossible(format!(
                        "no engine ran {} of jobs {:?}, so there is nowhere to follow them",
                        if dep.all { "all" } else { "any" },
                        dep.jobs.iter().map(|j| j.0).collect::<Vec<_>>()
                    ))
                } else {
                    Readiness::Impossible(format!(
                        "the engines where it was to follow jobs {:?} ({}) are gone",
                        dep.jobs.iter().map(|j| j.0).collect::<Vec<_>>(),
                        crate::proto::format_ids(&engines.iter().copied().collect::<Vec<_>>())
                    ))
                }
            }
        }
    }

    /// Whether work placed on engine `id` can run: it is registered, or expected back.
    fn reachable(&self, id: EngineId) -> bool {
        self.engines.contains_key(&id) || self.awaited(id)
    }

    /// Whether `id` is an engine the controller knew before it was restarted and has not
    /// heard from since (every engine lost while it ran is in `lost`): it is expected back, for
    /// [`RESTART_GRACE`] after the restart.
    fn awaited(&self, id: EngineId) -> bool {
        self.awaiting_until.is_some()
            && !self.engines.contains_key(&id)
            && self.slot_ids.values().any(|v| *v == id)
            && !self.lost.values().any(|l| l.id == Some(id))
    }

    fn submit(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        spec: JobSpec,
        options: JobOptions,
        now: Instant,
    ) -> Result<JobInfo, String> {
        self.check_options(&spec, &options)?;
        let mut options = options;
        if let Some(t) = &options.engines {
            // Kept as ids: the engines it names now, whatever joins or leaves later.
            options.engines = Some(Targets::Ids(t.resolve(&self.ids())?));
        }
        let job = JobId(self.next_job);
        // Per target: the work and how many result slots it fills.
        let (kind, targets, mut per_target, mapper, feed): (JobKind, _, Vec<(Work, u64)>, _, _) =
            match &spec {
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
        // The id must be reserved on disk before anyone hears it; the next block is asked for
        // while half of this one is left, so that waiting for the disk is rare.
        if self.next_job + 1 + JOB_ID_BLOCK / 2 > self.reserved_jobs {
            self.reserved_jobs = self.next_job + 1 + JOB_ID_BLOCK;
        }
        if !comm.reserve_jobs(self.reserved_jobs, self.next_job + 1) {
            return Err("the task store cannot record jobs (the controller's log says why); nothing was submitted".into());
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
        let readiness = self.readiness(&options);
        let ready = matches!(readiness, Readiness::Ready(_));
        let mut held = Vec::new();
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
            let assignment = Assignment {
                task,
                engine: *engine_id,
                first: slot_first,
                work,
            };
            if !ready {
                held.push(assignment);
                continue;
            }
            let engine = self
                .engines
                .get_mut(engine_id)
                .expect("resolved ids are registered");
            engine.assigned.push_back((task, n));
            engine.outstanding += n;
            per_conn.entry(engine.conn).or_default().push(assignment);
        }
        comm.record_job(&info, spec, &options);
        let empty = info.slots == 0;
        self.jobs.insert(
            job,
            Job {
                subscribers: if empty { Vec::new() } else { vec![conn] },
                mapper,
                feed: feed.filter(|f| !f.items.is_empty()),
                waiting: !ready,
                held,
                ..Job::new(info.clone(), options)
            },
        );
        if empty {
            comm.record_ended(job, "ok", None, &[]);
            self.job_ended(job);
            self.finished.push_back(job);
            self.forget_old_jobs();
            return Ok(info);
        }
        for (econn, tasks) in per_conn {
            let defs = self.defs_for(econn, &tasks);
            comm.to_engine(econn, ControllerToEngine::Run { defs, tasks });
        }
        self.settle(comm, job, readiness, now);
        Ok(info)
    }

    /// Acts on how a new (or restored) job's dependencies stand: it runs, waits for them, or
    /// fails — once its submitter has its reply (results before it would find no job).
    fn settle(&mut self, comm: &mut impl Comm, job: JobId, readiness: Readiness, now: Instant) {
        match readiness {
            Readiness::Ready(allowed) => self.release(comm, job, allowed, now),
            Readiness::Waiting => self.wait_for_dependencies(job),
            Readiness::Impossible(why) => self.impossible.push((job, why)),
        }
    }

    /// Files a waiting job under each dependency of it that has not ended yet.
    fn wait_for_dependencies(&mut self, job: JobId) {
        let Some(j) = self.jobs.get(&job) else {
            return;
        };
        let deps: BTreeSet<JobId> = j
            .options
            .after
            .iter()
            .chain(&j.options.follow)
            .flat_map(|d| d.jobs.iter().copied())
            .filter(|d| !self.ended.contains_key(d))
            .collect();
        if let Some(j) = self.jobs.get_mut(&job) {
            j.pending = deps.len();
            j.waiting = true;
        }
        for d in deps {
            self.dependents.entry(d).or_default().push(job);
        }
    }

    /// Takes up what the controller before this one left in the task store: numbering goes
    /// on where it stopped, node slots keep their engine ids, finished jobs still count for
    /// dependencies, and unfinished jobs are finished. A load-balanced map runs again the
    /// items that have no result yet (gaps first: they were out on engines); its dependencies
    /// and timeout are judged anew. Direct work without a result fails with
    /// `ControllerRestarted`: it may have run on its engine, and running it again could do
    /// twice what was to be done once.
    pub fn restore(&mut self, comm: &mut impl Comm, recovered: Recovered, now: Instant) {
        self.next_job = self.next_job.max(recovered.next_job);
        self.reserved_jobs = self.next_job;
        self.awaiting_until = Some(now + RESTART_GRACE);
        self.next_task = self.next_task.max(recovered.next_task);
        self.next_engine = self.next_engine.max(recovered.next_engine);
        for (node, slot, id) in recovered.slot_ids {
            self.next_engine = self.next_engine.max(id.0 + 1);
            self.slot_ids.insert((node, slot), id);
        }
        for e in recovered.ended {
            self.ended.insert(
                e.job,
                Ended {
                    ok: e.ok,
                    engines: e.engines.into(),
                    why: e.why.map(Into::into),
                },
            );
        }
        let known_engines = self.slot_ids.len().max(1);
        let mut judge = Vec::new();
        let mut failed = Vec::new();
        let mut complete = Vec::new();
        let resumed = recovered.unfinished.len();
        for u in recovered.unfinished {
            let missing = missing_slots(&u.done, u.slots);
            let remaining: u64 = missing.iter().map(|(a, b)| b - a).sum();
            let (spec, options) = match u.request {
                Some((spec, options)) => (Some(spec), options),
                None => (None, JobOptions::default()),
            };
            let tasks = if u.kind.per_item() {
                Vec::new()
            } else {
                u.done.iter().map(|r| (r.task, r.engine)).collect()
            };
            let info = JobInfo {
                job: u.job,
                kind: u.kind,
                submitted: u.submitted,
                tasks,
                slots: u.slots,
            };
            let mut job = Job {
                bytes: u.done.iter().map(TaskResult::approx_bytes).sum(),
                remaining,
                ..Job::new(info, options)
            };
            for r in &u.done {
                job.took(r);
            }
            self.running_bytes += job.bytes;
            job.done = u.done;
            let kept = spec.is_some();
            if let Some(JobSpec::Map {
                mapper,
                items,
                chunksize,
            }) = spec
            {
                if items.len() as u64 == u.slots {
                    job.mapper = Some(mapper);
                    job.feed = Some(resumed_feed(items, &missing, chunksize, known_engines));
                } else {
                    tracing::error!(job = %u.job, "the store's request has {} items for {} slots; not resumed", items.len(), u.slots);
                }
            }
            let id = u.job;
            let balanced = job.feed.is_some();
            let waited =
                !balanced && kept && matches!(self.readiness(&job.options), Readiness::Waiting);
            self.jobs.insert(id, job);
            if remaining == 0 {
                // Every result was in; only its end had not been recorded.
                complete.push(id);
            } else if balanced {
                judge.push(id);
            } else {
                let why = if waited {
                    format!("the controller was restarted while job {id} waited for its dependencies, and direct work is not taken up again: `starling resubmit {id}` submits it anew")
                } else if kept {
                    format!("the controller was restarted before this task's result came in; it may have run: run it again if that is safe (`starling resubmit {id}` runs the whole job again)")
                } else {
                    format!("the controller was restarted before this task's result came in, and the task store did not keep job {id} whole (over 16 MiB, or written by another version), so it cannot be run again from there")
                };
                failed.extend(self.fail_slots(id, &missing, "ControllerRestarted", &why));
            }
        }
        for id in judge {
            let readiness = self.readiness(&self.jobs[&id].options);
            self.settle(comm, id, readiness, now);
        }
        for id in complete {
            self.end_job(comm, id);
        }
        self.finish_only(comm, failed);
        if resumed > 0 {
            tracing::info!(
                jobs = resumed,
                "unfinished jobs taken up from the task store"
            );
        }
        self.after_change(comm, now);
    }

    /// Failed results for the slots `ranges` of a job, which never got one: one task per
    /// range for a map, one per slot otherwise. They become part of the job's tasks.
    fn fail_slots(
        &mut self,
        job_id: JobId,
        ranges: &[(u64, u64)],
        ename: &str,
        why: &str,
    ) -> Vec<TaskResult> {
        let per_item = self
            .jobs
            .get(&job_id)
            .is_some_and(|j| j.info.kind.per_item());
        let pieces: Vec<(u64, u64)> = ranges
            .iter()
            .flat_map(|&(a, b)| {
                if per_item {
                    vec![(a, b - a)]
                } else {
                    (a..b).map(|i| (i, 1)).collect()
                }
            })
            .collect();
        let mut out = Vec::with_capacity(pieces.len());
        for (first, n) in pieces {
            let task = self.new_task(job_id, first, n);
            if let Some(j) = self.jobs.get_mut(&job_id).filter(|_| !per_item) {
                j.info.tasks.push((task, EngineId::NONE));
            }
            out.push(self.failed_result(task, EngineId::NONE, ename, why));
        }
        out
    }

    /// Lets a job run: its held direct tasks go to their engines (or fail, if an engine is
    /// gone), its load-balanced items join the queue, and its timeout starts.
    fn release(
        &mut self,
        comm: &mut impl Comm,
        job_id: JobId,
        allowed: Option<BTreeSet<EngineId>>,
        now: Instant,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.waiting = false;
        job.allowed = allowed.filter(|_| job.options.follow.is_some());
        if let Some(Targets::Ids(only)) = &job.options.engines {
            let only = only.iter().copied();
            job.allowed = Some(match job.allowed.take() {
                Some(followed) => only.filter(|e| followed.contains(e)).collect(),
                None => only.collect(),
            });
        }
        if let Some(allowed) = job.allowed.clone() {
            // Its engines may have gone while it waited, or follow and targets may not meet.
            if !allowed.iter().any(|e| self.reachable(*e)) {
                let why = if allowed.is_empty() {
                    "none of the engines where the jobs it follows ran is among its targets"
                        .to_string()
                } else {
                    format!(
                        "the engines it may run on ({}) are gone",
                        crate::proto::format_ids(&allowed.into_iter().collect::<Vec<_>>())
                    )
                };
                self.fail_impossible(comm, job_id, &why);
                return;
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.deadline = job
            .options
            .timeout_ms
            .map(|ms| now + Duration::from_millis(ms));
        let held = std::mem::take(&mut job.held);
        if job.feed.is_some() && !self.feeds.contains(&job_id) {
            self.feeds.push_back(job_id);
        }
        let mut per_conn: BTreeMap<ConnId, Vec<Assignment>> = BTreeMap::new();
        let mut failed = Vec::new();
        for a in held {
            let slots = self.tasks.get(&a.task).map_or(1, |t| t.slots);
            match self.engines.get_mut(&a.engine) {
                Some(engine) => {
                    engine.assigned.push_back((a.task, slots));
                    engine.outstanding += slots;
                    per_conn.entry(engine.conn).or_default().push(a);
                }
                None => {
                    let why = format!("engine {} was lost before the job could start", a.engine);
                    failed.push(self.failed_result(a.task, a.engine, "EngineLost", &why));
                }
            }
        }
        for (econn, tasks) in per_conn {
            let defs = self.defs_for(econn, &tasks);
            comm.to_engine(econn, ControllerToEngine::Run { defs, tasks });
        }
        if !failed.is_empty() {
            self.finish_only(comm, failed);
        }
    }

    /// A failed result for a task that never ran (or whose run is abandoned): every slot it
    /// fills gets `ename: why`. The task is taken out of the books.
    fn failed_result(
        &mut self,
        task: TaskId,
        engine: EngineId,
        ename: &str,
        why: &str,
    ) -> TaskResult {
        let (per_item, slots, first, attempts) = match self.tasks.get_mut(&task) {
            // A failure made here is final: it is not retried.
            Some(t) => (
                self.jobs
                    .get(&t.job)
                    .is_some_and(|j| j.info.kind.per_item()),
                t.slots,
                t.first,
                std::mem::take(&mut t.balanced).map_or(1, |(_, p)| p.attempts()),
            ),
            None => (false, 1, 0, 1),
        };
        let error = Box::new(RemoteError {
            ename: ename.into(),
            evalue: why.to_string(),
            traceback: String::new(),
        });
        let now = now_micros();
        TaskResult {
            task,
            engine,
            first,
            outcome: if per_item {
                Outcome::Items(vec![Err(error); slots as usize])
            } else {
                Outcome::Err(error)
            },
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            started: now,
            completed: now,
            attempts,
        }
    }

    /// Fails everything of a job that has not been handed to an engine: its held direct
    /// tasks and its queued load-balanced items.
    fn fail_unstarted(&mut self, job_id: JobId, ename: &str, why: &str) -> Vec<TaskResult> {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Vec::new();
        };
        let held = std::mem::take(&mut job.held);
        let feed = job.feed.take();
        // Nothing is left to wait for: its dependencies ending later changes nothing.
        job.waiting = false;
        self.feeds.retain(|j| *j != job_id);
        let mut failed: Vec<TaskResult> = held
            .into_iter()
            .map(|a| self.failed_result(a.task, a.engine, ename, why))
            .collect();
        if let Some(feed) = feed {
            let mut runs: Vec<(u64, u64, u32)> = feed
                .again
                .iter()
                .map(|r| (r.first, r.items.len() as u64, r.past.attempts() - 1))
                .collect();
            if !feed.items.is_empty() {
                runs.push((feed.next, feed.items.len() as u64, 0));
            }
            for (first, n, attempts) in runs {
                let task = self.new_task(job_id, first, n);
                let mut r = self.failed_result(task, EngineId::NONE, ename, why);
                r.attempts = attempts;
                failed.push(r);
            }
        }
        failed
    }

    /// Fails a job's tasks that engines hold: those queued there, and with `running` the ones
    /// running too, which are interrupted. Their engines are told to drop them.
    fn fail_assigned(
        &mut self,
        comm: &mut impl Comm,
        job_id: JobId,
        running: bool,
        ename: &str,
        why: &str,
    ) -> Vec<TaskResult> {
        let mut cancel: BTreeMap<ConnId, Vec<(EngineId, TaskId)>> = BTreeMap::new();
        let mut gone = Vec::new();
        for (id, engine) in &mut self.engines {
            let mut i = 0;
            while i < engine.assigned.len() {
                let (task, n) = engine.assigned[i];
                let ours = self.tasks.get(&task).is_some_and(|t| t.job == job_id);
                if ours && (running || i > 0) {
                    engine.assigned.remove(i);
                    engine.outstanding -= n;
                    cancel.entry(engine.conn).or_default().push((*id, task));
                    gone.push((task, *id));
                } else {
                    i += 1;
                }
            }
        }
        for (econn, tasks) in cancel {
            comm.to_engine(econn, ControllerToEngine::Cancel(tasks));
        }
        gone.into_iter()
            .map(|(task, engine)| {
                let mut r = self.failed_result(task, engine, ename, why);
                r.completed = now_micros();
                r
            })
            .collect()
    }

    /// A job whose dependencies can no longer be met fails at once, every task of it.
    fn fail_impossible(&mut self, comm: &mut impl Comm, job_id: JobId, why: &str) {
        let why = format!("job {job_id} cannot run: {why}");
        let failed = self.fail_unstarted(job_id, "ImpossibleDependency", &why);
        self.finish_only(comm, failed);
    }

    /// Drops the unstarted tasks of an unfinished job (they fail as `TaskAborted`); with
    /// `interrupt`, its running tasks too.
    fn abort(
        &mut self,
        comm: &mut impl Comm,
        job_id: JobId,
        interrupt: bool,
    ) -> Result<(), String> {
        if !self.jobs.get(&job_id).is_some_and(|j| j.remaining > 0) {
            return Err(if job_id.0 >= self.next_job {
                format!("there is no job {job_id} on cluster '{}'", self.cluster)
            } else {
                format!("job {job_id} has already finished; there is nothing to abort")
            });
        }
        let mut failed = self.fail_unstarted(
            job_id,
            "TaskAborted",
            &format!("job {job_id} was aborted before this task started"),
        );
        failed.extend(self.fail_assigned(
            comm,
            job_id,
            interrupt,
            "TaskAborted",
            &format!(
                "job {job_id} was aborted (queued tasks were dropped, running ones interrupted)"
            ),
        ));
        self.finish_only(comm, failed);
        Ok(())
    }

    /// Records how a job ended and queues its dependents to be looked at.
    fn job_ended(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        self.ended.insert(
            job_id,
            Ended {
                ok: job.failure.is_none(),
                engines: job.ran_on.iter().copied().collect(),
                why: job.failure.clone(),
            },
        );
        if self.dependents.contains_key(&job_id) {
            self.just_ended.push(job_id);
        }
    }

    /// After anything that can end jobs or free engines: jobs whose dependencies are now met
    /// are released (or failed, if they can no longer be), then engines with room get work.
    fn after_change(&mut self, comm: &mut impl Comm, now: Instant) {
        for (job, why) in std::mem::take(&mut self.impossible) {
            self.fail_impossible(comm, job, &why);
        }
        while let Some(ended) = self.just_ended.pop() {
            let ok = self.ended.get(&ended).is_some_and(|e| e.ok);
            for d in self.dependents.remove(&ended).unwrap_or_default() {
                let Some(job) = self.jobs.get_mut(&d).filter(|j| j.waiting) else {
                    continue;
                };
                job.pending = job.pending.saturating_sub(1);
                // Still waiting for others, and this one ended as every dependency it is in
                // asks: nothing to judge yet (a fan-in of 10,000 jobs is not judged 10,000
                // times over).
                let counts = |dep: &Dependency| if ok { dep.success } else { dep.failure };
                let deps = [&job.options.after, &job.options.follow];
                let all_of = deps.iter().all(|d| d.as_ref().map_or(true, |d| d.all));
                let only_one = deps.iter().filter(|d| d.is_some()).count() == 1;
                let fits = deps
                    .iter()
                    .filter_map(|d| d.as_ref())
                    .all(|dep| counts(dep) || (!only_one && !dep.jobs.contains(&ended)));
                if job.pending > 0 && all_of && fits {
                    continue;
                }
                let options = std::mem::take(&mut job.options);
                let readiness = self.readiness(&options);
                self.jobs.get_mut(&d).expect("looked up above").options = options;
                match readiness {
                    Readiness::Ready(allowed) => self.release(comm, d, allowed, now),
                    Readiness::Waiting => {}
                    Readiness::Impossible(why) => self.fail_impossible(comm, d, &why),
                }
            }
        }
        if !self.feeds.is_empty() {
            self.fill(comm);
        }
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

    /// Hands out chunks of load-balanced maps to the least-loaded engines with room, oldest
    /// map first. A map that may run only on some engines (`follow`) and finds none of them
    /// with room lets the next map go ahead; any other waits for room, first in line.
    fn fill(&mut self, comm: &mut impl Comm) {
        let mut per_conn: BTreeMap<ConnId, Vec<Assignment>> = BTreeMap::new();
        let n_engines = self.engines.len().max(1);
        let mut i = 0;
        while let Some(&job_id) = self.feeds.get(i) {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                self.feeds.remove(i);
                continue;
            };
            let item_micros = job.item_micros;
            let Some(feed) = job.feed.as_mut().filter(|f| !f.is_empty()) else {
                job.feed = None;
                self.feeds.remove(i);
                continue;
            };
            let allowed = job.allowed.as_ref();
            let again = feed.again.front().map(|r| &r.past);
            let avoid = again.map_or(&[][..], |p| &p.avoid[..]);
            // Work lost with its engine's node waits for another node while there is one.
            let shun = again
                .and_then(|p| p.lost_node.as_deref())
                .filter(|node| self.engines.values().any(|e| e.node != *node));
            let Some((engine_id, engine)) = self
                .engines
                .iter_mut()
                .filter(|(id, e)| {
                    allowed.map_or(true, |a| a.contains(id))
                        && Self::has_room(e, item_micros)
                        && shun != Some(e.node.as_str())
                })
                .min_by_key(|(id, e)| (avoid.contains(id), e.outstanding, e.assigned.len()))
            else {
                if allowed.is_some() {
                    i += 1;
                    continue;
                }
                break;
            };
            let (first, items, past) = match feed.again.pop_front() {
                Some(r) => (r.first, r.items, r.past),
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
                    // The queue gives back what it no longer needs as it drains (a million
                    // items are 72 MB), for the results that come in meanwhile to use.
                    if feed.items.capacity() > SHRINK_FROM
                        && feed.items.len() < feed.items.capacity() / 4
                    {
                        feed.items.shrink_to_fit();
                    }
                    let first = feed.next;
                    feed.next += size as u64;
                    (first, items, Past::default())
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
                    balanced: Some((items.clone(), past)),
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
            EngineToController::Done(results) => {
                self.finish_only(comm, results);
                self.after_change(comm, now);
            }
            EngineToController::Output(mut out) => {
                // To whoever follows the task's job; a task already ended or gone is past it.
                let Some(job) = self.tasks.get(&out.task).map(|t| t.job) else {
                    return;
                };
                out.job = job;
                let Some(j) = self.jobs.get(&job) else {
                    return;
                };
                for sub in j.subscribers.iter().filter(|c| self.clients.contains(c)) {
                    comm.to_client(*sub, ControllerToClient::Output(out.clone()));
                }
            }
            EngineToController::KernelRestarted {
                engine,
                pid,
                reason,
                rank,
            } => {
                tracing::warn!(%engine, pid, reason, "kernel replaced");
                if let Some(e) = self.engines.get_mut(&engine) {
                    e.pid = pid;
                    e.rank = rank;
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
        let mut new_ids = Vec::new();
        for s in slots {
            let key = (node.to_string(), s.slot);
            let id = match self.slot_ids.get(&key) {
                Some(id) => *id,
                None => {
                    // An MPI kernel's engine is its rank, unless another slot holds that id.
                    let id = match s.rank.map(EngineId) {
                        Some(rank) if !self.slot_ids.values().any(|v| *v == rank) => {
                            self.next_engine = self.next_engine.max(rank.0 + 1);
                            rank
                        }
                        _ => {
                            let id = EngineId(self.next_engine);
                            self.next_engine += 1;
                            id
                        }
                    };
                    self.slot_ids.insert(key.clone(), id);
                    new_ids.push((node.to_string(), s.slot, id));
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
                    rank: s.rank,
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
        if !new_ids.is_empty() {
            // On disk before the engines hear them: a restarted controller gives them back.
            comm.record_engines(&new_ids);
        }
        comm.to_engine(
            conn,
            ControllerToEngine::Registered {
                ids,
                heartbeat_ms: self.heartbeat.as_millis() as u64,
            },
        );
        self.answer_waiters(comm, now);
        self.after_change(comm, now);
    }

    /// Puts a load-balanced task back in its map's queue, first in line, if it may run again:
    /// after its engine was lost or its kernel died (`raised_on: None`) while it has been
    /// lost fewer than `task_attempts` times; after it raised on an engine while it has
    /// retries left. Gives the task back when it cannot run again. Its old task id is gone,
    /// so a late result for it is ignored.
    /// Puts a task back at the front of its map's queue, if it may run again: it raised on
    /// `raised_on` (and has retries left), or its kernel died or its engine was lost (on node
    /// `lost_node`; while it has attempts left).
    fn requeue(
        &mut self,
        tref: TaskRef,
        raised_on: Option<EngineId>,
        lost_node: Option<&str>,
    ) -> Result<(), TaskRef> {
        let Some((job, past)) = self
            .jobs
            .get_mut(&tref.job)
            .zip(tref.balanced.as_ref().map(|(_, p)| p))
        else {
            return Err(tref);
        };
        let runs_again = match raised_on {
            None => past.lost + 1 < self.attempts,
            Some(_) => past.retried < job.options.retries,
        };
        if !runs_again {
            return Err(tref);
        }
        let (items, mut past) = tref.balanced.expect("checked");
        match raised_on {
            None => {
                past.lost += 1;
                past.lost_node = lost_node.map(str::to_string);
            }
            Some(engine) => {
                past.retried += 1;
                past.avoid.push(engine);
            }
        }
        let feed = job.feed.get_or_insert_with(|| Feed {
            items: VecDeque::new(),
            next: tref.first + tref.slots,
            chunksize: None,
            again: VecDeque::new(),
        });
        feed.again.push_back(Requeued {
            first: tref.first,
            items,
            past,
        });
        if !self.feeds.contains(&tref.job) {
            self.feeds.push_front(tref.job);
        }
        Ok(())
    }

    /// Takes in finished tasks: the books, requeues (dead kernels, retries), the job's
    /// subscribers and the store; a job whose last task is in has ended.
    fn finish_only(&mut self, comm: &mut impl Comm, results: Vec<TaskResult>) {
        let mut by_job: BTreeMap<JobId, Vec<TaskResult>> = BTreeMap::new();
        for mut result in results {
            let Some(mut tref) = self.tasks.remove(&result.task) else {
                // A task already failed (aborted, timed out, its engine declared lost).
                tracing::debug!(task = %result.task, "result for a task no longer expected; ignored");
                continue;
            };
            if let Some(engine) = self.engines.get_mut(&result.engine) {
                engine.tasks_done += 1;
                if let Some(i) = engine.assigned.iter().position(|(t, _)| *t == result.task) {
                    let (_, n) = engine.assigned.remove(i).expect("found");
                    engine.outstanding -= n;
                }
            }
            if tref.balanced.is_some() {
                result.attempts = tref.attempts();
            }
            // Its kernel died under it: like work on a lost engine, it runs again elsewhere
            // while it has attempts left. A task that raised runs again while it has retries.
            if kernel_died(&result.outcome) {
                match self.requeue(tref, None, None) {
                    Ok(()) => continue,
                    Err(t) => tref = t,
                }
            } else if first_error(&result.outcome).is_some() {
                match self.requeue(tref, Some(result.engine), None) {
                    Ok(()) => continue,
                    Err(t) => tref = t,
                }
            }
            if let Some(job) = self.jobs.get_mut(&tref.job) {
                job.remaining = job.remaining.saturating_sub(tref.slots);
                job.took(&result);
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
            let bytes = results.iter().map(TaskResult::approx_bytes).sum::<usize>();
            job.bytes += bytes;
            self.running_bytes += bytes;
            job.done.extend(results);
            if job.remaining == 0 {
                self.end_job(comm, job_id);
            }
        }
        self.forget_old_jobs();
    }

    /// A job whose last result is in has ended: its subscribers are done, engines forget its
    /// function, the store and its dependents hear how it went.
    fn end_job(&mut self, comm: &mut impl Comm, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
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
        self.running_bytes = self.running_bytes.saturating_sub(job.bytes);
        let ran_on: Vec<EngineId> = job.ran_on.iter().copied().collect();
        comm.record_ended(job_id, job.status, job.failure.as_deref(), &ran_on);
        self.job_ended(job_id);
    }

    /// Drops the oldest finished jobs beyond the memory bounds. The byte bound counts the
    /// results running jobs hold too: finished results are a cache of the store's, and give
    /// way to a large job as its results come in (a map of a million tasks holds hundreds of
    /// MB of them).
    fn forget_old_jobs(&mut self) {
        while self.finished.len() > 1
            && (self.finished.len() > KEEP_FINISHED_JOBS
                || self.finished_slots > KEEP_FINISHED_SLOTS
                || self.finished_bytes + self.running_bytes > KEEP_FINISHED_BYTES)
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

    /// An engine connection closed or went silent: its engines are gone. Load-balanced work
    /// they held runs again elsewhere while it has attempts left; the rest fails with a reason
    /// that names them.
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
        let ec_had_engines = !ec.engines.is_empty();
        let lost = ec.engines.first().copied().unwrap_or(EngineId(0));
        for id in ec.engines {
            let Some(engine) = self.engines.remove(&id) else {
                continue;
            };
            tracing::warn!(engine = %id, node = engine.node, reason, "engine lost");
            self.lost.insert(
                (engine.node.clone(), engine.slot),
                LostEngine {
                    id: Some(id),
                    node: engine.node.clone(),
                    host: engine.host.clone(),
                    reason: reason.to_string(),
                    since: now_micros(),
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
                let handed = tref.balanced.as_ref().map_or(1, |(_, p)| p.lost + 1);
                let tref = match self.requeue(tref, None, Some(&engine.node)) {
                    Ok(()) => continue,
                    Err(t) => t,
                };
                // `failed_result` and `finish_only` take it from here.
                self.tasks.insert(task, tref);
                let why = if handed > 1 {
                    format!("{lost_here} (its engines were lost {handed} times, the most a task is: task_attempts)")
                } else {
                    lost_here
                };
                failed.push(self.failed_result(task, id, "EngineLost", &why));
            }
        }
        if self.engines.is_empty() && self.orphaned.is_none() && ec_had_engines {
            // Nobody is left to take the rest of the load-balanced maps: an engine that comes
            // back soon (restarted by its node) takes them; after a while they fail instead
            // of waiting for ever.
            self.orphaned = Some((now, lost, format!("engine {lost} was lost: {reason}")));
        }
        let stranded = self.stranded(reason);
        self.finish_only(comm, failed);
        for (job, why) in stranded {
            self.fail_impossible(comm, job, &why);
        }
        self.after_change(comm, now);
        comm.close(conn);
    }

    /// Work that was to follow jobs onto engines that are all gone now cannot run: those jobs,
    /// and why (`reason`: why the engines are gone).
    fn stranded(&self, reason: &str) -> Vec<(JobId, String)> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.remaining > 0 && !j.waiting)
            .filter_map(|(id, j)| {
                let allowed = j.allowed.as_ref()?;
                let alive = allowed.iter().any(|e| self.reachable(*e));
                (!alive && j.feed.is_some()).then(|| {
                    (
                        *id,
                        format!(
                            "the engines it may run on ({}) are gone: {reason}",
                            crate::proto::format_ids(&allowed.iter().copied().collect::<Vec<_>>())
                        ),
                    )
                })
            })
            .collect()
    }

    /// Fails the work of load-balanced maps once no engine has been there to take it for
    /// [`ORPHAN_GRACE`].
    fn fail_orphaned(&mut self, comm: &mut impl Comm, now: Instant) {
        if !self.engines.is_empty() {
            self.orphaned = None;
            return;
        }
        let Some((since, lost, cause)) = &self.orphaned else {
            return;
        };
        if now.saturating_duration_since(*since) < ORPHAN_GRACE {
            return;
        }
        let why = format!(
            "no engine was left to run it for {} s ({cause})",
            ORPHAN_GRACE.as_secs()
        );
        let lost = *lost;
        self.orphaned = None;
        let mut failed = Vec::new();
        for job in self.feeds.clone() {
            for mut r in self.fail_unstarted(job, "EngineLost", &why) {
                r.engine = lost;
                failed.push(r);
            }
        }
        self.finish_only(comm, failed);
    }

    /// Fails what is left of jobs whose timeout has passed; their running tasks are
    /// interrupted.
    fn time_out(&mut self, comm: &mut impl Comm, now: Instant) {
        let late: Vec<(JobId, u64)> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.remaining > 0 && j.deadline.is_some_and(|d| d <= now))
            .map(|(id, j)| (*id, j.options.timeout_ms.unwrap_or(0)))
            .collect();
        for (job, ms) in late {
            let why = format!(
                "the task did not finish within {} s of when it could start (timeout)",
                ms as f64 / 1000.0
            );
            if let Some(j) = self.jobs.get_mut(&job) {
                j.deadline = None;
            }
            let mut failed = self.fail_unstarted(job, "TaskTimeout", &why);
            failed.extend(self.fail_assigned(comm, job, true, "TaskTimeout", &why));
            self.finish_only(comm, failed);
        }
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
        if self.awaiting_until.is_some_and(|t| now >= t) {
            self.awaiting_until = None;
            let why = format!(
                "they did not come back within {} s of the controller's restart",
                RESTART_GRACE.as_secs()
            );
            for (job, why) in self.stranded(&why) {
                self.fail_impossible(comm, job, &why);
            }
        }
        if self.engines.is_empty() && !self.feeds.is_empty() && self.orphaned.is_none() {
            self.orphaned = Some((now, EngineId::NONE, "no engine is registered".into()));
        }
        self.fail_orphaned(comm, now);
        self.time_out(comm, now);
        self.answer_waiters(comm, now);
        self.after_change(comm, now);
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
                    rank: e.rank,
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
            // Tasks not on an engine's queue yet: held direct tasks wait for dependencies.
            queued: (self.tasks.len() as u64)
                .saturating_sub(running)
                .saturating_sub(self.jobs.values().map(|j| j.held.len() as u64).sum())
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
            waiting: self
                .jobs
                .values()
                .filter(|j| j.waiting)
                .map(|j| j.remaining)
                .sum(),
            // Counted, not read off the next id: ids skip ahead after a restart.
            jobs: (self.ended.len() + self.jobs.values().filter(|j| j.remaining > 0).count())
                as u64,
        }
    }
}

/// The errors the controller makes for tasks that did not (or not fully) run.
const CONTROLLER_ERRORS: [&str; 5] = [
    "ControllerRestarted",
    "EngineLost",
    "ImpossibleDependency",
    "TaskAborted",
    "TaskTimeout",
];

/// The result slots of a job of `slots` slots that `done` leaves empty, as ascending
/// `[start, end)` ranges.
fn missing_slots(done: &[TaskResult], slots: u64) -> Vec<(u64, u64)> {
    let mut filled: Vec<(u64, u64)> = done
        .iter()
        .map(|r| {
            let n = match &r.outcome {
                Outcome::Items(items) => items.len() as u64,
                _ => 1,
            };
            (r.first, r.first + n)
        })
        .collect();
    filled.sort_unstable();
    let mut missing = Vec::new();
    let mut at = 0;
    for (a, b) in filled {
        if a > at {
            missing.push((at, a.min(slots)));
        }
        at = at.max(b);
    }
    if at < slots {
        missing.push((at, slots));
    }
    missing.retain(|(a, b)| a < b);
    missing
}

/// The queue of a load-balanced map taken up after a restart, holding the items in the
/// `missing` slots (of `missing_slots` for as many slots as there are items): the run after the last result is handed out as new items, with adaptive
/// chunks; the gaps before it (chunks that were out on engines) run again first, in pieces
/// sized as adaptive chunks would be for `engines` engines.
fn resumed_feed(
    mut items: Vec<Value>,
    missing: &[(u64, u64)],
    chunksize: Option<u32>,
    engines: usize,
) -> Feed {
    let total = items.len() as u64;
    let tail_from = match missing.last() {
        Some(&(a, b)) if b == total => a,
        _ => total,
    };
    let gaps: u64 = missing
        .iter()
        .filter(|(a, _)| *a < tail_from)
        .map(|(a, b)| b - a)
        .sum();
    let piece = match chunksize {
        Some(c) => u64::from(c),
        None => (total - tail_from + gaps)
            .div_ceil((GSS_DIVISOR * engines) as u64)
            .clamp(1, MAX_CHUNK as u64),
    }
    .max(1);
    let mut again = VecDeque::new();
    for &(a, b) in missing.iter().filter(|(a, _)| *a < tail_from) {
        let mut start = a;
        while start < b {
            let end = (start + piece).min(b);
            again.push_back(Requeued {
                first: start,
                items: items[start as usize..end as usize].to_vec(),
                past: Past {
                    restarted: 1,
                    ..Past::default()
                },
            });
            start = end;
        }
    }
    let tail: VecDeque<Value> = items.drain(tail_from as usize..).collect();
    Feed {
        items: tail,
        next: tail_from,
        chunksize,
        again,
    }
}

/// A task's first error, if it failed (for a map chunk: its first failed item).
fn first_error(outcome: &Outcome) -> Option<&RemoteError> {
    match outcome {
        Outcome::Ok { .. } => None,
        Outcome::Err(e) => Some(e),
        Outcome::Items(items) => items.iter().find_map(|i| i.as_ref().err().map(|e| &**e)),
    }
}

/// Whether a task failed because its kernel died under it (the engine reports `KernelDied`
/// for it, for every item of a map chunk).
fn kernel_died(outcome: &Outcome) -> bool {
    let died = |e: &RemoteError| e.ename == "KernelDied";
    match outcome {
        Outcome::Err(e) => died(e),
        Outcome::Items(items) => {
            !items.is_empty() && items.iter().all(|i| i.as_ref().is_err_and(|e| died(e)))
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
pub(super) mod tests {
    use super::*;
    use crate::proto::Work;

    fn submit_req(spec: JobSpec) -> ClientRequest {
        ClientRequest::Submit {
            spec,
            options: Box::default(),
            wait: false,
        }
    }

    #[derive(Default)]
    struct Recorder {
        to_clients: Vec<(ConnId, ControllerToClient)>,
        reads: Vec<(ConnId, u64, String)>,
        to_engines: Vec<(ConnId, ControllerToEngine)>,
        closed: Vec<ConnId>,
        recorded_jobs: usize,
        recorded_results: usize,
        recorded_engines: Vec<(String, u32, EngineId)>,
        reserved_jobs: u64,
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
        fn record_ended(&mut self, _: JobId, _: &'static str, _: Option<&str>, _: &[EngineId]) {}
        fn read_store(&mut self, conn: ConnId, id: u64, read: Read) {
            self.reads.push((conn, id, format!("{read:?}")));
        }
        fn record_job(&mut self, _: &JobInfo, _: JobSpec, _: &JobOptions) {
            self.recorded_jobs += 1;
        }
        fn record_results(&mut self, _: JobId, r: &[TaskResult]) {
            self.recorded_results += r.len();
        }
        fn record_engines(&mut self, ids: &[(String, u32, EngineId)]) {
            self.recorded_engines.extend_from_slice(ids);
        }
        fn reserve_jobs(&mut self, upto: u64, _: u64) -> bool {
            self.reserved_jobs = upto;
            true
        }
        fn shutdown(&mut self) {}
    }

    const CLIENT: ConnId = ConnId(100);

    /// Engine processes on nodes of their own: `engines_per_conn[i]` engines on `node{i}`.
    fn cluster_with(engines_per_conn: &[usize]) -> (State, Recorder, Instant) {
        let conns: Vec<(String, usize)> = engines_per_conn
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("node{i}"), *n))
            .collect();
        cluster_on(&conns)
    }

    /// Engine processes (connections 0, 1, …), each with its node and number of engines;
    /// a node's engines take its next slots.
    fn cluster_on(conns: &[(String, usize)]) -> (State, Recorder, Instant) {
        let now = Instant::now();
        let mut s = State::new("t", Duration::from_secs(1), 2);
        let mut c = Recorder::default();
        let mut next_slot: HashMap<&str, u32> = HashMap::new();
        for (i, (node, n)) in conns.iter().enumerate() {
            let conn = ConnId(i as u64);
            s.on_engine_connected(conn, now);
            let first = next_slot.entry(node).or_default();
            let slots = *first..*first + *n as u32;
            *first += *n as u32;
            let msg = EngineToController::Register {
                node: node.clone(),
                host: "127.0.0.1".into(),
                pid: 900 + i as u32,
                engines: slots
                    .map(|slot| EngineSlot {
                        slot,
                        kernel_pid: 1000,
                        rank: None,
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
        s.on_client_request(c, CLIENT, 1, submit_req(spec), now);
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

    /// A task's successful result (the value 1), as an engine sends it.
    pub(in crate::controller) fn ok(task: TaskId, engine: EngineId, first: u64) -> TaskResult {
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
            attempts: 1,
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
    fn output_of_a_running_task_reaches_its_jobs_clients_until_the_task_ends() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        let info = submit(&mut s, &mut c, Targets::All, now);
        let (t0, e0) = info.tasks[0];
        c.to_clients.clear();
        let output = |task| {
            EngineToController::Output(crate::proto::TaskOutput {
                job: JobId(0),
                task,
                engine: e0,
                stdout: "so far\n".into(),
                stderr: String::new(),
            })
        };
        s.on_engine_message(&mut c, ConnId(0), output(t0), now);
        assert!(matches!(
            c.to_clients.as_slice(),
            [(CLIENT, ControllerToClient::Output(o))] if o.job == info.job && o.task == t0 && o.stdout == "so far\n"
        ));
        // Once the task has ended, or for a task the controller does not know, nothing.
        s.on_engine_message(
            &mut c,
            ConnId(0),
            EngineToController::Done(vec![ok(t0, e0, 0)]),
            now,
        );
        c.to_clients.clear();
        s.on_engine_message(&mut c, ConnId(0), output(t0), now);
        s.on_engine_message(&mut c, ConnId(0), output(TaskId(999)), now);
        assert!(c.to_clients.is_empty());
        assert_eq!(
            c.recorded_results, 1,
            "output is not stored: results carry all of it"
        );
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
                _ => None,
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
                    rank: None,
                },
                EngineSlot {
                    slot: 1,
                    kernel_pid: 2,
                    rank: None,
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
        s.on_client_request(&mut c, CLIENT, 1, submit_req(spec), now);
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
        s.on_client_request(c, CLIENT, id, submit_req(map_spec(n, chunksize)), now);
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
            attempts: 1,
        };
        s.on_engine_message(c, conn, EngineToController::Done(vec![r]), Instant::now());
    }

    #[test]
    fn a_load_balanced_map_is_one_submission_split_into_shrinking_chunks() {
        let (mut s, mut c, now) = cluster_with(&[1, 1]);
        let spec = map_spec(1000, None);
        s.on_client_request(&mut c, CLIENT, 1, submit_req(spec), now);
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
        s.on_client_request(&mut c, CLIENT, 1, submit_req(spec), now);
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
        s.on_client_request(&mut c, CLIENT, 1, submit_req(spec), now);
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
    fn finished_jobs_are_forgotten_beyond_the_memory_bound_and_read_from_the_store() {
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
        // The first job is no longer held: the task store answers for it.
        assert_eq!(c.reads, vec![(CLIENT, 3, "Job(JobId(0))".to_string())]);
        assert!(matches!(
            &c.to_clients[0].1,
            ControllerToClient::Reply {
                body: Reply::Job(_),
                ..
            }
        ));
        assert_eq!(s.status().jobs, KEEP_FINISHED_JOBS as u64 + 1);
    }

    #[test]
    fn finished_results_give_way_to_a_running_jobs() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        let result_of = |t, e, first, size: usize| {
            let mut r = ok(t, e, first);
            r.stdout = "x".repeat(size);
            r
        };
        // Three finished jobs of 30 MiB results each: all held (90 MiB).
        for _ in 0..3 {
            let info = submit(&mut s, &mut c, Targets::All, now);
            let done: Vec<TaskResult> = info
                .tasks
                .iter()
                .enumerate()
                .map(|(i, (t, e))| result_of(*t, *e, i as u64, 15 << 20))
                .collect();
            s.on_engine_message(&mut c, ConnId(0), EngineToController::Done(done), now);
        }
        assert_eq!(s.finished.len(), 3);
        // A running job's first 60 MiB push out the oldest finished ones, not itself.
        let info = submit(&mut s, &mut c, Targets::All, now);
        let (t, e) = info.tasks[0];
        let first = vec![result_of(t, e, 0, 60 << 20)];
        s.on_engine_message(&mut c, ConnId(0), EngineToController::Done(first), now);
        assert!(
            s.finished_bytes + s.running_bytes <= KEEP_FINISHED_BYTES,
            "{} + {}",
            s.finished_bytes,
            s.running_bytes
        );
        assert_eq!(
            s.finished.iter().copied().collect::<Vec<_>>(),
            [JobId(1), JobId(2)]
        );
        assert!(!s.jobs.contains_key(&JobId(0)));
        assert!(s.jobs.contains_key(&info.job));
        // Once it ends its results are finished ones, and the last job stays whatever its size.
        let (t, e) = info.tasks[1];
        let last = vec![result_of(t, e, 1, 60 << 20)];
        s.on_engine_message(&mut c, ConnId(0), EngineToController::Done(last), now);
        assert_eq!(s.running_bytes, 0);
        assert_eq!(s.finished.back(), Some(&info.job));
        assert!(
            s.finished_bytes <= KEEP_FINISHED_BYTES,
            "{}",
            s.finished_bytes
        );
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
                value: Value::Pickle(Box::new(crate::proto::Pickled {
                    repr: "b'...'".into(),
                    bytes: big.clone(),
                    buffers: Vec::new(),
                    json: None,
                })),
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
                _ => None,
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
    fn work_lost_with_an_engine_waits_for_another_node_rather_than_its_nodes_other_engines() {
        // Engine 0 on node a; engines 1 and 2 on node b, one process each.
        let (mut s, mut c, now) = cluster_on(&[("a".into(), 1), ("b".into(), 1), ("b".into(), 1)]);
        submit_map(&mut s, &mut c, 1, 100, Some(1), now);
        let first = runs(&mut c);
        let of = |conn: u64| -> Vec<Assignment> {
            first
                .iter()
                .filter(|(c, _, _)| *c == ConnId(conn))
                .flat_map(|(_, t, _)| t.clone())
                .collect()
        };
        let lost: Vec<u64> = of(1).iter().map(|a| a.first).collect();
        assert!(!lost.is_empty());
        // Engine 1 goes (its node is dying); its work comes back first in line.
        s.on_engine_gone(&mut c, ConnId(1), "its connection failed", now);
        // Engine 2, on the same node, has room first: the lost work goes to node a's engine,
        // not to it.
        finish_chunk(&mut s, &mut c, ConnId(2), &of(2)[0], 10);
        let next: Vec<Assignment> = runs(&mut c).into_iter().flat_map(|(_, t, _)| t).collect();
        for first in &lost {
            let a = next
                .iter()
                .find(|a| a.first == *first)
                .expect("handed out again");
            assert_eq!(a.engine, EngineId(0), "item {first}: {a:?}");
        }
        assert!(
            next.iter().any(|a| a.engine == EngineId(2)),
            "new work still goes to engine 2"
        );
        // With node b's engines all gone too, nothing is held back any more.
        s.on_engine_gone(&mut c, ConnId(2), "its connection failed", now);
        assert_eq!(s.status().engines.len(), 1);
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
                rank: None,
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

    /// Submits a load-balanced apply-like map of `n` items with these options; returns the
    /// job, or the controller's error.
    fn submit_with(
        s: &mut State,
        c: &mut Recorder,
        n: usize,
        options: JobOptions,
        now: Instant,
    ) -> Result<JobId, String> {
        let spec = JobSpec::Map {
            mapper: Mapper::Python(crate::proto::Func::Expr("f".into())),
            items: (0..n as i64).map(Value::from).collect(),
            chunksize: Some(1),
        };
        s.on_client_request(
            c,
            CLIENT,
            9,
            ClientRequest::Submit {
                spec,
                options: Box::new(options),
                wait: false,
            },
            now,
        );
        match c.to_clients.pop() {
            Some((
                _,
                ControllerToClient::Reply {
                    body: Reply::Job(info),
                    ..
                },
            )) => Ok(info.job),
            Some((
                _,
                ControllerToClient::Reply {
                    body: Reply::Error(e),
                    ..
                },
            )) => Err(e),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn raised(a: &Assignment) -> TaskResult {
        TaskResult {
            task: a.task,
            engine: a.engine,
            first: a.first,
            outcome: Outcome::Items(vec![Err(Box::new(RemoteError {
                ename: "ValueError".into(),
                evalue: "bad".into(),
                traceback: String::new(),
            }))]),
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            started: 1,
            completed: 2,
            attempts: 1,
        }
    }

    fn assignments(c: &mut Recorder) -> Vec<(ConnId, Assignment)> {
        runs(c)
            .into_iter()
            .flat_map(|(conn, tasks, _)| tasks.into_iter().map(move |a| (conn, a)))
            .collect()
    }

    /// Submits `execute` on every engine with `options`, which the controller must refuse:
    /// its error.
    fn refused_direct(
        s: &mut State,
        c: &mut Recorder,
        options: JobOptions,
        now: Instant,
    ) -> String {
        let spec = JobSpec::Direct {
            targets: Targets::All,
            work: Work::Execute { code: "1".into() },
        };
        let submit = ClientRequest::Submit {
            spec,
            options: Box::new(options),
            wait: false,
        };
        s.on_client_request(c, CLIENT, 5, submit, now);
        match c.to_clients.pop() {
            Some((
                _,
                ControllerToClient::Reply {
                    body: Reply::Error(e),
                    ..
                },
            )) => e,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Options that place work where `job` ran, once it succeeded.
    fn follows(job: JobId) -> JobOptions {
        JobOptions {
            follow: Some(Dependency::on(vec![job])),
            ..JobOptions::default()
        }
    }

    fn after(jobs: &[JobId]) -> JobOptions {
        JobOptions {
            after: Some(Dependency::on(jobs.to_vec())),
            ..JobOptions::default()
        }
    }

    /// Every result the client got, by job.
    fn results_of(c: &Recorder, job: JobId) -> Vec<TaskResult> {
        c.to_clients
            .iter()
            .filter_map(|(_, m)| match m {
                ControllerToClient::Results { job: j, results } if *j == job => {
                    Some(results.clone())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn a_job_with_after_waits_for_its_dependency_and_runs_once_it_succeeded() {
        let (mut s, mut c, now) = cluster_with(&[2]);
        let first = submit_with(&mut s, &mut c, 1, JobOptions::default(), now).unwrap();
        let sent = assignments(&mut c);
        assert_eq!(sent.len(), 1);
        let second = submit_with(&mut s, &mut c, 3, after(&[first]), now).unwrap();
        assert!(
            assignments(&mut c).is_empty(),
            "nothing of it runs before its dependency"
        );
        let direct = JobSpec::Direct {
            targets: Targets::All,
            work: Work::Execute { code: "1".into() },
        };
        s.on_client_request(
            &mut c,
            CLIENT,
            8,
            ClientRequest::Submit {
                spec: direct,
                options: Box::new(after(&[first])),
                wait: false,
            },
            now,
        );
        assert!(assignments(&mut c).is_empty());
        assert_eq!(s.status().queued, 0, "neither is queued for engines yet");
        assert_eq!(s.status().waiting, 3 + 2, "both wait for their dependency");
        let (conn, a) = &sent[0];
        finish_chunk(&mut s, &mut c, *conn, a, 10);
        let now_sent = assignments(&mut c);
        let of_map = now_sent
            .iter()
            .filter(|(_, a)| matches!(&a.work, Work::MapChunk { job, .. } if *job == second))
            .count();
        let of_px = now_sent
            .iter()
            .filter(|(_, a)| matches!(&a.work, Work::Execute { .. }))
            .count();
        assert_eq!(
            of_px, 2,
            "the direct job runs on both engines once the first job ended well"
        );
        assert_eq!(of_map, 2, "a map item behind each engine's direct task");
        let st = s.status();
        assert_eq!(
            (st.running, st.queued, st.waiting),
            (2, 3, 0),
            "two direct tasks run; two map items wait on engines, one in the map's queue"
        );
    }

    #[test]
    fn an_impossible_dependency_fails_at_once_and_so_do_its_dependents() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        let first = submit_with(&mut s, &mut c, 1, JobOptions::default(), now).unwrap();
        let sent = assignments(&mut c);
        let second = submit_with(&mut s, &mut c, 2, after(&[first]), now).unwrap();
        let third = submit_with(&mut s, &mut c, 1, after(&[second]), now).unwrap();
        // A job that only runs if the first fails: it will run.
        let on_failure = JobOptions {
            after: Some(Dependency {
                jobs: vec![first],
                all: true,
                success: false,
                failure: true,
            }),
            ..JobOptions::default()
        };
        let cleanup = submit_with(&mut s, &mut c, 1, on_failure, now).unwrap();
        let (conn, a) = &sent[0];
        s.on_engine_message(
            &mut c,
            *conn,
            EngineToController::Done(vec![raised(a)]),
            now,
        );
        for job in [second, third] {
            let rs = results_of(&c, job);
            assert!(!rs.is_empty(), "job {job} failed at once");
            for r in rs {
                let Outcome::Items(items) = &r.outcome else {
                    panic!()
                };
                let e = items[0].as_ref().unwrap_err();
                assert_eq!(e.ename, "ImpossibleDependency");
                assert!(
                    e.evalue.contains(&format!("job {job} cannot run")),
                    "{}",
                    e.evalue
                );
                assert!(
                    e.evalue.contains("ValueError: bad"),
                    "the root cause is named: {}",
                    e.evalue
                );
            }
        }
        let ran = assignments(&mut c);
        assert_eq!(ran.len(), 1);
        assert!(matches!(&ran[0].1.work, Work::MapChunk { job, .. } if *job == cleanup));
        // A dependency on a job that does not exist is refused.
        let err = submit_with(&mut s, &mut c, 1, after(&[JobId(99)]), now).unwrap_err();
        assert!(err.contains("there is no job 99"), "{err}");
    }

    #[test]
    fn any_dependency_is_met_by_one_and_follow_runs_where_its_job_ran() {
        let (mut s, mut c, now) = cluster_with(&[1, 1, 1]);
        let a = submit_with(&mut s, &mut c, 1, JobOptions::default(), now).unwrap();
        let b = submit_with(&mut s, &mut c, 1, JobOptions::default(), now).unwrap();
        let sent = assignments(&mut c);
        let any = JobOptions {
            after: Some(Dependency {
                jobs: vec![a, b],
                all: false,
                success: true,
                failure: false,
            }),
            ..JobOptions::default()
        };
        let either = submit_with(&mut s, &mut c, 1, any, now).unwrap();
        let follow = JobOptions {
            follow: Some(Dependency::on(vec![a])),
            ..JobOptions::default()
        };
        let follower = submit_with(&mut s, &mut c, 6, follow, now).unwrap();
        let (conn_a, task_a) = sent
            .iter()
            .find(|(_, x)| matches!(&x.work, Work::MapChunk { job, .. } if *job == a))
            .unwrap();
        finish_chunk(&mut s, &mut c, *conn_a, task_a, 10);
        let next = assignments(&mut c);
        assert!(
            next.iter()
                .any(|(_, x)| matches!(&x.work, Work::MapChunk { job, .. } if *job == either)),
            "any: one is enough"
        );
        let followed: Vec<EngineId> = next
            .iter()
            .filter(|(_, x)| matches!(&x.work, Work::MapChunk { job, .. } if *job == follower))
            .map(|(_, x)| x.engine)
            .collect();
        assert!(!followed.is_empty());
        assert!(
            followed.iter().all(|e| *e == task_a.engine),
            "follow: only on engine {}: {followed:?}",
            task_a.engine
        );
        // Follow is for load-balanced work.
        let err = refused_direct(&mut s, &mut c, follows(a), now);
        assert!(err.contains("follow places load-balanced work"), "{err}");
    }

    #[test]
    fn load_balanced_work_with_targets_runs_on_those_engines_only() {
        let (mut s, mut c, now) = cluster_with(&[1, 1, 1]);
        let on = |t: &str| JobOptions {
            engines: Some(Targets::parse(t).unwrap()),
            ..JobOptions::default()
        };
        let only_1 = submit_with(&mut s, &mut c, 12, on("1"), now).unwrap();
        let tail = submit_with(&mut s, &mut c, 12, on("1:"), now).unwrap();
        let mut seen: BTreeMap<JobId, BTreeSet<EngineId>> = BTreeMap::new();
        for (_, a) in assignments(&mut c) {
            if let Work::MapChunk { job, .. } = a.work {
                seen.entry(job).or_default().insert(a.engine);
            }
        }
        assert_eq!(seen[&only_1], BTreeSet::from([EngineId(1)]));
        assert!(seen[&tail].iter().all(|e| *e != EngineId(0)), "{seen:?}");
        // Ids as the controller resolved them go on record.
        assert_eq!(
            s.jobs[&tail].options.engines,
            Some(Targets::Ids(vec![EngineId(1), EngineId(2)]))
        );

        // Engines that do not exist, and direct work, are refused.
        let err = submit_with(&mut s, &mut c, 1, on("7"), now).unwrap_err();
        assert_eq!(err, "there is no engine 7; the engines are [0, 1, 2]");
        let err = refused_direct(&mut s, &mut c, on("1"), now);
        assert!(
            err.contains("direct work already names its engines"),
            "{err}"
        );

        // Follow and targets that do not meet: refused as it is released, not left waiting.
        let ran = submit_with(&mut s, &mut c, 1, on("0"), now).unwrap();
        let (conn, a) = assignments(&mut c)
            .into_iter()
            .find(|(_, a)| matches!(&a.work, Work::MapChunk { job, .. } if *job == ran))
            .unwrap();
        finish_chunk(&mut s, &mut c, conn, &a, 10);
        let apart = JobOptions {
            follow: Some(Dependency::on(vec![ran])),
            ..on("2")
        };
        c.to_clients.clear();
        let never = submit_with(&mut s, &mut c, 3, apart, now).unwrap();
        assert!(
            c.to_clients.iter().any(|(_, m)| matches!(m, ControllerToClient::Results { job, results }
                if *job == never && results.iter().any(|r| first_error(&r.outcome).is_some_and(|e| e.evalue.contains("none of the engines where the jobs it follows ran is among its targets"))))),
            "{:?}",
            c.to_clients
        );
        assert!(!s.is_unfinished(never));

        // With its one engine lost, what is left of the first job fails and says why.
        c.to_clients.clear();
        s.on_engine_gone(&mut c, ConnId(1), "its connection closed", now);
        let why: Vec<String> = c
            .to_clients
            .iter()
            .filter_map(|(_, m)| match m {
                ControllerToClient::Results { job, results } if *job == only_1 => Some(results),
                _ => None,
            })
            .flatten()
            .filter_map(|r| first_error(&r.outcome).map(|e| e.evalue.clone()))
            .collect();
        assert!(!why.is_empty());
        assert!(
            why.iter()
                .any(|e| e.contains("the engines it may run on ([1]) are gone")),
            "{why:?}"
        );
    }

    #[test]
    fn a_task_that_raises_is_retried_on_another_engine_and_attempts_are_counted() {
        let (mut s, mut c, now) = cluster_with(&[1, 1]);
        let options = JobOptions {
            retries: 2,
            ..JobOptions::default()
        };
        let job = submit_with(&mut s, &mut c, 1, options, now).unwrap();
        let mut engines = Vec::new();
        for round in 0..3 {
            let sent = assignments(&mut c);
            assert_eq!(sent.len(), 1, "round {round}");
            let (conn, a) = &sent[0];
            engines.push(a.engine);
            if round < 2 {
                s.on_engine_message(
                    &mut c,
                    *conn,
                    EngineToController::Done(vec![raised(a)]),
                    now,
                );
                assert!(
                    results_of(&c, job).is_empty(),
                    "a retried task reports nothing yet"
                );
            } else {
                finish_chunk(&mut s, &mut c, *conn, a, 10);
            }
        }
        assert_ne!(engines[0], engines[1], "the retry goes to the other engine");
        let rs = results_of(&c, job);
        assert_eq!(rs.len(), 1);
        assert!(matches!(&rs[0].outcome, Outcome::Items(i) if i[0].is_ok()));
        assert_eq!(rs[0].attempts, 3);
    }

    #[test]
    fn a_timeout_fails_queued_and_running_tasks_and_cancels_them_on_the_engine() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        let options = JobOptions {
            timeout_ms: Some(1000),
            ..JobOptions::default()
        };
        let job = submit_with(&mut s, &mut c, 5, options, now).unwrap();
        let sent = assignments(&mut c);
        assert!(!sent.is_empty());
        s.on_tick(&mut c, now + Duration::from_millis(500));
        assert!(results_of(&c, job).is_empty());
        s.on_tick(&mut c, now + Duration::from_millis(1100));
        let rs = results_of(&c, job);
        let timed_out: usize = rs
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Items(i) => i
                    .iter()
                    .filter(|x| x.as_ref().is_err_and(|e| e.ename == "TaskTimeout"))
                    .count(),
                _ => 0,
            })
            .sum();
        assert_eq!(timed_out, 5, "every item times out");
        let cancelled: Vec<TaskId> = c
            .to_engines
            .iter()
            .filter_map(|(_, m)| match m {
                ControllerToEngine::Cancel(t) => Some(t.iter().map(|(_, t)| *t)),
                _ => None,
            })
            .flatten()
            .collect();
        let held: Vec<TaskId> = sent.iter().map(|(_, a)| a.task).collect();
        assert_eq!(
            cancelled, held,
            "the engine drops or interrupts what it held"
        );
        assert_eq!(s.status().running, 0);
        // A late result of an interrupted task is ignored.
        let (conn, a) = &sent[0];
        finish_chunk(&mut s, &mut c, *conn, a, 10);
        assert_eq!(results_of(&c, job).len(), rs.len());
    }

    #[test]
    fn abort_drops_queued_tasks_leaves_running_ones_unless_interrupted_and_refuses_finished_jobs() {
        let (mut s, mut c, now) = cluster_with(&[1]);
        let job = submit_with(&mut s, &mut c, 4, JobOptions::default(), now).unwrap();
        let sent = assignments(&mut c);
        assert_eq!(sent.len(), MIN_PREFETCH, "two handed out, two queued here");
        s.on_client_request(
            &mut c,
            CLIENT,
            7,
            ClientRequest::Abort {
                job,
                interrupt: false,
            },
            now,
        );
        assert!(c.to_clients.iter().any(|(_, m)| matches!(
            m,
            ControllerToClient::Reply {
                id: 7,
                body: Reply::Done
            }
        )));
        let aborted = |c: &Recorder| {
            results_of(c, job)
                .iter()
                .map(|r| match &r.outcome {
                    Outcome::Items(i) => i
                        .iter()
                        .filter(|x| x.as_ref().is_err_and(|e| e.ename == "TaskAborted"))
                        .count(),
                    _ => 0,
                })
                .sum::<usize>()
        };
        assert_eq!(
            aborted(&c),
            3,
            "the two queued here and the one queued on the engine"
        );
        let (conn, running) = &sent[0];
        finish_chunk(&mut s, &mut c, *conn, running, 10);
        let items: u64 = results_of(&c, job)
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Items(i) => i.len() as u64,
                _ => 0,
            })
            .sum();
        assert_eq!(items, 4, "the running task finished, the job is complete");
        assert!(!s.jobs[&job].subscribers.contains(&CLIENT));
        c.to_clients.clear();
        s.on_client_request(
            &mut c,
            CLIENT,
            8,
            ClientRequest::Abort {
                job,
                interrupt: true,
            },
            now,
        );
        assert!(
            matches!(c.to_clients.pop(), Some((_, ControllerToClient::Reply { body: Reply::Error(e), .. })) if e.contains("already finished"))
        );
    }

    #[test]
    fn a_fan_in_runs_when_its_last_dependency_ends_and_fails_as_soon_as_one_fails() {
        let (mut s, mut c, now) = cluster_with(&[4]);
        let parents: Vec<JobId> = (0..4)
            .map(|_| submit_with(&mut s, &mut c, 1, JobOptions::default(), now).unwrap())
            .collect();
        let sent = assignments(&mut c);
        assert_eq!(sent.len(), 4, "one parent on each engine");
        let join = submit_with(&mut s, &mut c, 1, after(&parents[..3]), now).unwrap();
        let strict = submit_with(&mut s, &mut c, 1, after(&parents[1..]), now).unwrap();
        let of = |job: JobId| {
            sent.iter()
                .find(|(_, a)| matches!(&a.work, Work::MapChunk { job: j, .. } if *j == job))
                .unwrap()
                .clone()
        };
        let runs = |c: &mut Recorder, job: JobId| {
            assignments(c)
                .iter()
                .any(|(_, a)| matches!(&a.work, Work::MapChunk { job: j, .. } if *j == job))
        };
        // The last parent fails: `strict` cannot run, at once, while two of its parents run.
        let (conn, a) = of(parents[3]);
        s.on_engine_message(
            &mut c,
            conn,
            EngineToController::Done(vec![raised(&a)]),
            now,
        );
        let failed = results_of(&c, strict);
        assert_eq!(failed.len(), 1);
        assert!(
            matches!(&failed[0].outcome, Outcome::Items(i) if i[0].as_ref().is_err_and(|e| e.ename == "ImpossibleDependency"))
        );
        for (k, parent) in parents[..3].iter().enumerate() {
            let (conn, a) = of(*parent);
            finish_chunk(&mut s, &mut c, conn, &a, 10);
            assert_eq!(
                runs(&mut c, join),
                k == 2,
                "the join runs after its last parent, not before"
            );
        }
    }

    fn register(
        s: &mut State,
        c: &mut Recorder,
        conn: ConnId,
        node: &str,
        n: u32,
    ) -> Vec<EngineId> {
        s.on_engine_connected(conn, Instant::now());
        let msg = EngineToController::Register {
            node: node.into(),
            host: "127.0.0.1".into(),
            pid: 900,
            engines: (0..n)
                .map(|slot| EngineSlot {
                    slot,
                    kernel_pid: 1000,
                    rank: None,
                })
                .collect(),
        };
        s.on_engine_message(c, conn, msg, Instant::now());
        c.to_engines
            .iter()
            .rev()
            .find_map(|(to, m)| match m {
                ControllerToEngine::Registered { ids, .. } if *to == conn => Some(ids.clone()),
                _ => None,
            })
            .expect("registered")
    }

    fn items(first: u64, n: usize) -> TaskResult {
        TaskResult {
            outcome: Outcome::Items(
                (0..n)
                    .map(|i| Ok(Value::from(first as i64 + i as i64)))
                    .collect(),
            ),
            ..ok(TaskId(first), EngineId(0), first)
        }
    }

    #[test]
    fn a_restarted_controller_takes_up_its_store_where_the_last_one_stopped() {
        use super::super::store::{EndedJob, Unfinished};
        let now = Instant::now();
        let map = JobSpec::Map {
            mapper: Mapper::Python(crate::proto::Func::Expr("f".into())),
            items: (0..10).map(Value::from).collect(),
            chunksize: None,
        };
        let direct = JobSpec::Direct {
            targets: Targets::All,
            work: Work::Execute { code: "1".into() },
        };
        let recovered = Recovered {
            // Ids 3 and 4 were reserved, and perhaps given out, before the kill.
            next_job: 5,
            next_task: 40,
            next_engine: 0,
            slot_ids: vec![
                ("node0".into(), 0, EngineId(0)),
                ("node0".into(), 1, EngineId(1)),
            ],
            ended: vec![EndedJob {
                job: JobId(0),
                ok: true,
                why: None,
                engines: vec![EngineId(1)],
            }],
            unfinished: vec![
                // A map with slots 0..3 and 5 done: 3, 4 were out on engines, 6.. not yet.
                Unfinished {
                    job: JobId(1),
                    kind: JobKind::Map,
                    submitted: 1,
                    slots: 10,
                    request: Some((map, JobOptions::default())),
                    done: vec![items(0, 3), items(5, 1)],
                },
                // An execute on two engines with one result in.
                Unfinished {
                    job: JobId(2),
                    kind: JobKind::Execute,
                    submitted: 2,
                    slots: 2,
                    request: Some((direct, JobOptions::default())),
                    done: vec![ok(TaskId(30), EngineId(0), 0)],
                },
            ],
        };
        let mut s = State::new("t", Duration::from_secs(1), 2);
        let mut c = Recorder::default();
        s.on_client_connected(CLIENT);
        s.restore(&mut c, recovered, now);

        // Node slots get the ids they had; a new one the next id, on disk before it is told.
        assert_eq!(
            register(&mut s, &mut c, ConnId(1), "node0", 2),
            [EngineId(0), EngineId(1)]
        );
        assert!(c.recorded_engines.is_empty(), "{:?}", c.recorded_engines);
        assert_eq!(
            register(&mut s, &mut c, ConnId(2), "node1", 1),
            [EngineId(2)]
        );
        assert_eq!(c.recorded_engines, [("node1".to_string(), 0, EngineId(2))]);

        // The map runs exactly the items that had no result, the gap first, once each.
        let mut slots = Vec::new();
        loop {
            let batch = runs(&mut c);
            if batch.is_empty() || slots.len() > 10 {
                break;
            }
            for (conn, tasks, _) in batch {
                for a in &tasks {
                    assert!(a.task.0 >= 40, "task ids go on where they stopped: {a:?}");
                    slots.extend(a.first..a.first + items_of(a) as u64);
                    finish_chunk(&mut s, &mut c, conn, a, 10);
                }
            }
        }
        slots.sort_unstable();
        assert_eq!(slots, [3, 4, 6, 7, 8, 9]);

        // Both jobs have ended: the map with every slot, the execute with the task whose result
        // never came failed as ControllerRestarted.
        s.on_client_request(
            &mut c,
            CLIENT,
            5,
            ClientRequest::Subscribe { job: JobId(1) },
            now,
        );
        let map_results = results_of(&c, JobId(1));
        let filled: u64 = map_results
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Items(i) => i.len() as u64,
                _ => 1,
            })
            .sum();
        assert_eq!(filled, 10);
        assert!(s.jobs[&JobId(1)].remaining == 0 && s.ended[&JobId(1)].ok);
        let restarted: Vec<&TaskResult> = map_results.iter().filter(|r| r.first == 3).collect();
        assert_eq!(
            restarted[0].attempts, 2,
            "the gap was handed out before the restart too"
        );
        s.on_client_request(
            &mut c,
            CLIENT,
            6,
            ClientRequest::Subscribe { job: JobId(2) },
            now,
        );
        let direct_results = results_of(&c, JobId(2));
        assert_eq!(direct_results.len(), 2);
        let e = first_error(&direct_results[1].outcome).expect("failed");
        assert_eq!(e.ename, "ControllerRestarted");
        assert!(
            e.evalue.contains("it may have run") && e.evalue.contains("resubmit 2"),
            "{e}"
        );
        assert!(!s.ended[&JobId(2)].ok);

        // New jobs get new ids, reserved on disk first; a dependency on a job finished before
        // the restart is met, and follow finds where it ran.
        let follow = follows(JobId(0));
        let job = submit_with(&mut s, &mut c, 4, follow, now).expect("submitted");
        assert_eq!(job, JobId(5));
        assert_eq!(c.reserved_jobs, 6 + JOB_ID_BLOCK);
        let ran: Vec<EngineId> = runs(&mut c)
            .iter()
            .flat_map(|(_, t, _)| t.iter().map(|a| a.engine))
            .collect();
        assert!(
            !ran.is_empty() && ran.iter().all(|e| *e == EngineId(1)),
            "{ran:?}"
        );
    }

    #[test]
    fn missing_slots_are_the_gaps_between_results() {
        assert_eq!(missing_slots(&[], 4), [(0, 4)]);
        assert_eq!(
            missing_slots(&[items(0, 3), items(5, 1)], 10),
            [(3, 5), (6, 10)]
        );
        assert_eq!(missing_slots(&[items(2, 2), items(0, 2)], 4), []);
        let feed = resumed_feed(
            (0..10).map(Value::from).collect(),
            &[(3, 5), (6, 10)],
            Some(1),
            2,
        );
        assert_eq!(feed.next, 6);
        assert_eq!(feed.items.len(), 4);
        assert_eq!(
            feed.again.iter().map(|r| r.first).collect::<Vec<_>>(),
            [3, 4]
        );
    }

    #[test]
    fn after_a_restart_unknown_jobs_cannot_be_waited_for_and_engines_that_stay_away_strand_follow()
    {
        use super::super::store::EndedJob;
        let now = Instant::now();
        let recovered = Recovered {
            next_job: 5,
            slot_ids: vec![
                ("node0".into(), 0, EngineId(0)),
                ("node9".into(), 0, EngineId(1)),
            ],
            ended: vec![EndedJob {
                job: JobId(0),
                ok: true,
                why: None,
                engines: vec![EngineId(1)],
            }],
            ..Recovered::default()
        };
        let mut s = State::new("t", Duration::from_secs(1), 2);
        let mut c = Recorder::default();
        s.on_client_connected(CLIENT);
        s.restore(&mut c, recovered, now);
        register(&mut s, &mut c, ConnId(1), "node0", 1);

        // Job 3 was reserved before the kill but is in no store: waiting for it fails at once.
        let lost = s.next_job();
        let spec = map_spec(2, Some(1));
        let request = ClientRequest::Submit {
            spec,
            options: Box::new(after(&[JobId(3)])),
            wait: false,
        };
        s.on_client_request(&mut c, CLIENT, 9, request, now);
        let e = results_of(&c, lost)
            .iter()
            .find_map(|r| first_error(&r.outcome).cloned())
            .expect("failed");
        assert_eq!(e.ename, "ImpossibleDependency");
        assert!(e.evalue.contains("job 3 is not known"), "{e}");

        // Following job 0 onto engine 1, which does not come back: it waits for the grace,
        // then fails saying so.
        let follow = follows(JobId(0));
        let stuck = submit_with(&mut s, &mut c, 2, follow, now).expect("submitted");
        s.on_tick(&mut c, now + Duration::from_secs(1));
        assert!(results_of(&c, stuck).is_empty(), "it waits for engine 1");
        assert!(runs(&mut c).is_empty(), "nothing runs on engine 0");
        s.on_tick(&mut c, now + RESTART_GRACE + Duration::from_secs(1));
        let e = results_of(&c, stuck)
            .iter()
            .find_map(|r| first_error(&r.outcome).cloned())
            .expect("failed");
        assert_eq!(e.ename, "ImpossibleDependency");
        assert!(e.evalue.contains("did not come back within 60 s"), "{e}");
    }
}
