//! The task store: every job and every result, in SQLite, like ipyparallel's task database.
//!
//! One thread owns the database. Writes go down a channel to it and what comes within
//! [`GROUP_COMMIT`] of each other is committed in one transaction, so they never block the
//! controller. Reads (`history`, results of jobs no longer held in memory, the request of a
//! job to resubmit, `purge`) go down the same channel and are answered after every write sent
//! before them: a client that asks right after a job ended sees it. The file outlives the controller, so a cluster's
//! history can also be read with `sqlite3` after it is gone.
//!
//! A controller that starts on an existing store resumes from it ([`Recovered`]): job and task
//! ids go on where they stopped, engines get the ids they had, finished jobs still count for
//! dependencies, and unfinished jobs are handed back to be finished. Job ids are reserved in
//! blocks that are on disk before any id of the block is handed out, and new engine ids are on
//! disk before the engines hear them, so a killed controller never gives an id out twice.
//!
//! Queries are ipyparallel's `db_query` dicts (MongoDB's operators) over the keys of
//! [`JobRecord`], turned into SQL with bound parameters by [`where_clause`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde_json::{json, Value as Json};

use crate::proto::{
    EngineId, Func, JobId, JobInfo, JobKind, JobOptions, JobRecord, JobSpec, Mapper, Micros,
    Outcome, Reply, TaskId, TaskResult, Work,
};

/// A question for the store, answered through [`StoreOp::Read`]'s callback.
#[derive(Debug)]
pub enum Read {
    /// Jobs matching a `db_query` dict (JSON text, `{}` for all), newest first.
    History { filter: String, limit: u32 },
    /// A finished job's description and every result, for a client attaching late.
    Job(JobId),
    /// What was submitted as a job, to submit it again.
    Request(JobId),
    /// Deletes finished jobs (and their tasks) matching a `db_query` dict; answers how many.
    Purge { filter: String },
}

/// The store's answer to a [`Read`]: the reply for the client, and for [`Read::Job`] the
/// job's results to send after it.
pub type Answer = (Reply, Vec<TaskResult>);

/// One operation for the store's thread.
pub enum StoreOp {
    /// A submitted job: summarised, and kept whole for `resubmit` unless it is large, here.
    Job {
        info: JobInfo,
        spec: Box<JobSpec>,
        options: Box<JobOptions>,
    },
    Results {
        job: JobId,
        results: Vec<TaskResult>,
    },
    /// A job's last task is in: its status (`ok`, `failed`, `aborted`, `timeout`,
    /// `impossible`) and first error.
    Ended {
        job: JobId,
        status: &'static str,
        error: Option<String>,
        completed: Micros,
        /// The engines its tasks ran on (not those where the controller failed them).
        ran_on: Vec<EngineId>,
    },
    Read {
        read: Read,
        answer: Box<dyn FnOnce(Answer) + Send>,
    },
    /// Engine ids given to node slots.
    Engines(Vec<(String, u32, EngineId)>),
    /// Job ids below this one may be in use (the reservation only grows).
    ReserveJobs(u64),
    /// The controller stops cleanly, its next job id this: every job is recorded, so the next
    /// controller need not skip the rest of the reservation — unless a write failed.
    Stopped(u64),
    /// Answered once everything sent before it is committed (or failed).
    Sync(mpsc::Sender<()>),
}

/// What a controller starting on an existing store takes up again.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The first job id not given out before.
    pub next_job: u64,
    /// The first task id not in the store.
    pub next_task: u64,
    /// The first engine id not in use: past every engine the store names, for stores written
    /// before node slots were recorded.
    pub next_engine: u32,
    /// The id each node slot had: `(node, slot, id)`.
    pub slot_ids: Vec<(String, u32, EngineId)>,
    /// How every finished job ended, for dependencies on it.
    pub ended: Vec<EndedJob>,
    /// Jobs submitted and not finished, oldest first.
    pub unfinished: Vec<Unfinished>,
}

/// How a finished job ended.
#[derive(Debug)]
pub struct EndedJob {
    pub job: JobId,
    pub ok: bool,
    /// Its first error.
    pub why: Option<String>,
    /// Where its tasks ran.
    pub engines: Vec<EngineId>,
}

/// A job the store holds as unfinished.
#[derive(Debug)]
pub struct Unfinished {
    pub job: JobId,
    pub kind: JobKind,
    pub submitted: Micros,
    pub slots: u64,
    /// What was submitted; `None` when it was too large to keep.
    pub request: Option<(JobSpec, JobOptions)>,
    /// The results already in.
    pub done: Vec<TaskResult>,
}

/// The sending side; dropping it lets the thread finish and close the file.
pub struct Store {
    tx: Option<mpsc::Sender<StoreOp>>,
    thread: Option<JoinHandle<()>>,
    /// Job ids below this are reserved on disk (committed).
    reserved: Arc<AtomicU64>,
}

/// Requests larger than this are recorded by their summary only, not kept for `resubmit`.
pub const KEEP_REQUEST_BYTES: usize = 16 << 20;

/// A task's pickled value larger than this is not kept in the store: a 100 MB pull reaches the
/// clients that wait for it, and the store does not write it to disk again.
pub const KEEP_RESULT_BYTES: usize = 16 << 20;

