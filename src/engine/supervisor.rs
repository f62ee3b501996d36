//! A node's engines under supervision: `starlingd engine --config FILE` (without `--slot`).
//!
//! The supervisor starts one engine process per engine of the node (`starlingd engine
//! --config FILE --slot I`), so a crash, a `kill -9` or the OOM killer takes one engine, not
//! all of them. It starts a process that died again, with backoff, and the engine registers
//! under its old id; a process that was told to stop, gave up on its controller, or cannot start
//! at all (its Python cannot run) is not started again. The engine processes hold a pipe from
//! the supervisor as stdin and stop when it closes, so they do not outlive it.
//!
//! The supervisor is its processes' subreaper: whatever a task leaves running — a double fork,
//! `setsid`, a cleared environment — stays its descendant, and is stopped with the node.
//!
//! On an MPI cluster's master it also runs the cluster's world (`mpiexec`, see [`super::mpi`]),
//! started again when it ends; SIGHUP says the world file changed (`add-node`, `remove-node`):
//! the running world is ended and the new one started, without counting as a failure.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use super::{report_cannot_start, EngineConfig, EngineError, EXIT_CANNOT_START, EXIT_GAVE_UP};

/// Memory each engine needs, at least: its Python kernel and its engine process.
pub const ENGINE_MEMORY: u64 = 24 << 20;
/// How long engine processes get to stop after SIGTERM before they (and whatever their tasks
/// left behind) are killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Restarts of one engine within this window count towards its backoff.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the master looks whether its cluster's MPI world has been written.
const WORLD_POLL: Duration = Duration::from_millis(200);
/// Pause before trying again to start an engine process that could not be started.
const START_RETRY: Duration = Duration::from_secs(5);

/// One engine process and its history.
struct Worker {
    slot: u32,
    /// Keeps the engine process's stdin open: it stops when this closes.
    #[allow(dead_code)] // held, never read
    stdin_pipe: Option<ChildStdin>,
    crashes: VecDeque<Instant>,
}

/// Why memory on this node cannot hold `engines` engines, if it cannot.
fn memory_check(engines: u32) -> Result<(), String> {
    let Some(available) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }) else {
        return Ok(());
    };
    let need = u64::from(engines) * ENGINE_MEMORY;
    if need > available {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        return Err(format!(
            "{engines} engines need at least {:.1} GiB ({} MiB each, a Python kernel and its engine process) and this node has {:.1} GiB available; use fewer engines per node (engines_per_node, -n) or more nodes",
            gib(need),
            ENGINE_MEMORY >> 20,
            gib(available)
        ));
    }
    Ok(())
}

