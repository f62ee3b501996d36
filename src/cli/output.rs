//! How the CLI prints things: text for people, JSON (one document) for scripts.

use serde_json::{json, Value as Json};

use std::io::Write as _;
use std::time::Duration;

use super::Format;
use crate::bootstrap::{CommandError, NodeReport, NodeTarget};
use crate::client::{AsyncResult, ClientError};
use crate::proto::{
    format_ids, ClusterStatus, EngineId, JobId, Outcome, RemoteError, TaskResult, Value,
};
use crate::provider::{ec2::Instance, ClusterSummary, Launched, Terminated};

fn print_json(v: &Json) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// JSON for scripts: one pretty document, or with `jsonl` one compact line per element.
fn print_doc(f: Format, v: &Json) {
    match (f, v) {
        (Format::Jsonl, Json::Array(items)) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for item in items {
                if let Err(e) = writeln!(out, "{item}") {
                    super::stdout_failed(&e);
                }
            }
            if let Err(e) = out.flush() {
                super::stdout_failed(&e);
            }
        }
        (Format::Jsonl, other) => outln!("{other}"),
        _ => print_json(v),
    }
}

fn error_json(e: &RemoteError) -> Json {
    json!({"ename": e.ename, "evalue": e.evalue, "traceback": e.traceback})
}

fn value_json(v: &Value) -> Json {
    match v {
        // A tuple (a pickle that is JSON once its tuples are lists) shows as a list.
        Value::Json(j) => j.clone(),
        Value::Pickle(p) => p.json.clone().unwrap_or_else(|| json!({ "repr": p.repr })),
        Value::Opaque { repr } => json!({ "repr": repr }),
    }
}

pub fn ids(f: Format, ids: &[EngineId]) {
    match f {
        Format::Text => outln!("{}", format_ids(ids)),
        _ => print_doc(f, &json!(ids)),
    }
}

pub fn launched(f: Format, l: &Launched) {
    match f {
        Format::Text => {
            for n in &l.notes {
                eprintln!("note: {n}");
            }
            outln!(
                "cluster '{}' is up: {} {} registered in {:.2} s\nconnection file: {}",
                l.cluster,
                count(l.engines.len(), "engine"),
                format_ids(&l.engines),
                l.elapsed.as_secs_f64(),
                l.connection.display()
            );
        }
        _ => print_doc(
            f,
            &json!({
                "cluster": l.cluster,
                "engines": l.engines,
                "seconds": l.elapsed.as_secs_f64(),
                "connection": l.connection,
                "notes": l.notes,
                "nodes": l.nodes,
            }),
        ),
    }
}

pub fn terminated(f: Format, t: &Terminated) {
    match f {
        Format::Text => {
            for n in &t.notes {
                eprintln!("note: {n}");
            }
            if !t.found {
                outln!(
                    "nothing of cluster '{}' exists; nothing to take down",
                    t.cluster
                );
            } else if !t.removed.is_empty() {
                outln!(
                    "cluster '{}' is down: removed {}; nothing of it remains",
                    t.cluster,
                    t.removed.join("; ")
                );
            } else if t.was_dead {
                outln!(
                    "cluster '{}' was not running (its processes had already exited); removed its files",
                    t.cluster
                );
            } else {
                outln!(
                    "cluster '{}' is down: stopped {} processes; nothing of it remains",
                    t.cluster,
                    t.stopped
                );
            }
        }
        _ => print_doc(
            f,
            &json!({"cluster": t.cluster, "stopped": t.stopped, "was_running": !t.was_dead,
                    "removed": t.removed, "notes": t.notes}),
        ),
    }
}

pub fn restarted(f: Format, r: &crate::provider::Resumed) {
    let pid = r
        .controller_pid
        .map_or_else(String::new, |p| format!(" (pid {p})"));
    message(
        f,
        &format!(
            "controller of cluster '{}' restarted{pid}: {} {} back in {:.2} s; unfinished jobs go on",
            r.cluster,
            count(r.engines.len(), "engine"),
            format_ids(&r.engines),
            r.elapsed.as_secs_f64()
        ),
        &json!({"cluster": r.cluster, "controller_pid": r.controller_pid, "engines": r.engines,
                "elapsed_s": r.elapsed.as_secs_f64()}),
    );
}

