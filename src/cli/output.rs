//! How the CLI prints things: text for people, JSON (one document) for scripts.

use serde_json::{json, Value as Json};

use super::Format;
use crate::proto::{format_ids, ClusterStatus, EngineId, JobId, Outcome, TaskResult, Value};
use crate::provider::{ClusterSummary, Launched, Terminated};

fn print_json(v: &Json) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
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
        Format::Json => print_json(&json!(ids)),
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
        Format::Json => print_json(&json!({
            "cluster": l.cluster,
            "engines": l.engines,
            "seconds": l.elapsed.as_secs_f64(),
            "connection": l.connection,
            "notes": l.notes,
        })),
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
        Format::Json => print_json(
            &json!({"cluster": t.cluster, "stopped": t.stopped, "was_running": !t.was_dead}),
        ),
    }
}

pub fn submitted(f: Format, job: JobId, engines: &[EngineId]) {
    match f {
        Format::Text => println!(
            "job {job} submitted to engines {}; `starling result` waits for it",
            format_ids(engines)
        ),
        Format::Json => print_json(&json!({"job": job, "engines": engines})),
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
    let failed = results.iter().any(|r| matches!(r.outcome, Outcome::Err(_)));
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
                    Outcome::Err(e) => {
                        println!("[{}:error] {e}", r.engine);
                        let tb = e.traceback.trim_end();
                        if !tb.is_empty() {
                            println!("{tb}");
                        }
                    }
                }
            }
        }
        Format::Json => {
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
                            o["error"] = json!({"ename": e.ename, "evalue": e.evalue, "traceback": e.traceback});
                        }
                    }
                    o
                })
                .collect();
            print_json(&Json::Array(items));
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
        Format::Json => print_json(&json!({
            "cluster": s.cluster,
            "controller_pid": s.controller_pid,
            "queued": s.queued,
            "jobs": s.jobs,
            "engines": s.engines.iter().map(|e| json!({
                "id": e.id, "host": e.host, "node": e.node, "pid": e.pid,
                "state": e.state.to_string(), "tasks_done": e.tasks_done, "queued": e.queued,
            })).collect::<Vec<_>>(),
        })),
    }
}

pub fn list(f: Format, clusters: &[ClusterSummary]) {
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
        Format::Json => print_json(&json!(clusters)),
    }
}