/// What the store keeps of an outcome: all of it, except a single pickled value above
/// [`KEEP_RESULT_BYTES`], which becomes an error that says so — what a client attaching later
/// (`starling result`, `rc.get_result`) is told. (A map's items are kept whole: a restarted
/// controller resumes the map from them.)
fn kept_outcome(outcome: &Outcome) -> std::borrow::Cow<'_, Outcome> {
    use std::borrow::Cow;
    match outcome {
        Outcome::Ok {
            value: value @ crate::proto::Value::Pickle(p),
            ..
        } if value.approx_bytes() > KEEP_RESULT_BYTES => {
            let shown: String = p.repr.chars().take(200).collect();
            Cow::Owned(Outcome::Err(Box::new(crate::proto::RemoteError {
                ename: "ResultNotKept".into(),
                evalue: format!(
                    "the value ({shown}) was {} MiB, above the {} MiB the task store keeps of one result; it went only to the clients that waited for the job: run the job again to get it",
                    value.approx_bytes() >> 20,
                    KEEP_RESULT_BYTES >> 20
                ),
                traceback: String::new(),
            })))
        }
        _ => Cow::Borrowed(outcome),
    }
}

/// Bumped when the tables change shape.
const SCHEMA_VERSION: i64 = 3;
/// Stores of this version are brought up to [`SCHEMA_VERSION`] by adding the tables it lacks.
const UPGRADABLE_FROM: i64 = 2;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS jobs (
    job INTEGER PRIMARY KEY,
    submitted INTEGER NOT NULL,
    submitter TEXT NOT NULL,
    kind TEXT NOT NULL,
    label TEXT,
    spec TEXT NOT NULL,
    items INTEGER NOT NULL,
    after TEXT,
    follow TEXT,
    retries INTEGER NOT NULL,
    timeout REAL,
    status TEXT NOT NULL,
    error TEXT,
    completed INTEGER,
    request BLOB,
    ran_on TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    task INTEGER PRIMARY KEY,
    job INTEGER NOT NULL,
    engine INTEGER NOT NULL,
    first INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT NOT NULL,
    outcome BLOB NOT NULL,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    started INTEGER NOT NULL,
    completed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks(job);
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs(submitted);
CREATE TABLE IF NOT EXISTS engines (
    node TEXT NOT NULL,
    slot INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (node, slot)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

impl Store {
    /// Opens (or creates) the store at `path`, reads what a controller resumes from it, and
    /// starts its thread.
    pub fn open(path: &Path) -> Result<(Self, Recovered), rusqlite::Error> {
        let conn = Connection::open(path)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let has_tables: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'jobs'",
            [],
            |r| r.get(0),
        )?;
        if has_tables && version != SCHEMA_VERSION && version != UPGRADABLE_FROM {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "{} was written by another version of starling (schema {version}, this one writes {SCHEMA_VERSION}); move it away to start a new one",
                path.display()
            )));
        }
        if has_tables && version == UPGRADABLE_FROM {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN ran_on TEXT")?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let recovered = recover(&conn)?;
        let reserved = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let committed = reserved.clone();
        let thread = std::thread::Builder::new()
            .name("task-store".into())
            .spawn(move || serve(conn, &rx, &committed))
            .expect("a thread can be spawned");
        Ok((
            Self {
                tx: Some(tx),
                thread: Some(thread),
                reserved,
            },
            recovered,
        ))
    }

    pub fn send(&self, op: StoreOp) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(op);
        }
    }

    /// Returns once everything sent before is committed (or failed: see the log).
    pub fn sync(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(StoreOp::Sync(tx));
        let _ = rx.recv();
    }

    /// Job ids below this are reserved on disk.
    pub fn reserved_jobs(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a record waits for others to share its transaction. A busy controller then
/// writes (and wakes this thread) once per window instead of once per job and result; a read
/// or a sync that comes first is answered at once, and one that comes during the window
/// waits for it at most.
const GROUP_COMMIT: std::time::Duration = std::time::Duration::from_millis(2);

fn serve(mut conn: Connection, rx: &mpsc::Receiver<StoreOp>, reserved: &AtomicU64) {
    // Whether a write failed: then a clean stop does not give back reserved job ids.
    let mut failed = false;
    let mut flush = |conn: &mut Connection, writes: Vec<StoreOp>| {
        if writes.is_empty() {
            return;
        }
        match write_batch(conn, writes, failed) {
            Ok(Some(upto)) => {
                reserved.fetch_max(upto, Ordering::AcqRel);
            }
            Ok(None) => {}
            Err(e) => {
                failed = true;
                tracing::error!("the task store could not be written: {e}");
            }
        }
    };
    while let Ok(first) = rx.recv() {
        if matches!(
            first,
            StoreOp::Job { .. } | StoreOp::Results { .. } | StoreOp::Ended { .. }
        ) {
            // Group commit: what else comes meanwhile goes in the same transaction, and the
            // senders do not wake a thread that sleeps.
            std::thread::sleep(GROUP_COMMIT);
        }
        let mut writes = Vec::new();
        for op in std::iter::once(first).chain(rx.try_iter()) {
            match op {
                StoreOp::Read { read, answer } => {
                    // Everything sent before the question is written first.
                    flush(&mut conn, std::mem::take(&mut writes));
                    answer(self::read(&conn, read).unwrap_or_else(|e| {
                        let why = format!("the task store could not be read: {e}");
                        (Reply::Error(why), Vec::new())
                    }));
                }
                StoreOp::Sync(done) => {
                    flush(&mut conn, std::mem::take(&mut writes));
                    let _ = done.send(());
                }
                op => writes.push(op),
            }
        }
        flush(&mut conn, writes);
    }
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Execute => "execute",
        JobKind::Shell => "shell",
        JobKind::Apply => "apply",
        JobKind::Push => "push",
        JobKind::Pull => "pull",
        JobKind::Scatter => "scatter",
        JobKind::Map => "map",
    }
}