/// A one-line result of a command, or its JSON.
pub fn message(f: Format, text: &str, doc: &Json) {
    match f {
        Format::Text => outln!("{text}"),
        _ => print_doc(f, doc),
    }
}

/// The machines of a cluster, for `status`.
pub enum NodeRows {
    Ec2(Vec<Instance>),
    Hosts(Vec<NodeTarget>),
}

pub fn nodes(f: Format, rows: &NodeRows) {
    match (f, rows) {
        (Format::Text, NodeRows::Ec2(list)) => {
            outln!(
                "{:<8}  {:<20}  {:<12}  {:<9}  {:<15}  {:<15}",
                "node",
                "instance",
                "type",
                "state",
                "private",
                "public"
            );
            for i in list {
                outln!(
                    "{:<8}  {:<20}  {:<12}  {:<9}  {:<15}  {:<15}",
                    i.node,
                    i.id,
                    i.instance_type,
                    i.state,
                    i.private_ip.as_deref().unwrap_or("-"),
                    i.public_ip.as_deref().unwrap_or("-")
                );
            }
        }
        (Format::Text, NodeRows::Hosts(list)) => {
            outln!("{:<8}  {:<24}  {:<10}", "node", "host", "user");
            for n in list {
                outln!(
                    "{:<8}  {:<24}  {:<10}",
                    n.name,
                    format!("{}:{}", n.ssh_host, n.port),
                    n.user
                );
            }
        }
        (_, NodeRows::Ec2(list)) => print_doc(f, &json!({"nodes": list})),
        (_, NodeRows::Hosts(list)) => print_doc(
            f,
            &json!({"nodes": list.iter().map(|n| json!({"node": n.name, "host": n.ssh_host, "port": n.port, "user": n.user})).collect::<Vec<_>>()}),
        ),
    }
}

/// Output of a command run on several nodes, prefixed by node. Returns whether any failed.
pub fn per_node(f: Format, results: &[(NodeTarget, Result<String, CommandError>)]) -> bool {
    let failed = results.iter().any(|(_, r)| r.is_err());
    match f {
        Format::Text => {
            for (node, r) in results {
                match r {
                    Ok(out) => {
                        for line in out.lines() {
                            outln!("{}: {line}", node.name);
                        }
                    }
                    Err(e) => {
                        for line in e.to_string().lines() {
                            eprintln!("{}: {line}", node.name);
                        }
                    }
                }
            }
        }
        _ => print_doc(
            f,
            &json!(results
                .iter()
                .map(|(n, r)| match r {
                    Ok(out) =>
                        json!({"node": n.name, "host": n.ssh_host, "ok": true, "output": out}),
                    Err(e) => json!({"node": n.name, "host": n.ssh_host, "ok": false,
                        "error": e.to_string(), "status": e.status()}),
                })
                .collect::<Vec<_>>()),
        ),
    }
    failed
}

pub fn fetched(f: Format, node: &str, src: &str, dest: &std::path::Path, bytes: usize) {
    message(
        f,
        &format!("{node}:{src} -> {} ({bytes} bytes)", dest.display()),
        &json!({"node": node, "src": src, "dest": dest, "bytes": bytes}),
    );
}

pub fn added(f: Format, reports: &[NodeReport], ids: &[EngineId], elapsed: Duration) {
    if let Some(note) = crate::bootstrap::cloudpickle_note(reports) {
        eprintln!("note: {note}");
    }
    let names: Vec<&str> = reports.iter().map(|r| r.node.as_str()).collect();
    let new: u32 = reports.iter().map(|r| r.engines).sum();
    message(
        f,
        &format!(
            "added {} ({}) in {:.1} s; the cluster has {}",
            names.join(", "),
            count(new as usize, "engine"),
            elapsed.as_secs_f64(),
            count(ids.len(), "engine")
        ),
        &json!({"nodes": reports, "engines": ids, "seconds": elapsed.as_secs_f64()}),
    );
}