fn start(config_path: &Path, slot: u32) -> std::io::Result<(Pid, ChildStdin)> {
    // This very binary, even when its file was replaced since it started (an upgrade).
    let mut child = Command::new("/proc/self/exe")
        .arg("engine")
        .arg("--config")
        .arg(config_path)
        .arg("--slot")
        .arg(slot.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stdin = child.stdin.take().expect("piped");
    Ok((Pid::from_raw(child.id() as i32), stdin))
}

/// Runs the node's engines until they are told to stop (or give up), or `shutdown` completes;
/// then stops them and everything they left behind.
/// `hangups` is SIGHUP, which says the MPI world file changed (watched by the caller from
/// before it said the supervisor runs).
pub async fn supervise(
    config_path: &Path,
    config: &EngineConfig,
    mut hangups: tokio::signal::unix::Signal,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    let slots: Vec<u32> = (0..config.engines.max(1)).collect();
    if let Err(why) = memory_check(slots.len() as u32) {
        report_cannot_start(config, &slots, &why).await;
        return Err(EngineError::CannotStart(why));
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("cannot become the subreaper of the engines: {e}; processes that tasks leave behind may outlive the node");
    }
    let mut children = signal(SignalKind::child())
        .map_err(|e| EngineError::CannotStart(format!("cannot watch child processes: {e}")))?;

    if let Some(m) = &config.mpi {
        if let Err(e) = super::mpi::write_attach(&m.run_dir) {
            let why = format!(
                "cannot write what its MPI ranks run into {}: {e}",
                m.run_dir.display()
            );
            report_cannot_start(config, &slots, &why).await;
            return Err(EngineError::CannotStart(why));
        }
    }
    // On an MPI cluster's master: the world of every node's kernels (see `super::mpi`),
    // started again whenever it ends.
    let world_file = config.mpi.as_ref().and_then(|m| m.world.clone());
    let mut world = World {
        pid: None,
        due: world_file.as_ref().map(|_| Instant::now()),
        ends: VecDeque::new(),
        renewing: false,
    };
    let mut running: HashMap<Pid, Worker> = HashMap::new();
    let mut pending: Vec<(Instant, Worker)> = Vec::new();
    for slot in slots {
        pending.push((
            Instant::now(),
            Worker {
                slot,
                stdin_pipe: None,
                crashes: VecDeque::new(),
            },
        ));
    }
    tokio::pin!(shutdown);
    loop {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(at, _)| *at <= now);
        pending = later;
        for (_, mut w) in due {
            match start(config_path, w.slot) {
                Ok((pid, stdin)) => {
                    w.stdin_pipe = Some(stdin);
                    running.insert(pid, w);
                }
                Err(e) => {
                    // Out of processes or memory for a moment, say: try again later.
                    tracing::error!(
                        slot = w.slot,
                        "cannot start an engine process: {e}; trying again in {} s",
                        START_RETRY.as_secs()
                    );
                    pending.push((now + START_RETRY, w));
                }
            }
        }
        if let (Some(path), Some(at)) = (&world_file, world.due) {
            if at <= now && !path.exists() {
                // A remote cluster's bootstrap writes the world once every node is set up.
                world.due = Some(now + WORLD_POLL);
            } else if at <= now {
                world.due = None;
                match super::mpi::launch(path) {
                    Ok(pid) => {
                        tracing::info!(%pid, "MPI world started");
                        world.pid = Some(pid);
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot start the MPI world: {e}; trying again in {} s",
                            START_RETRY.as_secs()
                        );
                        world.due = Some(now + START_RETRY);
                    }
                }
            }
        }
        if running.is_empty() && pending.is_empty() {
            tracing::info!("every engine of this node has stopped");
            break;
        }
        let next = pending.iter().map(|(at, _)| *at).chain(world.due).min();
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("stopping the engines");
                break;
            }
            () = async { tokio::time::sleep_until(next.expect("checked")).await }, if next.is_some() => {}
            _ = hangups.recv() => {
                if world_file.is_some() {
                    world.renew();
                } else {
                    tracing::info!("SIGHUP: this node runs no MPI world; nothing to do");
                }
            }
            _ = children.recv() => {
                for (pid, status) in reap() {
                    if world.pid == Some(pid) {
                        world.ended(status);
                        continue;
                    }
                    let Some(mut w) = running.remove(&pid) else {
                        continue; // an orphan a task left behind, now reaped
                    };
                    let code = match status {
                        WaitStatus::Exited(_, code) => Some(code),
                        _ => None,
                    };
                    match code {
                        Some(0) => tracing::info!(slot = w.slot, "engine stopped"),
                        Some(c) if c == i32::from(EXIT_GAVE_UP) || c == i32::from(EXIT_CANNOT_START) => {
                            tracing::warn!(slot = w.slot, "engine stopped for good (exit status {c})");
                        }
                        _ => {
                            let now = Instant::now();
                            w.crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
                            let delay = match w.crashes.len() {
                                0 => Duration::ZERO,
                                n => Duration::from_millis(500 << n.min(6)).min(BACKOFF_MAX),
                            };
                            w.crashes.push_back(now);
                            tracing::warn!(slot = w.slot, ?status, "engine process died; starting it again in {:.1} s", delay.as_secs_f64());
                            w.stdin_pipe = None;
                            pending.push((now + delay, w));
                        }
                    }
                }
            }
        }
    }
    // mpiexec first: it ends the ranks on every node.
    for pid in world.pid.iter().chain(running.keys()) {
        let _ = nix::sys::signal::kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    // mpiexec gets the grace too: it stops the ranks and Open MPI's daemons on the other nodes.
    while (!running.is_empty() || world.pid.is_some()) && Instant::now() < deadline {
        tokio::select! {
            _ = children.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        for (pid, _) in reap() {
            running.remove(&pid);
            if world.pid == Some(pid) {
                world.pid = None;
            }
        }
    }
    // What is left — a stuck engine, processes tasks left behind — is killed.
    let me = std::process::id();
    for _ in 0..10 {
        let left = crate::node::descendants(me);
        if left.is_empty() {
            break;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        reap();
    }
    Ok(())
}

/// The `mpiexec` of an MPI cluster's world, on its master.
struct World {
    pid: Option<Pid>,
    /// When to start it (again).
    due: Option<Instant>,
    /// When it ended recently: what its backoff counts.
    ends: VecDeque<Instant>,
    /// It was told to end, to start again from a changed world file.
    renewing: bool,
}

impl World {
    /// The world file changed: the running world ends, and the new one starts at once.
    fn renew(&mut self) {
        match self.pid {
            Some(pid) => {
                tracing::info!(%pid, "the MPI world changed; ending the running one to start it");
                self.renewing = true;
                let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            }
            None => {
                tracing::info!("the MPI world changed; starting it");
                self.due = Some(Instant::now());
            }
        }
    }

    /// The world ended (a rank died, and Open MPI ended the others): it starts again at once,
    /// and with backoff when it keeps ending.
    fn ended(&mut self, status: WaitStatus) {
        self.pid = None;
        let now = Instant::now();
        if std::mem::take(&mut self.renewing) {
            tracing::info!(?status, "the MPI world ended; starting the changed one");
            self.due = Some(now);
            return;
        }
        self.ends.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        let delay = match self.ends.len() {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis(250 << n.min(7)).min(BACKOFF_MAX),
        };
        self.ends.push_back(now);
        tracing::warn!(
            ?status,
            "the MPI world ended (its log: mpi.log); starting it again in {:.1} s",
            delay.as_secs_f64()
        );
        self.due = Some(now + delay);
    }
}

/// Collects the exit of every child that has ended.
fn reap() -> Vec<(Pid, WaitStatus)> {
    let mut out = Vec::new();
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    out.push((pid, status));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_count_the_node_cannot_hold_is_refused_with_the_figures() {
        assert!(memory_check(1).is_ok());
        let err = memory_check(1_000_000_000).unwrap_err();
        assert!(err.starts_with("1000000000 engines need at least"), "{err}");
        assert!(err.contains("GiB available"), "{err}");
        assert!(err.contains("fewer engines per node"), "{err}");
    }
}
