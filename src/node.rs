//! A node's processes: every `starlingd` process of a node, and through inheritance its kernels
//! and shell tasks, carries [`MARK_VAR`] in its environment with the node's directory as value.
//! [`our_processes`] finds them by that mark and adds every descendant of a marked process — a
//! task's child that cleared its environment included, since the engine supervisor is the
//! subreaper of what tasks leave behind — so `down` misses none and never hits a stranger, even
//! when several nodes share one machine (a local cluster, or the LocalStack rig). Used by the
//! `local` provider on this machine and by `starlingd stop` on remote nodes.

use std::path::Path;
use std::time::{Duration, Instant};

/// The environment variable that marks a node's processes with the node's directory.
pub const MARK_VAR: &str = "STARLING_NODE_ROOT";

/// How often [`stop`] looks whether the processes are gone.
const EXIT_POLL: Duration = Duration::from_millis(5);

/// The parent of a live process; `None` for one that is gone or a zombie (ended, not yet
/// reaped).
fn live_parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, then the parent's pid.
    let mut rest = stat.rsplit(')').next()?.split_whitespace();
    let state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    (state != "Z").then_some(ppid)
}

/// Whether a process runs: it exists and is not a zombie.
pub fn is_live(pid: u32) -> bool {
    live_parent(pid).is_some()
}

/// Every live process: (pid, parent pid).
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(|pid| live_parent(pid).map(|ppid| (pid, ppid)))
        .collect()
}

/// Adds to `roots` every live descendant of them.
fn with_descendants(table: &[(u32, u32)], mut found: Vec<u32>) -> Vec<u32> {
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (pid, ppid) in table {
            if *ppid == parent && !found.contains(pid) {
                found.push(*pid);
            }
        }
        i += 1;
    }
    found
}

/// The live descendants of `pid` (not `pid` itself).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = with_descendants(&process_table(), vec![pid]);
    all.remove(0);
    all
}

/// The live processes marked with `root`, and their descendants; a reused pid is never
/// mistaken for ours.
pub fn our_processes(root: &Path) -> Vec<u32> {
    let mark = format!("{MARK_VAR}={}", root.display());
    let table = process_table();
    let marked = table
        .iter()
        .map(|(pid, _)| *pid)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == mark.as_bytes()))
        })
        .collect();
    with_descendants(&table, marked)
}

fn signal_all(pids: &[u32], signal: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), signal);
    }
}

/// Stops every process marked with `root`: SIGTERM, then SIGKILL for whatever is still there
/// after `grace`. Returns how many processes there were. Blocking; for `starlingd stop`.
pub fn stop(root: &Path, grace: Duration) -> usize {
    let live = our_processes(root);
    if live.is_empty() {
        return 0;
    }
    signal_all(&live, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while !our_processes(root).is_empty() && Instant::now() < deadline {
        std::thread::sleep(EXIT_POLL);
    }
    let deadline = Instant::now() + grace;
    loop {
        let left = our_processes(root);
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        signal_all(&left, nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(EXIT_POLL);
    }
    live.len()
}

/// Kills every process marked with `root` at once (after a polite request elsewhere has had
/// its time), waiting up to `deadline` for them to be gone.
pub async fn kill_all(root: &Path, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let left = our_processes(root);
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        signal_all(&left, nix::sys::signal::Signal::SIGKILL);
        tokio::time::sleep(EXIT_POLL).await;
    }
}

/// A process's command line, its arguments joined by spaces; `None` once it is gone.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Stops one process of the node marked with `root` (nothing, if `pid` is not one of them):
/// SIGTERM, then SIGKILL if it is still there after `grace`. Returns once it is gone.
pub async fn stop_one(root: &Path, pid: u32, grace: Duration) {
    let ours = || our_processes(root).contains(&pid);
    if !ours() {
        return;
    }
    signal_all(&[pid], nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while ours() && Instant::now() < deadline {
        tokio::time::sleep(EXIT_POLL).await;
    }
    let deadline = Instant::now() + grace;
    while ours() && Instant::now() < deadline {
        signal_all(&[pid], nix::sys::signal::Signal::SIGKILL);
        tokio::time::sleep(EXIT_POLL).await;
    }
}