pub fn submitted(f: Format, job: JobId, engines: &[EngineId]) {
    match f {
        Format::Text if engines.is_empty() => {
            outln!("job {job} submitted, load-balanced; `starling result` waits for it");
        }
        Format::Text => outln!(
            "job {job} submitted to engines {}; `starling result` waits for it",
            format_ids(engines)
        ),
        _ => print_doc(f, &json!({"job": job, "engines": engines})),
    }
}

fn block(label: &str, text: &str) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    if !text.is_empty() {
        outln!("[{label}] {text}");
    }
}

/// What is left of a task's `text` once `shown` bytes of it were printed (all of it, should the
/// two not line up).
pub fn unshown(text: &str, shown: usize) -> String {
    text.get(shown..).unwrap_or(text).to_string()
}

/// Prints task results like %px does; returns whether any task failed.
pub fn results(f: Format, results: &[TaskResult]) -> bool {
    let failed = results
        .iter()
        .any(|r| !matches!(r.outcome, Outcome::Ok { .. }));
    match f {
        Format::Text => {
            for r in results {
                block(&format!("stdout:{}", r.engine), &r.stdout);
                block(&format!("stderr:{}", r.engine), &r.stderr);
                match &r.outcome {
                    Outcome::Ok {
                        display: Some(d), ..
                    } => outln!("Out[{}:{}]: {d}", r.engine, r.execution_count),
                    Outcome::Ok { display: None, .. } => {}
                    Outcome::Err(e) => print_error(&format!("{}:error", r.engine), e),
                    Outcome::Items(items) => {
                        let shown: Vec<String> = items.iter().map(item_repr).collect();
                        outln!("Out[{}]: [{}]", r.engine, shown.join(", "));
                    }
                }
            }
        }
        Format::Json | Format::Jsonl => {
            let items: Vec<Json> = results
                .iter()
                .map(|r| {
                    let mut o = json!({
                        "engine": r.engine,
                        "task": r.task,
                        "execution_count": r.execution_count,
                        "stdout": r.stdout,
                        "stderr": r.stderr,
                        "started_us": r.started,
                        "completed_us": r.completed,
                        "attempts": r.attempts,
                    });
                    match &r.outcome {
                        Outcome::Ok { value, display } => {
                            o["ok"] = json!(true);
                            o["value"] = value_json(value);
                            o["display"] = json!(display);
                        }
                        Outcome::Err(e) => {
                            o["ok"] = json!(false);
                            o["error"] = error_json(e);
                        }
                        Outcome::Items(items) => {
                            o["ok"] = json!(items.iter().all(Result::is_ok));
                            o["items"] = items.iter().map(item_json).collect();
                        }
                    }
                    o
                })
                .collect();
            print_doc(f, &Json::Array(items));
        }
    }
    failed
}

/// How much of each task's stdout and stderr [`streaming`] printed while it ran (bytes).
pub type Shown = std::collections::HashMap<crate::proto::TaskId, (usize, usize)>;

/// Waits for `ar` as `ar.wait(timeout)` does, printing what its running tasks write as it comes
/// (`[stdout:0] ...`, sent on by the engines every 0.2 s); returns whether it is done, and how
/// much of each task's output it printed, which [`results`] then leaves out.
pub async fn streaming(
    ar: &AsyncResult,
    timeout: Option<Duration>,
) -> Result<(bool, Shown), ClientError> {
    /// How often new output is looked for.
    const TICK: Duration = Duration::from_millis(100);
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut shown = Shown::new();
    let mut seen = 0;
    loop {
        let tick = match deadline {
            Some(d) => TICK.min(d.saturating_duration_since(std::time::Instant::now())),
            None => TICK,
        };
        let done = ar.wait(Some(tick)).await?;
        let pieces = ar.streamed(seen);
        seen += pieces.len();
        for p in pieces {
            block(&format!("stdout:{}", p.engine), &p.stdout);
            block(&format!("stderr:{}", p.engine), &p.stderr);
            let n = shown.entry(p.task).or_default();
            n.0 += p.stdout.len();
            n.1 += p.stderr.len();
        }
        let late = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        if done || late {
            return Ok((done, shown));
        }
    }
}

/// "1 engine", "2 engines".
pub fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

