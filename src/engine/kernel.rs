//! One kernel: a persistent `python3` process with its own namespace.
//!
//! The kernel reads requests on fd 3 and answers on fd 4 (see `kernel.py`), one JSON line per
//! batch in and one per task out; its stdin is `/dev/null` and its fd 1 and 2 go to the engine's
//! log, so nothing user code prints can corrupt the protocol. Shell tasks do not need a kernel:
//! [`run_shell`] runs each in its own `bash -c`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

use crate::proto::{now_micros, EngineId, Outcome, RemoteError, Value};

/// The kernel program. It travels in the environment variable [`SOURCE_VAR`], which
/// [`BOOTSTRAP`] removes before running it, so `ps` shows a short command line and the kernel's
/// children do not inherit the source.
pub const KERNEL_SOURCE: &str = include_str!("kernel.py");

const SOURCE_VAR: &str = "STARLING_KERNEL_SOURCE";
const BOOTSTRAP: &str = "import os; exec(compile(os.environ.pop('STARLING_KERNEL_SOURCE'), '<starling-kernel>', 'exec'))";

/// How long a new kernel may take to start and say it is ready. Python with a cold page cache
/// on a small cloud instance can take a few seconds; half a minute means something is wrong.
pub const KERNEL_START_TIMEOUT: Duration = Duration::from_secs(30);

/// After a kernel exits, how long to keep reading replies it wrote just before: the pipe may
/// stay open (a process it forked holds it), so this is a bound, not a wait for the end.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Why a kernel could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "cannot start `{python}`: {source}; install Python 3 or set `python:` in the cluster spec"
    )]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("the kernel did not start within {0} s")]
    StartTimeout(u64),
    #[error("the kernel {0}")]
    Died(String),
    #[error("kernel I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel sent something that is not JSON: {0}")]
    Garbled(String),
}

/// One task's reply from the kernel, decoded.
#[derive(Debug, Clone)]
pub struct KernelReply {
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
    pub execution_count: u64,
    pub started: u64,
    pub completed: u64,
}

/// What came of a batch: how many tasks finished (their replies went to the callback), and,
/// if the kernel died, why — the task after the last reply is the one that killed it.
pub struct BatchOutcome {
    pub done: usize,
    pub died: Option<String>,
}