fn kind_from(name: &str) -> JobKind {
    match name {
        "execute" => JobKind::Execute,
        "shell" => JobKind::Shell,
        "apply" => JobKind::Apply,
        "push" => JobKind::Push,
        "pull" => JobKind::Pull,
        "scatter" => JobKind::Scatter,
        _ => JobKind::Map,
    }
}

/// Writes `batch` in one transaction; returns the job id reservation it committed, if any.
/// `failed`: an earlier batch failed, so a clean stop must not give back reserved ids.
fn write_batch(
    conn: &mut Connection,
    batch: Vec<StoreOp>,
    failed: bool,
) -> rusqlite::Result<Option<u64>> {
    let mut reserved = None;
    let tx = conn.transaction()?;
    {
        let mut job_stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO jobs VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', NULL, NULL, ?12, NULL)",
        )?;
        let mut task_stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO tasks VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut end_stmt = tx.prepare_cached(
            "UPDATE jobs SET status = ?2, error = ?3, completed = ?4, ran_on = ?5 WHERE job = ?1",
        )?;
        let deps = |d: &Option<crate::proto::Dependency>| {
            d.as_ref().map(|d| {
                json!({"jobs": d.jobs, "all": d.all, "success": d.success, "failure": d.failure})
                    .to_string()
            })
        };
        for op in batch {
            match op {
                StoreOp::Job {
                    info,
                    spec,
                    options,
                } => {
                    let summary = spec_text(&spec);
                    let request = request_blob(&spec, &options);
                    job_stmt.execute(params![
                        info.job.0 as i64,
                        info.submitted as i64,
                        options.submitter,
                        kind_name(info.kind),
                        options.label,
                        summary,
                        info.slots as i64,
                        deps(&options.after),
                        deps(&options.follow),
                        options.retries,
                        options.timeout_ms.map(|ms| ms as f64 / 1000.0),
                        request,
                    ])?;
                }
                StoreOp::Results { job, results } => {
                    for r in results {
                        let (ok, text) = match &r.outcome {
                            Outcome::Ok { value, .. } => (true, value.to_python_repr()),
                            Outcome::Err(e) => (false, format!("{e}\n{}", e.traceback)),
                            Outcome::Items(items) => {
                                let shown: Vec<String> = items
                                    .iter()
                                    .map(|i| match i {
                                        Ok(v) => v.to_python_repr(),
                                        Err(e) => format!("<{e}>"),
                                    })
                                    .collect();
                                (
                                    items.iter().all(Result::is_ok),
                                    format!("[{}]", shown.join(", ")),
                                )
                            }
                        };
                        let outcome =
                            rmp_serde::to_vec(&kept_outcome(&r.outcome)).unwrap_or_default();
                        task_stmt.execute(params![
                            r.task.0 as i64,
                            job.0 as i64,
                            i64::from(r.engine.0),
                            r.first as i64,
                            ok,
                            text,
                            outcome,
                            r.stdout,
                            r.stderr,
                            r.attempts,
                            r.started as i64,
                            r.completed as i64
                        ])?;
                    }
                }
                StoreOp::Ended {
                    job,
                    status,
                    error,
                    completed,
                    ran_on,
                } => {
                    let ran_on: Vec<String> = ran_on.iter().map(ToString::to_string).collect();
                    end_stmt.execute(params![
                        job.0 as i64,
                        status,
                        error,
                        completed as i64,
                        ran_on.join(",")
                    ])?;
                }
                StoreOp::Engines(ids) => {
                    let mut stmt = tx.prepare_cached(
                        "INSERT OR REPLACE INTO engines (node, slot, id) VALUES (?1, ?2, ?3)",
                    )?;
                    for (node, slot, id) in ids {
                        stmt.execute(params![node, slot, id.0])?;
                    }
                }
                StoreOp::ReserveJobs(upto) => {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('reserved_jobs', ?1)
                         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                        [upto as i64],
                    )?;
                    reserved = Some(reserved.unwrap_or(0).max(upto));
                }
                StoreOp::Stopped(next) if !failed => {
                    tx.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('reserved_jobs', ?1)",
                        [next as i64],
                    )?;
                }
                StoreOp::Stopped(_) => {}
                StoreOp::Read { .. } | StoreOp::Sync(_) => {
                    unreachable!("reads and syncs are answered, not batched")
                }
            }
        }
    }
    tx.commit()?;
    Ok(reserved)
}

/// The most times one of a job's tasks was handed out.
const ATTEMPTS: &str = "(SELECT max(attempts) FROM tasks t WHERE t.job = jobs.job)";
/// The engines that ran a job's tasks (4294967295 is `EngineId::NONE`: tasks that never ran).
const ENGINES: &str = "(SELECT group_concat(DISTINCT engine) FROM tasks t WHERE t.job = jobs.job AND t.engine != 4294967295)";