pub fn status(f: Format, s: &ClusterStatus) {
    match f {
        Format::Text => {
            let lost = if s.lost.is_empty() {
                String::new()
            } else {
                format!(" ({} lost)", s.lost.len())
            };
            let waiting = if s.waiting == 0 {
                String::new()
            } else {
                format!(", {} waiting for dependencies", s.waiting)
            };
            outln!(
                "cluster '{}': controller pid {}, {}{lost}, {} running, {} queued{waiting}, {}",
                s.cluster,
                s.controller_pid,
                count(s.engines.len(), "engine"),
                count(s.running as usize, "task"),
                s.queued,
                count(s.jobs as usize, "job"),
            );
            let ranks: Vec<(u32, u32)> = s
                .engines
                .iter()
                .filter_map(|e| e.rank.map(|r| (e.id.0, r)))
                .collect();
            if !ranks.is_empty() {
                if ranks.iter().all(|(id, rank)| id == rank) {
                    outln!(
                        "MPI: the kernels are one world of {} ranks; engine N is rank N",
                        ranks.len()
                    );
                } else {
                    let pairs: Vec<String> =
                        ranks.iter().map(|(id, r)| format!("{id}:{r}")).collect();
                    outln!(
                        "MPI: the kernels are one world of {} ranks (engine:rank {})",
                        ranks.len(),
                        pairs.join(" ")
                    );
                }
            }
            outln!(
                "{:>4}  {:<15}  {:<8}  {:>8}  {:>8}  {:<5}  {:>6}  {:>6}  {:>4}",
                "id",
                "host",
                "node",
                "pid",
                "process",
                "state",
                "done",
                "queued",
                "back"
            );
            for e in &s.engines {
                outln!(
                    "{:>4}  {:<15}  {:<8}  {:>8}  {:>8}  {:<5}  {:>6}  {:>6}  {:>4}",
                    e.id.0,
                    e.host,
                    e.node,
                    e.pid,
                    e.process_pid,
                    e.state.to_string(),
                    e.tasks_done,
                    e.queued,
                    e.returns,
                );
            }
            let now = crate::proto::now_micros();
            for l in &s.lost {
                let id = l.id.map_or_else(|| "-".to_string(), |i| i.0.to_string());
                outln!(
                    "lost {id:>4}  {:<15}  {:<8}  {} ago: {}",
                    l.host,
                    l.node,
                    age(now.saturating_sub(l.since) / 1_000_000),
                    l.reason
                );
            }
            for e in s.engines.iter().filter(|e| e.returns > 0) {
                if let Some(why) = &e.last_lost {
                    outln!("engine {} came back after: {why}", e.id.0);
                }
            }
        }
        _ => print_doc(
            f,
            &json!({
                "cluster": s.cluster,
                "controller_pid": s.controller_pid,
                "running": s.running,
                "queued": s.queued,
                "waiting": s.waiting,
                "jobs": s.jobs,
                "engines": s.engines.iter().map(|e| json!({
                    "id": e.id, "host": e.host, "node": e.node, "pid": e.pid,
                    "process_pid": e.process_pid,
                    "state": e.state.to_string(), "tasks_done": e.tasks_done, "queued": e.queued,
                    "returns": e.returns, "last_lost": e.last_lost, "rank": e.rank,
                })).collect::<Vec<_>>(),
                "lost": s.lost.iter().map(|l| json!({
                    "id": l.id, "host": l.host, "node": l.node, "reason": l.reason,
                    "since_micros": l.since,
                })).collect::<Vec<_>>(),
            }),
        ),
    }
}

pub fn clusters(f: Format, clusters: &[ClusterSummary]) {
    match f {
        Format::Text if clusters.is_empty() => {
            outln!("no clusters; `starling up --local -n 4` starts one");
        }
        Format::Text => {
            outln!(
                "{:<20}  {:<8}  {:<10}  {:<9}  {:>5}  {:<12}  {:>6}  {:>7}  controller",
                "name",
                "provider",
                "region",
                "state",
                "nodes",
                "types",
                "age",
                "engines"
            );
            for c in clusters {
                outln!(
                    "{:<20}  {:<8}  {:<10}  {:<9}  {:>5}  {:<12}  {:>6}  {:>7}  {}",
                    c.name,
                    c.provider.to_string(),
                    c.region.as_deref().unwrap_or("-"),
                    c.state,
                    c.nodes,
                    if c.types.is_empty() { "-" } else { &c.types },
                    c.age_s.map_or_else(|| "-".into(), age),
                    c.engines.map_or_else(|| "-".into(), |e| e.to_string()),
                    c.controller,
                );
            }
        }
        _ => print_doc(f, &json!(clusters)),
    }
}