pub struct PythonKernel {
    child: Child,
    to_kernel: pipe::Sender,
    from_kernel: BufReader<pipe::Receiver>,
    pub pid: u32,
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

impl PythonKernel {
    /// Starts a kernel and waits until it is ready.
    pub async fn spawn(
        python: &str,
        workdir: &Path,
        engine_log: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let (req_r, req_w) = cloexec_pipe()?;
        let (rep_r, rep_w) = cloexec_pipe()?;
        let (child_in, child_out) = (req_r.as_raw_fd(), rep_w.as_raw_fd());
        let mut cmd = Command::new(python);
        cmd.arg("-c")
            .arg(BOOTSTRAP)
            .env(SOURCE_VAR, KERNEL_SOURCE)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match engine_log.map(|p| {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
        }) {
            Some(Ok(log)) => {
                cmd.stdout(log.try_clone()?).stderr(log);
            }
            _ => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(child_in, 3), (child_out, 4)] {
                    if from == to {
                        let flags = libc::fcntl(to, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(to, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| KernelError::Spawn {
            python: python.to_string(),
            source,
        })?;
        drop((req_r, rep_w));
        let pid = child.id().unwrap_or(0);
        let mut kernel = Self {
            child,
            to_kernel: pipe::Sender::from_owned_fd(req_w)?,
            from_kernel: BufReader::new(pipe::Receiver::from_owned_fd(rep_r)?),
            pid,
        };
        let ready = tokio::time::timeout(KERNEL_START_TIMEOUT, kernel.read_line()).await;
        match ready {
            Err(_) => Err(KernelError::StartTimeout(KERNEL_START_TIMEOUT.as_secs())),
            Ok(Ok(Some(_))) => Ok(kernel),
            Ok(Ok(None)) => Err(KernelError::Died(kernel.exit_reason().await)),
            Ok(Err(e)) => Err(e),
        }
    }

    async fn read_line(&mut self) -> Result<Option<Json>, KernelError> {
        let mut line = String::new();
        if self.from_kernel.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        parse_line(&line).map(Some)
    }

    /// How the kernel process ended, in words.
    async fn exit_reason(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            _ => "closed its reply pipe".to_string(),
        }
    }

    /// Runs a batch of kernel tasks (`{"op": "execute", "code": …}` objects). Replies are
    /// handed to `ready` in order as they arrive — whenever the kernel has nothing more written
    /// yet — so a slow task does not hold back the results before it.
    pub async fn run(
        &mut self,
        tasks: &[Json],
        mut ready: impl FnMut(Vec<KernelReply>),
    ) -> BatchOutcome {
        let mut pending = Vec::new();
        let mut done = 0;
        let mut line = serde_json::to_vec(tasks).expect("JSON values serialize");
        line.push(b'\n');
        if let Err(e) = self.to_kernel.write_all(&line).await {
            let why = self.exit_reason().await;
            return BatchOutcome {
                done,
                died: Some(format!("{why} (write failed: {e})")),
            };
        }
        let mut died = None;
        // The line being read lives out here: if the kernel's exit wins the race below, what
        // was read of the line so far is kept.
        let mut buf = String::new();
        while done < tasks.len() {
            let read = tokio::select! {
                biased;
                r = self.from_kernel.read_line(&mut buf) => r,
                status = self.child.wait() => {
                    // The kernel is gone, though something it forked may still hold the pipe
                    // open: take what it wrote before it died, then report it.
                    while let Ok(Ok(n)) = tokio::time::timeout(DRAIN_AFTER_EXIT, self.from_kernel.read_line(&mut buf)).await {
                        if n == 0 || !buf.ends_with('\n') {
                            break;
                        }
                        match parse_line(&std::mem::take(&mut buf)) {
                            Ok(reply) => {
                                pending.push(decode_reply(&reply));
                                done += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    died = Some(status.map_or_else(|e| format!("ended ({e})"), describe_exit));
                    break;
                }
            };
            match read {
                Ok(0) => {
                    died = Some(self.exit_reason().await);
                    break;
                }
                Ok(_) => match parse_line(&std::mem::take(&mut buf)) {
                    Ok(reply) => {
                        pending.push(decode_reply(&reply));
                        done += 1;
                        if self.from_kernel.buffer().is_empty() {
                            ready(std::mem::take(&mut pending));
                        }
                    }
                    Err(e) => {
                        let _ = self.child.start_kill();
                        let _ = self.child.wait().await;
                        died = Some(e.to_string());
                        break;
                    }
                },
                Err(e) => {
                    let _ = self.child.start_kill();
                    let _ = self.child.wait().await;
                    died = Some(format!("could not be read from: {e}"));
                    break;
                }
            }
        }
        if !pending.is_empty() {
            ready(pending);
        }
        BatchOutcome { done, died }
    }
}

/// One reply line.
fn parse_line(line: &str) -> Result<Json, KernelError> {
    serde_json::from_str(line).map_err(|e| {
        KernelError::Garbled(format!(
            "{e}: {}",
            line.chars().take(200).collect::<String>()
        ))
    })
}

/// Words for how a process ended: `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map_or_else(|_| "?".to_string(), |s| s.as_str().to_string());
        format!("was killed by signal {sig} ({name})")
    } else {
        "ended".to_string()
    }
}

fn text(v: &Json, key: &str) -> String {
    v.get(key)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A value as the kernel encodes it: `{"v": json}`, `{"p": pickle-b64, "r": repr}` or
/// `{"o": repr}`.
fn decode_value(v: &Json) -> Value {
    use base64::Engine as _;
    if let Some(p) = v.get("p").and_then(Json::as_str) {
        Value::Pickle {
            repr: text(v, "r"),
            bytes: base64::engine::general_purpose::STANDARD
                .decode(p)
                .unwrap_or_default(),
        }
    } else if let Some(o) = v.get("o").and_then(Json::as_str) {
        Value::Opaque {
            repr: o.to_string(),
        }
    } else {
        Value::Json(v.get("v").cloned().unwrap_or(Json::Null))
    }
}

fn decode_error(v: &Json) -> RemoteError {
    RemoteError {
        ename: text(v, "ename"),
        evalue: text(v, "evalue"),
        traceback: text(v, "traceback"),
    }
}

fn decode_reply(v: &Json) -> KernelReply {
    let outcome = if v.get("ok").and_then(Json::as_bool) != Some(true) {
        Outcome::Err(decode_error(v))
    } else if let Some(items) = v.get("items").and_then(Json::as_array) {
        Outcome::Items(
            items
                .iter()
                .map(|item| match item.get("e") {
                    Some(e) => Err(decode_error(e)),
                    None => Ok(decode_value(item)),
                })
                .collect(),
        )
    } else {
        Outcome::Ok {
            value: decode_value(v),
            display: v.get("d").and_then(Json::as_str).map(str::to_string),
        }
    };
    KernelReply {
        outcome,
        stdout: text(v, "out"),
        stderr: text(v, "err"),
        execution_count: v.get("n").and_then(Json::as_u64).unwrap_or(0),
        started: v.get("t0").and_then(Json::as_u64).unwrap_or(0),
        completed: v.get("t1").and_then(Json::as_u64).unwrap_or(0),
    }
}

/// Runs one shell command with `bash -c` in `workdir`; a non-zero exit is the task's error.
pub async fn run_shell(command: &str, engine: EngineId, workdir: &Path) -> KernelReply {
    let started = now_micros();
    let out = Command::new("bash")
        .arg("-c")
        .arg(command)
        .current_dir(workdir)
        .env("STARLING_ENGINE_ID", engine.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let completed = now_micros();
    let (outcome, stdout, stderr) = match out {
        Err(e) => (
            Outcome::Err(RemoteError {
                ename: "ShellError".into(),
                evalue: format!("cannot run bash: {e}"),
                traceback: String::new(),
            }),
            String::new(),
            String::new(),
        ),
        Ok(out) => {
            let outcome = if out.status.success() {
                Outcome::Ok {
                    value: Value::Json(Json::from(0)),
                    display: None,
                }
            } else {
                Outcome::Err(RemoteError {
                    ename: "ShellError".into(),
                    evalue: format!("the command {}", describe_exit(out.status)),
                    traceback: String::new(),
                })
            };
            (
                outcome,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    KernelReply {
        outcome,
        stdout,
        stderr,
        execution_count: 0,
        started,
        completed,
    }
}
