//! The task store: every job and every result, in SQLite, like ipyparallel's task database.
//!
//! Writes never block the controller: they go down a channel to one writer thread, which
//! commits whatever has queued up in one transaction. The file outlives the controller, so a
//! cluster's history can be read with `sqlite3` after it is gone.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{params, Connection};

use crate::proto::{JobId, JobInfo, JobSpec, Outcome, TaskResult};

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

/// The JSON text a job spec is stored as.
pub fn spec_text(spec: &JobSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}
