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
    EngineId, EngineState, EngineStatus, EngineToController, JobId, JobInfo, JobSpec, Outcome,
    RemoteError, Reply, TaskId, TaskResult, Value,
};

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
}

#[derive(Debug)]
struct Engine {
    conn: ConnId,
    node: String,
    host: String,
    pid: u32,
    tasks_done: u64,
    /// Assigned and not finished, in order; the front one is running.
    assigned: VecDeque<TaskId>,
}

#[derive(Debug)]
struct EngineConn {
    engines: Vec<EngineId>,
    last_seen: Instant,
}

#[derive(Debug)]
struct Job {
    info: JobInfo,
    results: Vec<Option<TaskResult>>,
    remaining: usize,
    subscribers: Vec<ConnId>,
}

#[derive(Debug)]
struct WaitEngines {
    conn: ConnId,
    id: u64,
    count: u32,
    deadline: Instant,
}

/// Where a task is: its job and its position there.
#[derive(Debug, Clone, Copy)]
struct TaskRef {
    job: JobId,
    index: usize,
}

/// The whole state of a controller.
pub struct State {
    cluster: String,
    heartbeat: Duration,
    engines: BTreeMap<EngineId, Engine>,
    engine_conns: HashMap<ConnId, EngineConn>,
    clients: HashSet<ConnId>,
    jobs: HashMap<JobId, Job>,
    tasks: HashMap<TaskId, TaskRef>,
    waiting: Vec<WaitEngines>,
    next_engine: u32,
    next_job: u64,
    next_task: u64,
}