/// The keys a query may name, and the SQL each stands for (over `jobs`). `engine` is tested
/// against the job's tasks instead (see [`where_clause`]).
const KEYS: [(&str, &str); 14] = [
    ("job", "job"),
    ("submitted", "submitted"),
    ("completed", "completed"),
    ("submitter", "submitter"),
    ("kind", "kind"),
    ("label", "label"),
    ("status", "status"),
    ("error", "error"),
    ("items", "items"),
    ("retries", "retries"),
    ("timeout", "timeout"),
    ("engine", ENGINES),
    ("attempts", ATTEMPTS),
    ("spec", "spec"),
];

fn key_names() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

fn sql_value(v: &Json, key: &str) -> Result<rusqlite::types::Value, String> {
    use rusqlite::types::Value as V;
    Ok(match v {
        Json::Null => V::Null,
        Json::Bool(b) => V::Integer(i64::from(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => V::Integer(i),
            None => V::Real(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => V::Text(s.clone()),
        other => {
            return Err(format!(
                "the value for '{key}' must be a number, a string, true/false or null, not {other}"
            ))
        }
    })
}

/// Turns a `db_query` dict into a SQL condition over `jobs` and its parameters:
/// `{"status": "failed", "submitted": {"$gt": T}, "label": {"$in": ["a", "b"]}}`. Keys are
/// those of [`KEYS`]; operators are `$lt`, `$lte`, `$gt`, `$gte`, `$eq`, `$ne`, `$in`, `$nin`
/// and `$exists`. `engine` matches jobs that ran a task on that engine.
pub fn where_clause(filter: &str) -> Result<(String, Vec<rusqlite::types::Value>), String> {
    let query: Json = if filter.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(filter).map_err(|e| format!("the query is not JSON: {e}"))?
    };
    let Json::Object(fields) = query else {
        return Err(format!(
            "a query is a dict of keys to values or to {{operator: value}}, not {query}"
        ));
    };
    let mut conds = vec!["1".to_string()];
    let mut args = Vec::new();
    for (key, test) in fields {
        let Some((_, column)) = KEYS.iter().find(|(k, _)| *k == key) else {
            return Err(format!(
                "unknown key '{key}' in the query; the keys are {}",
                key_names()
            ));
        };
        let engine = key == "engine";
        let ops = match test {
            Json::Object(ops) => ops.into_iter().collect::<Vec<_>>(),
            v => vec![("$eq".to_string(), v)],
        };
        if ops.is_empty() {
            return Err(format!("the test for '{key}' names no operator"));
        }
        for (op, v) in ops {
            let list = |v: &Json| -> Result<Vec<rusqlite::types::Value>, String> {
                match v {
                    Json::Array(items) => items.iter().map(|i| sql_value(i, &key)).collect(),
                    other => Err(format!("{op} for '{key}' takes a list, not {other}")),
                }
            };
            if engine {
                // Jobs with a task on the engine(s): a test on the tasks of the job.
                let (cmp, vals): (String, Vec<_>) = match op.as_str() {
                    "$eq" => ("t.engine = ?".into(), vec![sql_value(&v, &key)?]),
                    "$in" => {
                        let vals = list(&v)?;
                        (
                            format!("t.engine IN ({})", vec!["?"; vals.len()].join(", ")),
                            vals,
                        )
                    }
                    _ => {
                        return Err(format!(
                            "'engine' takes a value or $in (jobs that ran a task there), not {op}"
                        ))
                    }
                };
                conds.push(format!(
                    "EXISTS (SELECT 1 FROM tasks t WHERE t.job = jobs.job AND {cmp})"
                ));
                args.extend(vals);
                continue;
            }
            let sql = match op.as_str() {
                "$lt" | "$lte" | "$gt" | "$gte" | "$ne" | "$eq" => {
                    let cmp = match op.as_str() {
                        "$lt" => "<",
                        "$lte" => "<=",
                        "$gt" => ">",
                        "$gte" => ">=",
                        "$ne" => "IS NOT",
                        _ => "IS",
                    };
                    args.push(sql_value(&v, &key)?);
                    format!("{column} {cmp} ?")
                }
                "$in" | "$nin" => {
                    let vals = list(&v)?;
                    let n = vals.len();
                    args.extend(vals);
                    let not = if op == "$nin" { "NOT " } else { "" };
                    format!("{column} {not}IN ({})", vec!["?"; n].join(", "))
                }
                "$exists" => match v {
                    Json::Bool(true) => format!("{column} IS NOT NULL"),
                    Json::Bool(false) => format!("{column} IS NULL"),
                    other => return Err(format!("$exists takes true or false, not {other}")),
                },
                other => {
                    return Err(format!(
                        "unknown operator '{other}' for '{key}'; use $lt, $lte, $gt, $gte, $eq, $ne, $in, $nin or $exists"
                    ))
                }
            };
            conds.push(sql);
        }
    }
    Ok((conds.join(" AND "), args))
}

fn error(why: String) -> Answer {
    (Reply::Error(why), Vec::new())
}

fn read(conn: &Connection, read: Read) -> rusqlite::Result<Answer> {
    Ok(match read {
        Read::History { filter, limit } => {
            let (cond, args) = match where_clause(&filter) {
                Ok(x) => x,
                Err(e) => return Ok(error(e)),
            };
            let sql = format!(
                "SELECT job, submitted, completed, submitter, kind, label, status, error, items, retries, timeout, after, follow, spec, {ATTEMPTS}, {ENGINES}
                 FROM jobs WHERE {cond} ORDER BY job DESC LIMIT {limit}"
            );
            let mut stmt = conn.prepare(&sql)?;
            let deps = |text: Option<String>| -> Vec<JobId> {
                text.and_then(|t| serde_json::from_str::<Json>(&t).ok())
                    .and_then(|v| serde_json::from_value(v["jobs"].clone()).ok())
                    .unwrap_or_default()
            };
            let rows = stmt.query_map(params_from_iter(args), |r| {
                let engines: Option<String> = r.get(15)?;
                Ok(JobRecord {
                    job: JobId(r.get::<_, i64>(0)? as u64),
                    submitted: r.get::<_, i64>(1)? as u64,
                    completed: r.get::<_, Option<i64>>(2)?.map(|c| c as u64),
                    submitter: r.get(3)?,
                    kind: r.get(4)?,
                    label: r.get(5)?,
                    status: r.get(6)?,
                    error: r.get(7)?,
                    items: r.get::<_, i64>(8)? as u64,
                    retries: r.get(9)?,
                    timeout: r.get(10)?,
                    after: deps(r.get(11)?),
                    follow: deps(r.get(12)?),
                    spec: r.get(13)?,
                    attempts: r.get::<_, Option<u32>>(14)?.unwrap_or(0),
                    engines: engines
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|e| e.parse().ok().map(EngineId))
                        .collect(),
                })
            })?;
            (
                Reply::History(rows.collect::<rusqlite::Result<_>>()?),
                Vec::new(),
            )
        }
        Read::Job(job) => {
            let head = conn
                .query_row(
                    "SELECT submitted, kind, items, status FROM jobs WHERE job = ?1",
                    [job.0 as i64],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, String>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some((submitted, kind, slots, _status)) = head else {
                return Ok(error(format!(
                    "job {job} is not in the task store (purged?)"
                )));
            };
            let kind = kind_from(&kind);
            let results = task_results(conn, job)?;
            let tasks = if kind.per_item() {
                Vec::new()
            } else {
                results.iter().map(|r| (r.task, r.engine)).collect()
            };
            let info = JobInfo {
                job,
                kind,
                submitted,
                tasks,
                slots,
            };
            (Reply::Job(info), results)
        }
        Read::Request(job) => {
            let blob: Option<Option<Vec<u8>>> = conn
                .query_row(
                    "SELECT request FROM jobs WHERE job = ?1",
                    [job.0 as i64],
                    |r| r.get(0),
                )
                .optional()?;
            match blob {
                None => error(format!("job {job} is not in the task store (purged?)")),
                Some(None) => error(format!(
                    "job {job} was larger than {} MiB, so the store kept only its summary; submit it again from where it came",
                    KEEP_REQUEST_BYTES >> 20
                )),
                Some(Some(b)) => match rmp_serde::from_slice(&b) {
                    Ok((spec, options)) => (
                        Reply::Request {
                            spec,
                            options: Box::new(options),
                        },
                        Vec::new(),
                    ),
                    Err(e) => error(format!("job {job}'s request could not be read back: {e}")),
                },
            }
        }
        Read::Purge { filter } => {
            let (cond, args) = match where_clause(&filter) {
                Ok(x) => x,
                Err(e) => return Ok(error(e)),
            };
            let tx = conn.unchecked_transaction()?;
            tx.execute(
                "CREATE TEMP TABLE IF NOT EXISTS purged (job INTEGER PRIMARY KEY)",
                [],
            )?;
            tx.execute("DELETE FROM purged", [])?;
            tx.execute(
                &format!(
                    "INSERT INTO purged SELECT job FROM jobs WHERE status != 'pending' AND {cond}"
                ),
                params_from_iter(args),
            )?;
            tx.execute(
                "DELETE FROM tasks WHERE job IN (SELECT job FROM purged)",
                [],
            )?;
            let n = tx.execute("DELETE FROM jobs WHERE job IN (SELECT job FROM purged)", [])?;
            tx.commit()?;
            (Reply::Count(n as u64), Vec::new())
        }
    })
}

/// Every result of `job` in the store, in slot order.
fn task_results(conn: &Connection, job: JobId) -> rusqlite::Result<Vec<TaskResult>> {
    let mut stmt = conn.prepare_cached(
        "SELECT task, engine, first, outcome, stdout, stderr, attempts, started, completed FROM tasks WHERE job = ?1 ORDER BY first",
    )?;
    let results = stmt.query_map([job.0 as i64], |r| {
        let blob: Vec<u8> = r.get(3)?;
        Ok(TaskResult {
            task: TaskId(r.get::<_, i64>(0)? as u64),
            engine: EngineId(r.get(1)?),
            first: r.get::<_, i64>(2)? as u64,
            outcome: rmp_serde::from_slice(&blob).unwrap_or_else(|e| {
                Outcome::Err(Box::new(crate::proto::RemoteError {
                    ename: "StoreError".into(),
                    evalue: format!("this result could not be read back: {e}"),
                    traceback: String::new(),
                }))
            }),
            stdout: r.get(4)?,
            stderr: r.get(5)?,
            execution_count: 0,
            attempts: r.get(6)?,
            started: r.get::<_, i64>(7)? as u64,
            completed: r.get::<_, i64>(8)? as u64,
        })
    })?;
    results.collect()
}

/// What a controller starting on this store takes up again (see [`Recovered`]).
fn recover(conn: &Connection) -> rusqlite::Result<Recovered> {
    let max = |sql: &str| -> rusqlite::Result<u64> {
        conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.map_or(0, |v| v as u64 + 1))
    };
    let reserved: u64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'reserved_jobs'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, |v| v as u64);
    let next_job = max("SELECT max(job) FROM jobs")?.max(reserved);
    let next_task = max("SELECT max(task) FROM tasks")?;
    let slot_ids: Vec<(String, u32, EngineId)> = conn
        .prepare("SELECT node, slot, id FROM engines ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, EngineId(r.get(2)?))))?
        .collect::<rusqlite::Result<_>>()?;
    // A store from before node slots were recorded: new ids start past every one it names.
    let next_engine = if slot_ids.is_empty() {
        conn.query_row(
            "SELECT max(engine) FROM tasks WHERE engine != ?1",
            [EngineId::NONE.0],
            |r| r.get::<_, Option<u32>>(0),
        )?
        .map_or(0, |e| e + 1)
    } else {
        0
    };
    // Where finished jobs ran: recorded when they ended, or for jobs of older stores, the
    // engines of their tasks.
    let mut engines: HashMap<u64, Vec<EngineId>> = HashMap::new();
    {
        let mut stmt = conn.prepare(
            "SELECT DISTINCT t.job, t.engine FROM tasks t JOIN jobs j ON j.job = t.job
             WHERE j.status != 'pending' AND j.ran_on IS NULL AND t.engine != ?1",
        )?;
        let rows = stmt.query_map([EngineId::NONE.0], |r| {
            Ok((r.get::<_, i64>(0)? as u64, EngineId(r.get(1)?)))
        })?;
        for row in rows {
            let (job, engine) = row?;
            engines.entry(job).or_default().push(engine);
        }
    }
    let ended = conn
        .prepare(
            "SELECT job, status, error, ran_on FROM jobs WHERE status != 'pending' ORDER BY job",
        )?
        .query_map([], |r| {
            let job = r.get::<_, i64>(0)? as u64;
            let status: String = r.get(1)?;
            let ran_on: Option<String> = r.get(3)?;
            Ok(EndedJob {
                job: JobId(job),
                ok: status == "ok",
                why: r.get(2)?,
                engines: match ran_on {
                    Some(list) => list
                        .split(',')
                        .filter_map(|e| e.parse().ok().map(EngineId))
                        .collect(),
                    None => engines.remove(&job).unwrap_or_default(),
                },
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut unfinished: Vec<Unfinished> = conn
        .prepare(
            "SELECT job, submitted, kind, items, request FROM jobs WHERE status = 'pending' ORDER BY job",
        )?
        .query_map([], |r| {
            let job = JobId(r.get::<_, i64>(0)? as u64);
            let request: Option<Vec<u8>> = r.get(4)?;
            Ok(Unfinished {
                job,
                submitted: r.get::<_, i64>(1)? as u64,
                kind: kind_from(&r.get::<_, String>(2)?),
                slots: r.get::<_, i64>(3)? as u64,
                request: request.and_then(|b| match rmp_serde::from_slice(&b) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(%job, "the request of unfinished job {job} cannot be read back: {e}");
                        None
                    }
                }),
                done: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for u in &mut unfinished {
        u.done = task_results(conn, u.job)?;
    }
    Ok(Recovered {
        next_job,
        next_task,
        next_engine,
        slot_ids,
        ended,
        unfinished,
    })
}

/// The request kept for `resubmit`, unless it is too large to keep.
pub fn request_blob(spec: &JobSpec, options: &JobOptions) -> Option<Vec<u8>> {
    let values: usize = match spec {
        JobSpec::Direct { work, .. } => match work {
            Work::Apply { args, .. } => args.iter().map(crate::proto::Value::approx_bytes).sum(),
            Work::Push { values } => values.iter().map(|(_, v)| v.approx_bytes()).sum(),
            Work::MapChunk { items, .. } | Work::Scatter { items, .. } => {
                items.iter().map(crate::proto::Value::approx_bytes).sum()
            }
            _ => 0,
        },
        JobSpec::Scatter { items, .. }
        | JobSpec::DirectMap { items, .. }
        | JobSpec::Map { items, .. } => items.iter().map(crate::proto::Value::approx_bytes).sum(),
    };
    if values > KEEP_REQUEST_BYTES {
        return None;
    }
    rmp_serde::to_vec(&(spec, options))
        .ok()
        .filter(|b| b.len() <= KEEP_REQUEST_BYTES)
}

/// The JSON text a job spec is stored as: what it ran and on how much, readable with
/// `sqlite3`. Items and values are counted rather than copied, and pickled functions are
/// recorded by size, so a 100 MB push does not become 100 MB of text.
pub fn spec_text(spec: &JobSpec) -> String {
    let func = |f: &Func| match f {
        Func::Expr(e) => json!(e),
        Func::Module { module, attr, .. } => json!(format!("{module}.py:{attr}")),
        Func::Pickle { bytes, buffers, .. } => json!(format!(
            "<pickled function, {} bytes>",
            bytes.len() + buffers.iter().map(bytes::Bytes::len).sum::<usize>()
        )),
    };
    let mapper = |m: &Mapper| match m {
        Mapper::Python(f) => json!({ "python": func(f) }),
        Mapper::Star(f) => json!({ "python_star": func(f) }),
        Mapper::Shell(c) => json!({ "shell": c }),
    };
    let v = match spec {
        JobSpec::Direct { targets, work } => {
            let work = match work {
                Work::Execute { code } => json!({ "execute": code }),
                Work::Shell { command } => json!({ "shell": command }),
                Work::Apply { func: f, args } => json!({ "apply": func(f), "args": args.len() }),
                Work::Push { values } => {
                    json!({ "push": values.iter().map(|(k, _)| k).collect::<Vec<_>>() })
                }
                Work::Pull { names } => json!({ "pull": names }),
                Work::MapChunk { items, .. } => json!({ "map_chunk": items.len() }),
                Work::Scatter { name, items } => json!({ "scatter": name, "items": items.len() }),
            };
            json!({ "direct": { "targets": targets, "work": work } })
        }
        JobSpec::Scatter {
            targets,
            name,
            items,
        } => json!({ "scatter": { "targets": targets, "name": name, "items": items.len() } }),
        JobSpec::DirectMap {
            targets,
            mapper: m,
            items,
        } => {
            json!({ "direct_map": { "targets": targets, "mapper": mapper(m), "items": items.len() } })
        }
        JobSpec::Map {
            mapper: m,
            items,
            chunksize,
        } => {
            json!({ "map": { "mapper": mapper(m), "items": items.len(), "chunksize": chunksize } })
        }
    };
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_stored_before_options_gained_engines_read_back() {
        // JobOptions as protocol 6 stored them: six fields, positional.
        #[derive(serde::Serialize)]
        struct OldOptions {
            label: Option<String>,
            submitter: String,
            after: Option<crate::proto::Dependency>,
            follow: Option<crate::proto::Dependency>,
            retries: u32,
            timeout_ms: Option<u64>,
        }
        let spec = JobSpec::Map {
            mapper: crate::proto::Mapper::Python(Func::Expr("f".into())),
            items: vec![crate::proto::Value::from(1)],
            chunksize: None,
        };
        let old = OldOptions {
            label: Some("old".into()),
            submitter: "me@here".into(),
            after: None,
            follow: None,
            retries: 2,
            timeout_ms: Some(5),
        };
        let blob = rmp_serde::to_vec(&(&spec, &old)).unwrap();
        let (back, options): (JobSpec, JobOptions) = rmp_serde::from_slice(&blob).unwrap();
        assert_eq!(back, spec);
        assert_eq!(options.retries, 2);
        assert_eq!(options.timeout_ms, Some(5));
        assert_eq!(options.engines, None);
        // And today's, with the field, round-trips.
        let new = JobOptions {
            engines: Some(crate::proto::Targets::Ids(vec![crate::proto::EngineId(1)])),
            ..options
        };
        let blob = request_blob(&spec, &new).unwrap();
        let (_, again): (JobSpec, JobOptions) = rmp_serde::from_slice(&blob).unwrap();
        assert_eq!(again, new);
    }

    #[test]
    fn queries_become_bound_sql_and_bad_ones_say_what_is_allowed() {
        let (sql, args) =
            where_clause(r#"{"status": "failed", "submitted": {"$gt": 5, "$lte": 9}, "label": {"$in": ["a", "b"]}}"#)
                .unwrap();
        for cond in [
            "label IN (?, ?)",
            "status IS ?",
            "submitted > ?",
            "submitted <= ?",
        ] {
            assert!(sql.contains(&format!(" AND {cond}")), "{sql}");
        }
        assert_eq!(args.len(), 5);
        let (sql, _) = where_clause(r#"{"engine": 2}"#).unwrap();
        assert!(sql.contains("EXISTS (SELECT 1 FROM tasks t"), "{sql}");
        assert_eq!(where_clause("").unwrap().0, "1");

        let err = where_clause(r#"{"colour": 1}"#).unwrap_err();
        assert!(
            err.starts_with("unknown key 'colour'") && err.contains("status"),
            "{err}"
        );
        let err = where_clause(r#"{"job": {"$near": 1}}"#).unwrap_err();
        assert!(err.contains("unknown operator '$near'"), "{err}");
        let err = where_clause(r#"{"job": {"$in": 3}}"#).unwrap_err();
        assert!(err.contains("takes a list"), "{err}");
        assert!(where_clause("[1]")
            .unwrap_err()
            .contains("a query is a dict"));
        assert!(where_clause("{").unwrap_err().contains("not JSON"));
        // Values are bound, never pasted into the SQL.
        let (sql, _) = where_clause(r#"{"label": "x'; DROP TABLE jobs; --"}"#).unwrap();
        assert!(!sql.contains("DROP"), "{sql}");
    }

    fn result(task: u64, engine: u32, first: u64, n: usize) -> TaskResult {
        TaskResult {
            task: TaskId(task),
            engine: EngineId(engine),
            first,
            outcome: Outcome::Items(
                (0..n)
                    .map(|i| Ok(crate::proto::Value::from(i as i64)))
                    .collect(),
            ),
            stdout: String::new(),
            stderr: String::new(),
            execution_count: 0,
            attempts: 1,
            started: 1,
            completed: 2,
        }
    }

    fn job(store: &Store, job: u64, items: usize) {
        let spec = JobSpec::Map {
            mapper: Mapper::Python(Func::Expr("f".into())),
            items: (0..items as i64).map(crate::proto::Value::from).collect(),
            chunksize: None,
        };
        let info = JobInfo {
            job: JobId(job),
            kind: JobKind::Map,
            submitted: 1,
            tasks: Vec::new(),
            slots: items as u64,
        };
        store.send(StoreOp::Job {
            info,
            spec: Box::new(spec),
            options: Box::default(),
        });
    }

    /// Job `job` ended well on engine 0.
    fn ended(store: &Store, job: u64) {
        store.send(StoreOp::Ended {
            job: JobId(job),
            status: "ok",
            error: None,
            completed: 3,
            ran_on: vec![EngineId(0)],
        });
    }

    #[test]
    fn a_reopened_store_gives_back_ids_engines_endings_and_unfinished_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        {
            let (store, recovered) = Store::open(&path).unwrap();
            assert_eq!((recovered.next_job, recovered.next_task), (0, 0));
            store.send(StoreOp::Engines(vec![("node000".into(), 0, EngineId(0))]));
            store.send(StoreOp::ReserveJobs(100));
            job(&store, 0, 2);
            store.send(StoreOp::Results {
                job: JobId(0),
                results: vec![result(0, 0, 0, 2)],
            });
            ended(&store, 0);
            job(&store, 1, 10);
            store.send(StoreOp::Results {
                job: JobId(1),
                results: vec![result(7, 0, 4, 3)],
            });
            store.sync();
            assert_eq!(store.reserved_jobs(), 100, "the reservation is committed");
            // Killed here: no clean stop.
        }
        let (store, recovered) = Store::open(&path).unwrap();
        assert_eq!(recovered.next_job, 100, "the reserved ids are skipped");
        assert_eq!(recovered.next_task, 8);
        assert_eq!(
            recovered.slot_ids,
            [("node000".to_string(), 0, EngineId(0))]
        );
        assert_eq!(recovered.ended.len(), 1);
        assert!(recovered.ended[0].ok && recovered.ended[0].engines == [EngineId(0)]);
        assert_eq!(recovered.unfinished.len(), 1);
        let u = &recovered.unfinished[0];
        assert_eq!((u.job, u.slots, u.done.len()), (JobId(1), 10, 1));
        assert!(matches!(&u.request, Some((JobSpec::Map { items, .. }, _)) if items.len() == 10));
        // A clean stop gives back what was reserved and not used.
        store.send(StoreOp::Stopped(100));
        drop(store);
        assert_eq!(Store::open(&path).unwrap().1.next_job, 100);
        let (store, _) = Store::open(&path).unwrap();
        store.send(StoreOp::ReserveJobs(300));
        store.send(StoreOp::Stopped(120));
        drop(store);
        assert_eq!(Store::open(&path).unwrap().1.next_job, 120);
    }

    #[test]
    fn a_result_too_large_to_keep_reads_back_as_an_error_naming_it_and_a_small_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("tasks.db")).unwrap();
        store.send(StoreOp::ReserveJobs(100));
        job(&store, 0, 2);
        let value = |n: usize| {
            crate::proto::Value::Pickle(Box::new(crate::proto::Pickled {
                repr: format!("array of {n} bytes"),
                bytes: vec![1u8; 64].into(),
                buffers: vec![vec![7u8; n].into()],
                json: None,
            }))
        };
        let direct = |task: u64, v| TaskResult {
            outcome: Outcome::Ok {
                value: v,
                display: None,
            },
            ..result(task, 0, task, 0)
        };
        let big = KEEP_RESULT_BYTES + 1;
        store.send(StoreOp::Results {
            job: JobId(0),
            results: vec![direct(0, value(big)), direct(1, value(10))],
        });
        ended(&store, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        store.send(StoreOp::Read {
            read: Read::Job(JobId(0)),
            answer: Box::new(move |a| tx.send(a).unwrap()),
        });
        let (_, results) = rx.recv().unwrap();
        assert_eq!(results.len(), 2);
        match &results[0].outcome {
            Outcome::Err(e) => assert!(
                e.ename == "ResultNotKept"
                    && e.evalue.contains(&format!("(array of {big} bytes)"))
                    && e.evalue.contains("run the job again"),
                "{e:?}"
            ),
            other => panic!("the large value is kept: {other:?}"),
        }
        assert!(
            matches!(&results[1].outcome, Outcome::Ok { value: v, .. } if *v == value(10)),
            "the small value is kept whole"
        );
    }

    #[test]
    fn a_store_of_the_previous_schema_is_upgraded_and_its_engine_ids_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        {
            let conn = Connection::open(&path).unwrap();
            // Schema 2: no engines or meta tables, no ran_on column.
            let old = SCHEMA
                .replace(",\n    ran_on TEXT", "")
                .split("CREATE TABLE IF NOT EXISTS engines")
                .next()
                .unwrap()
                .to_string();
            conn.execute_batch(&old).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO jobs VALUES (0, 1, 'me', 'map', NULL, '{}', 1, NULL, NULL, 0, NULL, 'ok', NULL, 2, NULL)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO tasks VALUES (0, 0, 3, 0, 1, '[1]', x'', '', '', 1, 1, 2)",
                [],
            )
            .unwrap();
        }
        let (_store, recovered) = Store::open(&path).unwrap();
        assert_eq!(recovered.next_engine, 4, "engine 3 appears in the history");
        assert_eq!(recovered.ended[0].engines, [EngineId(3)]);
        assert_eq!(recovered.next_job, 1);
    }
}
