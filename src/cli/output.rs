//! How the CLI prints things: text for people, JSON (one document) for scripts.

use serde_json::{json, Value as Json};

use std::io::Write as _;
use std::time::Duration;

use super::Format;
use crate::client::{AsyncResult, ClientError};
use crate::proto::{
    format_ids, ClusterStatus, EngineId, JobId, Outcome, RemoteError, TaskResult, Value,
};
use crate::provider::{ClusterSummary, Launched, Terminated};

fn print_json(v: &Json) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// JSON for scripts: one pretty document, or with `jsonl` one compact line per element.
fn print_doc(f: Format, v: &Json) {
    match (f, v) {
        (Format::Jsonl, Json::Array(items)) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for item in items {
                let _ = writeln!(out, "{item}");
            }
        }
        (Format::Jsonl, other) => println!("{other}"),
        _ => print_json(v),
    }
}

fn error_json(e: &RemoteError) -> Json {
    json!({"ename": e.ename, "evalue": e.evalue, "traceback": e.traceback})
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Json(j) => j.clone(),
        Value::Pickle { repr, .. } | Value::Opaque { repr } => json!({ "repr": repr }),
    }
}

pub fn ids(f: Format, ids: &[EngineId]) {
    match f {
        Format::Text => println!("{}", format_ids(ids)),
        _ => print_doc(f, &json!(ids)),
    }
}

pub fn launched(f: Format, l: &Launched) {
    match f {
        Format::Text => {
            for n in &l.notes {
                eprintln!("note: {n}");
            }
            println!(
                "cluster '{}' is up: {} engines {} registered in {:.2} s\nconnection file: {}",
                l.cluster,
                l.engines.len(),
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
            }),
        ),
    }
}

pub fn terminated(f: Format, t: &Terminated) {
    match f {
        Format::Text if t.was_dead => println!(
            "cluster '{}' was not running (its processes had already exited); removed its files",
            t.cluster
        ),
        Format::Text => println!(
            "cluster '{}' is down: stopped {} processes; nothing of it remains",
            t.cluster, t.stopped
        ),
        _ => print_doc(
            f,
            &json!({"cluster": t.cluster, "stopped": t.stopped, "was_running": !t.was_dead}),
        ),
    }
}

pub fn submitted(f: Format, job: JobId, engines: &[EngineId]) {
    match f {
        Format::Text if engines.is_empty() => {
            println!("job {job} submitted, load-balanced; `starling result` waits for it");
        }
        Format::Text => println!(
            "job {job} submitted to engines {}; `starling result` waits for it",
            format_ids(engines)
        ),
        _ => print_doc(f, &json!({"job": job, "engines": engines})),
    }
}

fn block(label: &str, text: &str) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    if !text.is_empty() {
        println!("[{label}] {text}");
    }
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
                    } => println!("Out[{}:{}]: {d}", r.engine, r.execution_count),
                    Outcome::Ok { display: None, .. } => {}
                    Outcome::Err(e) => print_error(&format!("{}:error", r.engine), e),
                    Outcome::Items(items) => {
                        let shown: Vec<String> = items.iter().map(item_repr).collect();
                        println!("Out[{}]: [{}]", r.engine, shown.join(", "));
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

pub fn status(f: Format, s: &ClusterStatus) {
    match f {
        Format::Text => {
            println!(
                "cluster '{}': controller pid {}, {} engines, {} tasks queued, {} jobs",
                s.cluster,
                s.controller_pid,
                s.engines.len(),
                s.queued,
                s.jobs
            );
            println!(
                "{:>4}  {:<15}  {:<8}  {:>8}  {:<5}  {:>6}  {:>6}",
                "id", "host", "node", "pid", "state", "done", "queued"
            );
            for e in &s.engines {
                println!(
                    "{:>4}  {:<15}  {:<8}  {:>8}  {:<5}  {:>6}  {:>6}",
                    e.id.0,
                    e.host,
                    e.node,
                    e.pid,
                    e.state.to_string(),
                    e.tasks_done,
                    e.queued
                );
            }
        }
        _ => print_doc(
            f,
            &json!({
                "cluster": s.cluster,
                "controller_pid": s.controller_pid,
                "queued": s.queued,
                "jobs": s.jobs,
                "engines": s.engines.iter().map(|e| json!({
                    "id": e.id, "host": e.host, "node": e.node, "pid": e.pid,
                    "state": e.state.to_string(), "tasks_done": e.tasks_done, "queued": e.queued,
                })).collect::<Vec<_>>(),
            }),
        ),
    }
}

pub fn clusters(f: Format, clusters: &[ClusterSummary]) {
    match f {
        Format::Text if clusters.is_empty() => {
            println!("no clusters; `starling up --local -n 4` starts one");
        }
        Format::Text => {
            println!(
                "{:<20}  {:<8}  {:<8}  {:<22}  {:>7}",
                "name", "provider", "state", "controller", "engine processes"
            );
            for c in clusters {
                println!(
                    "{:<20}  {:<8}  {:<8}  {:<22}  {:>7}",
                    c.name,
                    c.provider.to_string(),
                    c.state,
                    c.controller,
                    c.engine_processes
                );
            }
        }
        _ => print_doc(f, &json!(clusters)),
    }
}

fn print_error(label: &str, e: &RemoteError) {
    println!("[{label}] {e}");
    let tb = e.traceback.trim_end();
    if !tb.is_empty() {
        println!("{tb}");
    }
}

fn item_repr(item: &Result<Value, RemoteError>) -> String {
    match item {
        Ok(v) => v.to_python_repr(),
        Err(e) => format!("<{e}>"),
    }
}

fn item_json(item: &Result<Value, RemoteError>) -> Json {
    match item {
        Ok(v) => value_json(v),
        Err(e) => json!({ "error": error_json(e) }),
    }
}

/// A list of values: a Python list for people, JSON for scripts.
pub fn list(f: Format, values: &[Value]) {
    match f {
        Format::Text => {
            let shown: Vec<String> = values.iter().map(Value::to_python_repr).collect();
            println!("[{}]", shown.join(", "));
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
                    print_error(
                        &format!("item {} on engine {}", err.index, err.engine),
                        &err.error,
                    );
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
        Format::Text => println!(
            "pushed {} to engines {}",
            names.join(", "),
            format_ids(engines)
        ),
        _ => print_doc(f, &json!({"names": names, "engines": engines})),
    }
}

pub fn scattered(f: Format, name: &str, n: usize, engines: &[EngineId]) {
    match f {
        Format::Text => println!(
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
                        ([one], v) => println!("[{}] {one} = {}", r.engine, v.to_python_repr()),
                        (many, Value::Json(Json::Array(vs)))
                            if many.len() == vs.len() && !many.is_empty() =>
                        {
                            for (n, v) in many.iter().zip(vs) {
                                println!(
                                    "[{}] {n} = {}",
                                    r.engine,
                                    Value::Json(v.clone()).to_python_repr()
                                );
                            }
                        }
                        (_, v) => println!("Out[{}]: {}", r.engine, v.to_python_repr()),
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