impl State {
    pub fn new(cluster: &str, heartbeat: Duration) -> Self {
        Self {
            cluster: cluster.to_string(),
            heartbeat,
            engines: BTreeMap::new(),
            engine_conns: HashMap::new(),
            clients: HashSet::new(),
            jobs: HashMap::new(),
            tasks: HashMap::new(),
            waiting: Vec::new(),
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
                None => reply(
                    comm,
                    Reply::Error(format!(
                        "there is no job {job} on cluster '{}'; job ids are printed by `px --noblock`",
                        self.cluster
                    )),
                ),
                Some(j) => {
                    reply(comm, Reply::Job(j.info.clone()));
                    let done: Vec<TaskResult> = j.results.iter().flatten().cloned().collect();
                    if !done.is_empty() {
                        comm.to_client(conn, ControllerToClient::Results { job, results: done });
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
            }
        }
    }

    fn submit(
        &mut self,
        comm: &mut impl Comm,
        conn: ConnId,
        spec: &JobSpec,
    ) -> Result<JobInfo, String> {
        let JobSpec::Direct { targets, work } = &spec;
        let chosen = targets.resolve(&self.ids())?;
        let job = JobId(self.next_job);
        self.next_job += 1;
        let mut tasks = Vec::with_capacity(chosen.len());
        let mut per_conn: BTreeMap<ConnId, Vec<Assignment>> = BTreeMap::new();
        for (index, engine_id) in chosen.iter().enumerate() {
            let task = TaskId(self.next_task);
            self.next_task += 1;
            tasks.push((task, *engine_id));
            self.tasks.insert(task, TaskRef { job, index });
            let engine = self
                .engines
                .get_mut(engine_id)
                .expect("resolved ids are registered");
            engine.assigned.push_back(task);
            per_conn.entry(engine.conn).or_default().push(Assignment {
                task,
                engine: *engine_id,
                work: work.clone(),
            });
        }
        let info = JobInfo {
            job,
            submitted: now_micros(),
            tasks,
        };
        comm.record_job(&info, spec);
        self.jobs.insert(
            job,
            Job {
                results: vec![None; info.tasks.len()],
                remaining: info.tasks.len(),
                subscribers: vec![conn],
                info: info.clone(),
            },
        );
        for (econn, batch) in per_conn {
            comm.to_engine(econn, ControllerToEngine::Run(batch));
        }
        Ok(info)
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
                kernel_pids,
            } => {
                if !ec.engines.is_empty() {
                    tracing::warn!(?conn, "engine process registered twice; ignored");
                    return;
                }
                let mut ids = Vec::with_capacity(kernel_pids.len());
                for pid in kernel_pids {
                    let id = EngineId(self.next_engine);
                    self.next_engine += 1;
                    ids.push(id);
                    self.engines.insert(
                        id,
                        Engine {
                            conn,
                            node: node.clone(),
                            host: host.clone(),
                            pid,
                            tasks_done: 0,
                            assigned: VecDeque::new(),
                        },
                    );
                }
                tracing::info!(node, host, engines = %crate::proto::format_ids(&ids), "engines registered");
                ec.engines.clone_from(&ids);
                comm.to_engine(
                    conn,
                    ControllerToEngine::Registered {
                        ids,
                        heartbeat_ms: self.heartbeat.as_millis() as u64,
                    },
                );
                self.answer_waiters(comm, now);
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

    fn finish(&mut self, comm: &mut impl Comm, results: Vec<TaskResult>) {
        let mut by_job: BTreeMap<JobId, Vec<(usize, TaskResult)>> = BTreeMap::new();
        for result in results {
            let Some(tref) = self.tasks.remove(&result.task) else {
                tracing::warn!(task = %result.task, "result for an unknown task; ignored");
                continue;
            };
            if let Some(engine) = self.engines.get_mut(&result.engine) {
                engine.tasks_done += 1;
                engine.assigned.retain(|t| *t != result.task);
            }
            by_job
                .entry(tref.job)
                .or_default()
                .push((tref.index, result));
        }
        for (job_id, indexed) in by_job {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let mut results = Vec::with_capacity(indexed.len());
            for (index, r) in indexed {
                if job.results[index].is_none() {
                    job.remaining -= 1;
                }
                job.results[index] = Some(r.clone());
                results.push(r);
            }
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
            if job.remaining == 0 {
                job.subscribers.clear();
            }
        }
    }

    /// An engine connection closed or went silent: its engines are gone, and every task they
    /// held fails with a reason that names them.
    pub fn on_engine_gone(&mut self, comm: &mut impl Comm, conn: ConnId, reason: &str) {
        let Some(ec) = self.engine_conns.remove(&conn) else {
            return;
        };
        let mut failed = Vec::new();
        for id in ec.engines {
            let Some(engine) = self.engines.remove(&id) else {
                continue;
            };
            tracing::warn!(engine = %id, node = engine.node, reason, "engine lost");
            let now = now_micros();
            for task in engine.assigned {
                failed.push(TaskResult {
                    task,
                    engine: id,
                    outcome: Outcome::Err(RemoteError {
                        ename: "EngineLost".into(),
                        evalue: format!(
                            "engine {id} (node {}, host {}) was lost: {reason}",
                            engine.node, engine.host
                        ),
                        traceback: String::new(),
                    }),
                    stdout: String::new(),
                    stderr: String::new(),
                    execution_count: 0,
                    started: now,
                    completed: now,
                });
            }
        }
        if !failed.is_empty() {
            self.finish(comm, failed);
        }
        comm.close(conn);
    }

    /// The clock: loses silent engines and answers waiters whose time ran out.
    pub fn on_tick(&mut self, comm: &mut impl Comm, now: Instant) {
        let limit = self.lost_after();
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
            self.on_engine_gone(comm, conn, &reason);
        }
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
            .map(|(id, e)| EngineStatus {
                id: *id,
                node: e.node.clone(),
                host: e.host.clone(),
                pid: e.pid,
                state: if e.assigned.is_empty() {
                    EngineState::Idle
                } else {
                    EngineState::Busy
                },
                tasks_done: e.tasks_done,
                queued: e.assigned.len() as u64,
            })
            .collect();
        ClusterStatus {
            cluster: self.cluster.clone(),
            controller_pid: std::process::id(),
            engines,
            queued: self.tasks.len() as u64,
            jobs: self.jobs.len() as u64,
        }
    }
}

/// A result's value when it is `Ok`, for tests and logs.
pub fn ok_value(r: &TaskResult) -> Option<&Value> {
    match &r.outcome {
        Outcome::Ok { value, .. } => Some(value),
        Outcome::Err(_) => None,
    }
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
    }

    const CLIENT: ConnId = ConnId(100);

    fn cluster_with(engines_per_conn: &[usize]) -> (State, Recorder, Instant) {
        let now = Instant::now();
        let mut s = State::new("t", Duration::from_secs(1));
        let mut c = Recorder::default();
        for (i, n) in engines_per_conn.iter().enumerate() {
            let conn = ConnId(i as u64);
            s.on_engine_connected(conn, now);
            let msg = EngineToController::Register {
                node: format!("node{i}"),
                host: "127.0.0.1".into(),
                kernel_pids: vec![1000; *n],
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

    fn ok(task: TaskId, engine: EngineId) -> TaskResult {
        TaskResult {
            task,
            engine,
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
            let ControllerToEngine::Run(batch) = msg else {
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
            EngineToController::Done(vec![ok(t0, e0)]),
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
            EngineToController::Done(vec![ok(t1, e1)]),
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
            kernel_pids: vec![1, 2],
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
}