/// The task store's jobs: a table for people, the records for scripts.
pub fn history(f: Format, records: &[crate::proto::JobRecord]) {
    match f {
        Format::Text => {
            if records.is_empty() {
                outln!("no job matches");
                return;
            }
            let now = crate::proto::now_micros();
            outln!(
                "{:>5}  {:>9}  {:<8} {:<10} {:>7}  {:>8}  {:<12} {:<12} error",
                "job",
                "submitted",
                "kind",
                "status",
                "items",
                "attempts",
                "engines",
                "label"
            );
            for r in records {
                let mut error = r.error.clone().unwrap_or_default().replace('\n', " ");
                if error.chars().count() > 60 {
                    error = format!("{}...", error.chars().take(57).collect::<String>());
                }
                outln!(
                    "{:>5}  {:>9}  {:<8} {:<10} {:>7}  {:>8}  {:<12} {:<12} {}",
                    r.job,
                    format!("{} ago", age(now.saturating_sub(r.submitted) / 1_000_000)),
                    r.kind,
                    r.status,
                    r.items,
                    r.attempts,
                    format_ids(&r.engines),
                    r.label.as_deref().unwrap_or("-"),
                    error
                );
            }
        }
        _ => print_doc(f, &json!(records)),
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn print_error(label: &str, e: &RemoteError) {
    outln!("[{label}] {e}");
    let tb = e.traceback.trim_end();
    if !tb.is_empty() {
        outln!("{tb}");
    }
}

fn item_repr(item: &Result<Value, Box<RemoteError>>) -> String {
    match item {
        Ok(v) => v.to_python_repr(),
        Err(e) => format!("<{e}>"),
    }
}

/// An item's result in JSON (a task's items carry boxed errors, a client's values plain ones).
fn item_json<E: std::borrow::Borrow<RemoteError>>(item: &Result<Value, E>) -> Json {
    match item {
        Ok(v) => value_json(v),
        Err(e) => json!({ "error": error_json(e.borrow()) }),
    }
}

/// A list of values: a Python list for people, JSON for scripts.
pub fn list(f: Format, values: &[Value]) {
    match f {
        Format::Text => {
            let shown: Vec<String> = values.iter().map(Value::to_python_repr).collect();
            outln!("[{}]", shown.join(", "));
        }
        _ => print_doc(f, &Json::Array(values.iter().map(value_json).collect())),
    }
}

/// Prints a map's results — the list, or one line per item with `jsonl` — and, for people, its
/// timing on stderr; returns whether any item failed.
pub fn map_results(f: Format, ar: &AsyncResult) -> bool {
    let values = ar.values();
    let failed = values.iter().any(|v| !matches!(v, Some(Ok(_))));
    match f {
        Format::Text => {
            if failed {
                let errors = ar.errors();
                for err in &errors {
                    let label = if err.engine == EngineId::NONE {
                        format!("item {}", err.index)
                    } else {
                        format!("item {} on engine {}", err.index, err.engine)
                    };
                    print_error(&label, &err.error);
                }
                eprintln!("error: {} of {} items failed", errors.len(), values.len());
            } else {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let _ = out.write_all(b"[");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        let _ = out.write_all(b", ");
                    }
                    if let Some(Ok(v)) = v {
                        let _ = out.write_all(v.to_python_repr().as_bytes());
                    }
                }
                let _ = out.write_all(b"]\n");
            }
            let (elapsed, serial) = (ar.elapsed(), ar.serial_time());
            // Timing is news only when there was time to speak of.
            if elapsed >= Duration::from_millis(500) {
                eprintln!(
                    "{} items in {:.2} s; serial time {:.2} s ({:.1}× speed-up)",
                    values.len(),
                    elapsed.as_secs_f64(),
                    serial.as_secs_f64(),
                    serial.as_secs_f64() / elapsed.as_secs_f64().max(1e-9)
                );
            }
        }
        _ => {
            let items: Vec<Json> = values
                .iter()
                .map(|v| match v {
                    Some(item) => item_json(item),
                    None => Json::Null,
                })
                .collect();
            print_doc(f, &Json::Array(items));
        }
    }
    failed
}

