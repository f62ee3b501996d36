//! The task store: every job and every result, in SQLite, like ipyparallel's task database.
//!
//! Writes never block the controller: they go down a channel to one writer thread, which
//! commits whatever has queued up in one transaction. The file outlives the controller, so a
//! cluster's history can be read with `sqlite3` after it is gone.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{params, Connection};

use crate::proto::{Func, JobId, JobInfo, JobSpec, Mapper, Outcome, TaskResult, Work};

/// One write for the store.
pub enum StoreOp {
    Job {
        info: JobInfo,
        spec: String,
    },
    Results {
        job: JobId,
        results: Vec<TaskResult>,
    },
}

/// The sending side; dropping it lets the writer finish and close the file.
pub struct Store {
    tx: Option<mpsc::Sender<StoreOp>>,
    thread: Option<JoinHandle<()>>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS jobs (
    job INTEGER PRIMARY KEY,
    submitted INTEGER NOT NULL,
    spec TEXT NOT NULL,
    tasks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task INTEGER PRIMARY KEY,
    job INTEGER NOT NULL,
    engine INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT NOT NULL,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL,
    started INTEGER NOT NULL,
    completed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks(job);
";

impl Store {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("task-store".into())
            .spawn(move || writer(conn, &rx))
            .expect("a thread can be spawned");
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn send(&self, op: StoreOp) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(op);
        }
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

fn writer(mut conn: Connection, rx: &mpsc::Receiver<StoreOp>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        if let Err(e) = write_batch(&mut conn, batch) {
            tracing::error!("the task store could not be written: {e}");
        }
    }
}

fn write_batch(conn: &mut Connection, batch: Vec<StoreOp>) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut job_stmt =
            tx.prepare_cached("INSERT OR REPLACE INTO jobs VALUES (?1, ?2, ?3, ?4)")?;
        let mut task_stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO tasks VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for op in batch {
            match op {
                StoreOp::Job { info, spec } => {
                    job_stmt.execute(params![
                        info.job.0 as i64,
                        info.submitted as i64,
                        spec,
                        info.tasks.len() as i64
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
                        task_stmt.execute(params![
                            r.task.0 as i64,
                            job.0 as i64,
                            i64::from(r.engine.0),
                            ok,
                            text,
                            r.stdout,
                            r.stderr,
                            r.started as i64,
                            r.completed as i64
                        ])?;
                    }
                }
            }
        }
    }
    tx.commit()
}

/// The JSON text a job spec is stored as: what it ran and on how much, readable with
/// `sqlite3`. Items and values are counted rather than copied, and pickled functions are
/// recorded by size, so a 100 MB push does not become 100 MB of text.
pub fn spec_text(spec: &JobSpec) -> String {
    use serde_json::json;
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