pub fn pushed(f: Format, names: &[String], engines: &[EngineId]) {
    match f {
        Format::Text => outln!(
            "pushed {} to engines {}",
            names.join(", "),
            format_ids(engines)
        ),
        _ => print_doc(f, &json!({"names": names, "engines": engines})),
    }
}

pub fn scattered(f: Format, name: &str, n: usize, engines: &[EngineId]) {
    match f {
        Format::Text => outln!(
            "scattered {n} items as '{name}' over engines {}",
            format_ids(engines)
        ),
        _ => print_doc(f, &json!({"name": name, "items": n, "engines": engines})),
    }
}

/// Pulled values per engine; `names` labels them when known. Returns whether any engine failed.
pub fn pulled(f: Format, names: &[String], ar: &AsyncResult) -> bool {
    let mut results = ar.results();
    results.sort_by_key(|r| r.first);
    let failed = results
        .iter()
        .any(|r| !matches!(r.outcome, Outcome::Ok { .. }));
    match f {
        Format::Text => {
            for r in &results {
                match &r.outcome {
                    Outcome::Ok { value, .. } => match (names, value) {
                        ([one], v) => outln!("[{}] {one} = {}", r.engine, v.to_python_repr()),
                        (many, Value::Json(Json::Array(vs)))
                            if many.len() == vs.len() && !many.is_empty() =>
                        {
                            for (n, v) in many.iter().zip(vs) {
                                outln!(
                                    "[{}] {n} = {}",
                                    r.engine,
                                    Value::Json(v.clone()).to_python_repr()
                                );
                            }
                        }
                        (_, v) => outln!("Out[{}]: {}", r.engine, v.to_python_repr()),
                    },
                    Outcome::Err(e) => print_error(&format!("{}:error", r.engine), e),
                    Outcome::Items(_) => {}
                }
            }
        }
        _ => {
            let items: Vec<Json> = results
                .iter()
                .map(|r| match &r.outcome {
                    Outcome::Ok { value, .. } => {
                        json!({"engine": r.engine, "value": value_json(value)})
                    }
                    Outcome::Err(e) => json!({"engine": r.engine, "error": error_json(e)}),
                    Outcome::Items(_) => Json::Null,
                })
                .collect();
            print_doc(f, &Json::Array(items));
        }
    }
    failed
}

/// Waits for a job showing progress: an indicatif bar on a terminal, a line per 10 % (at most
/// one a second) otherwise. Returns whether the job finished within `timeout`.
pub async fn progress(ar: &AsyncResult, timeout: Option<Duration>) -> Result<bool, ClientError> {
    use std::io::IsTerminal as _;
    /// How often the display is refreshed.
    const TICK: Duration = Duration::from_millis(100);
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let (_, total) = ar.progress();
    let unit = if ar.kind().per_item() {
        "items"
    } else {
        "tasks"
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(unit);
        bar
    });
    let mut last_line = (0usize, std::time::Instant::now());
    loop {
        let tick = match deadline {
            Some(d) => TICK.min(d.saturating_duration_since(std::time::Instant::now())),
            None => TICK,
        };
        let done = ar.wait(Some(tick)).await?;
        let (n, _) = ar.progress();
        match &bar {
            Some(b) => b.set_position(n as u64),
            None => {
                let step = (total / 10).max(1);
                if done
                    || (n >= last_line.0 + step && last_line.1.elapsed() >= Duration::from_secs(1))
                {
                    eprintln!(
                        "job {}: {n}/{total} {unit} done ({:.1} s)",
                        ar.job_id(),
                        ar.elapsed().as_secs_f64()
                    );
                    last_line = (n, std::time::Instant::now());
                }
            }
        }
        if done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(true);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            if let Some(b) = bar {
                b.abandon();
            }
            return Ok(false);
        }
    }
}
