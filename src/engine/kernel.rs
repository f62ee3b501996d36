//! One kernel: a persistent `python3` process with its own namespace.
//!
//! The kernel reads requests on one private pipe and answers on another (see `kernel.py`).
//! Both directions carry binary frames:
//!
//! ```text
//! u64 length of the rest | u32 header length | u32 buffer count | header (JSON)
//!     | per buffer: u64 length, bytes
//! ```
//!
//! A request frame holds a batch of tasks (a JSON list); a reply frame holds one task's reply,
//! naming the task it answers. Pickles and out-of-band buffers (NumPy data) travel as raw
//! buffers, referenced from the header by index, never encoded as text. A reply for any task
//! but the one in flight, or a frame that does not parse, means the kernel can no longer be
//! trusted: it is killed and reported as dead, never read as a result.
//!
//! A third pipe, fd 5, carries task ids the engine no longer wants (aborted, timed out), each
//! write followed by a SIGINT ([`Control::cancel`]): the kernel reads the pipe in its signal
//! handler, stops the running task if it is one of them, and skips the others when their turn
//! comes — so an interrupt meant for one task never lands in the next. [`INTERRUPT_ANY`] stops
//! whatever runs.
//!
//! The pipes are handed over as fds 3, 4 and 5; the kernel moves them to fds that are
//! close-on-exec, so neither user code nor its child processes can write into the protocol.
//! Its stdin is `/dev/null` and its fd 1 and 2 go to the engine's log. Shell tasks do not need
//! a kernel: [`run_shell`] runs each in its own `bash -c`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio_util::codec::{Decoder, FramedRead};

use crate::proto::{now_micros, EngineId, Outcome, RemoteError, Value};

/// The kernel program. It travels in the environment variable [`SOURCE_VAR`], which
/// [`BOOTSTRAP`] removes before running it, so `ps` shows a short command line and the kernel's
/// children do not inherit the source.
pub const KERNEL_SOURCE: &str = include_str!("kernel.py");

const SOURCE_VAR: &str = "STARLING_KERNEL_SOURCE";

/// glibc's malloc on transparent huge pages for large blocks (what `proto::huge` does for
/// starling's Rust processes), for the kernel's frames and the arrays made from them.
const HUGE_TUNABLE: &str = "glibc.malloc.hugetlb=1";
/// `GLIBC_TUNABLES` as the engine had it, which the kernel restores for its tasks.
const TUNABLES_BEFORE_VAR: &str = "STARLING_GLIBC_TUNABLES";
const BOOTSTRAP: &str = "import os; exec(compile(os.environ.pop('STARLING_KERNEL_SOURCE'), '<starling-kernel>', 'exec'))";

/// How long a new kernel may take to start and say it is ready. Python with a cold page cache
/// on a small cloud instance can take a few seconds; half a minute means something is wrong.
pub const KERNEL_START_TIMEOUT: Duration = Duration::from_secs(30);

/// After a kernel exits, how long to keep reading replies it wrote just before: the pipe may
/// stay open (a process it forked holds it), so this is a bound, not a wait for the end.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// The largest reply frame read from a kernel, as a multiple of the cluster's frame limit:
/// a result larger than one frame fails its task later (`ResultTooLarge`), but a length
/// prefix beyond this is garbage, not a result.
const REPLY_LIMIT_FRAMES: usize = 4;

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
    #[error("no MPI rank attached to this engine within {0} s; the world's log on the master (logs/mpi.log in its node directory) says why")]
    NoRank(u64),
    #[error("the kernel broke its protocol: {0}")]
    Garbled(String),
}

/// One frame of the kernel protocol: a JSON header and the buffers it refers to by index.
#[derive(Debug, Default, Clone)]
pub struct KernelFrame {
    pub header: Json,
    pub buffers: Vec<Bytes>,
}

impl KernelFrame {
    /// Adds a buffer; returns its index for the header.
    pub fn add_buffer(&mut self, b: Bytes) -> usize {
        self.buffers.push(b);
        self.buffers.len() - 1
    }

    /// The header as a JSON form of `value`, pickles moved into buffers:
    /// `{"v": json}`, `{"p": [pickle, buffer…]}` or `{"o": repr}`.
    pub fn value(&mut self, value: &Value) -> Json {
        match value {
            Value::Json(v) => serde_json::json!({ "v": v }),
            Value::Pickle(p) => {
                let refs: Vec<usize> = std::iter::once(&p.bytes)
                    .chain(&p.buffers)
                    .map(|b| self.add_buffer(b.clone()))
                    .collect();
                serde_json::json!({ "p": refs })
            }
            Value::Opaque { repr } => serde_json::json!({ "o": repr }),
        }
    }

    fn buffer(&self, index: &Json) -> Result<Bytes, KernelError> {
        index
            .as_u64()
            .and_then(|i| self.buffers.get(i as usize))
            .cloned()
            .ok_or_else(|| KernelError::Garbled(format!("no buffer {index}")))
    }

    /// A value the kernel encoded with [`Self::value`]'s form, plus `"r"`: the `repr` of a
    /// pickled value.
    fn decode_value(&self, v: &Json) -> Result<Value, KernelError> {
        if let Some(refs) = v.get("p").and_then(Json::as_array) {
            let mut bufs = refs.iter().map(|r| self.buffer(r));
            let bytes = bufs
                .next()
                .ok_or_else(|| KernelError::Garbled("a pickle without data".into()))??;
            Ok(Value::Pickle(Box::new(crate::proto::Pickled {
                repr: text(v, "r"),
                bytes,
                buffers: bufs.collect::<Result<_, _>>()?,
                json: v.get("j").cloned(),
            })))
        } else if let Some(o) = v.get("o").and_then(Json::as_str) {
            Ok(Value::Opaque {
                repr: o.to_string(),
            })
        } else {
            Ok(Value::Json(v.get("v").cloned().unwrap_or(Json::Null)))
        }
    }

    /// The frame's bytes, in pieces to write in order (buffers are not copied).
    fn pieces(&self) -> Vec<Bytes> {
        let header = serde_json::to_vec(&self.header).expect("JSON values serialize");
        let rest: usize =
            8 + header.len() + self.buffers.iter().map(|b| 8 + b.len()).sum::<usize>();
        let mut head = Vec::with_capacity(16 + header.len());
        head.extend_from_slice(&(rest as u64).to_le_bytes());
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.extend_from_slice(&(self.buffers.len() as u32).to_le_bytes());
        head.extend_from_slice(&header);
        let mut out = vec![Bytes::from(head)];
        for b in &self.buffers {
            out.push(Bytes::copy_from_slice(&(b.len() as u64).to_le_bytes()));
            out.push(b.clone());
        }
        out
    }
}

/// Frames up to this size go to the kernel in one write (copied together); larger ones are
/// written piece by piece, their buffers not copied.
const SMALL_WRITE: usize = 64 * 1024;

/// Reads [`KernelFrame`]s from the kernel's reply pipe; cancellation-safe, bounded.
struct FrameCodec {
    max: usize,
}

impl Decoder for FrameCodec {
    type Item = KernelFrame;
    type Error = KernelError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<KernelFrame>, KernelError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let len = u64::from_le_bytes(src[..8].try_into().expect("8 bytes"));
        if len < 8 || len > self.max as u64 {
            return Err(KernelError::Garbled(format!(
                "a frame of {len} bytes (the limit is {})",
                self.max
            )));
        }
        let len = len as usize;
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        src.advance(8);
        let mut body = src.split_to(len).freeze();
        let hlen = body.get_u32_le() as usize;
        let nbuf = body.get_u32_le() as usize;
        if hlen > body.len() {
            return Err(KernelError::Garbled(
                "a header longer than its frame".into(),
            ));
        }
        let header = serde_json::from_slice(&body.split_to(hlen))
            .map_err(|e| KernelError::Garbled(format!("a header that is not JSON ({e})")))?;
        let mut buffers = Vec::with_capacity(nbuf.min(1024));
        for _ in 0..nbuf {
            if body.len() < 8 {
                return Err(KernelError::Garbled("a buffer cut short".into()));
            }
            let n = body.get_u64_le();
            if n > body.len() as u64 {
                return Err(KernelError::Garbled("a buffer cut short".into()));
            }
            buffers.push(body.split_to(n as usize));
        }
        Ok(Some(KernelFrame { header, buffers }))
    }
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

/// A batch for the kernel: the request frame (its header a JSON list of tasks) and the ids of
/// those tasks, in order, which the replies must name.
pub struct Batch {
    pub frame: KernelFrame,
    pub ids: Vec<u64>,
}

/// The kernel's process: a child of this engine, or an MPI rank that attached to it (see
/// [`super::mpi`]).
enum Process {
    Child(Child),
    Rank {
        pid: u32,
        /// The rank's pidfd: readable once it has ended.
        ended: tokio::io::unix::AsyncFd<OwnedFd>,
    },
}

/// How an attached MPI kernel ended, as far as its engine can tell: with its world.
const RANK_ENDED: &str = "ended with its MPI world (one rank cannot be replaced alone, so every rank of the world ends and starts again)";

impl Process {
    /// Completes when the process has ended; how it ended, in words.
    async fn ended(&mut self) -> String {
        match self {
            Process::Child(c) => c
                .wait()
                .await
                .map_or_else(|e| format!("ended ({e})"), describe_exit),
            Process::Rank { ended, .. } => {
                let _ = ended.readable().await;
                RANK_ENDED.to_string()
            }
        }
    }

    fn start_kill(&mut self) {
        match self {
            Process::Child(c) => {
                let _ = c.start_kill();
            }
            Process::Rank { pid, .. } => {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// A pidfd for `pid`: readable once the process has ended, whoever its parent is.
fn pidfd(pid: u32) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or -1), which we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: a fresh fd from pidfd_open, owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the AsyncFd owns the fd, which stays open and the same until it is dropped.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    }
    .map_err(|e| std::io::Error::other(e.to_string()))
}

pub struct PythonKernel {
    process: Process,
    to_kernel: pipe::Sender,
    from_kernel: FramedRead<pipe::Receiver, FrameCodec>,
    pub pid: u32,
    /// Its MPI rank, when it is an MPI rank that attached.
    pub rank: Option<u32>,
    /// Where the ids of tasks to drop go (see the module docs); shared with whoever
    /// interrupts this kernel while it runs.
    pub control: Arc<Control>,
}

/// The id that, sent down the control pipe, interrupts whatever task runs.
pub const INTERRUPT_ANY: u64 = u64::MAX;

/// A kernel's control pipe and pid: what it takes to cancel or interrupt its tasks from
/// outside the slot that runs them.
#[derive(Debug)]
pub struct Control {
    pid: u32,
    fd: OwnedFd,
}

impl Control {
    /// Tells the kernel these tasks are unwanted: it skips them when their turn comes, and
    /// stops the running one if it is one of them (any task, for [`INTERRUPT_ANY`]).
    pub fn cancel(&self, tasks: &[u64]) {
        let mut bytes = Vec::with_capacity(tasks.len() * 8);
        for t in tasks {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        // Non-blocking, and 8-byte writes are atomic: a full pipe (8,192 unread ids) loses
        // ids, never the engine's time. The SIGINT that follows makes the kernel read them.
        let _ = nix::unistd::write(&self.fd, &bytes);
        self.signal(nix::sys::signal::Signal::SIGINT);
    }

    /// Sends a signal to the kernel process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

/// The most a kernels' log grows to before it is moved to `FILE.1` (replacing the one there)
/// and started afresh: output written outside tasks never fills a node's disk.
pub const LOG_LIMIT: u64 = 16 << 20;

/// Appends what `from` yields to the log at `path`, keeping it under [`LOG_LIMIT`].
pub(crate) async fn copy_to_log(
    mut from: impl tokio::io::AsyncRead + Unpin,
    path: std::path::PathBuf,
) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Several kernels share the log: each checks its size before it writes.
        if std::fs::metadata(&path).is_ok_and(|m| m.len() + n as u64 > LOG_LIMIT) {
            let mut old = path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&path, old);
        }
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
        {
            let _ = std::io::Write::write_all(&mut log, &buf[..n]);
        }
    }
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// How much a request or reply pipe holds. Linux's default, 64 KiB, makes a 100 MB push 1,600
/// writes, each waking the reader; 256 KiB makes it 400, and a node's 64 kernels stay well
/// inside what Linux lets one user hold in pipes (`pipe-user-pages-soft`, 64 MiB by default).
const DATA_PIPE_BYTES: i32 = 256 << 10;

/// A pipe for frames: [`cloexec_pipe`] of [`DATA_PIPE_BYTES`] (best effort: a smaller one only
/// costs more wake-ups).
fn data_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = cloexec_pipe()?;
    #[cfg(target_os = "linux")]
    let _ = nix::fcntl::fcntl(
        w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(DATA_PIPE_BYTES),
    );
    Ok((r, w))
}

/// A kernel's three pipes, (read end, write end) each: requests, replies, and control (its
/// write end non-blocking, see [`Control::cancel`]).
fn kernel_pipes() -> std::io::Result<[(OwnedFd, OwnedFd); 3]> {
    let requests = data_pipe()?;
    let replies = data_pipe()?;
    let control = cloexec_pipe()?;
    nix::fcntl::fcntl(
        control.1.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(std::io::Error::from)?;
    Ok([requests, replies, control])
}

impl PythonKernel {
    /// Starts a kernel and waits until it is ready. `max_frame` is the cluster's frame limit.
    pub async fn spawn(
        python: &str,
        workdir: &Path,
        engine_log: Option<&Path>,
        max_frame: usize,
    ) -> Result<Self, KernelError> {
        let [(req_r, req_w), (rep_r, rep_w), (ctl_r, ctl_w)] = kernel_pipes()?;
        let (child_in, child_out, child_ctl) =
            (req_r.as_raw_fd(), rep_w.as_raw_fd(), ctl_r.as_raw_fd());
        let mut cmd = Command::new(python);
        // Large buffers on huge pages, as in starling's own processes (see `proto::huge`):
        // glibc's malloc asks for them when this tunable says so. The kernel puts the
        // variable back as it was, for what its tasks start.
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let with_huge = if tunables.is_empty() {
            HUGE_TUNABLE.to_string()
        } else if tunables.contains("glibc.malloc.hugetlb=") {
            tunables.clone()
        } else {
            format!("{tunables}:{HUGE_TUNABLE}")
        };
        cmd.arg("-c")
            .arg(BOOTSTRAP)
            .env(SOURCE_VAR, KERNEL_SOURCE)
            .env("GLIBC_TUNABLES", with_huge)
            .env(TUNABLES_BEFORE_VAR, tunables)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // What the kernel writes outside tasks (a task's own output is captured by the kernel)
        // goes to the engine's log, bounded.
        if engine_log.is_some() {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec. Each pipe
        // is first copied above fd 9, so moving one to 3, 4 or 5 cannot overwrite another
        // that happens to sit there.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 3];
                for (h, from) in high.iter_mut().zip([child_in, child_out, child_ctl]) {
                    *h = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (from, to) in high.into_iter().zip(3..) {
                    // dup2 leaves the new fd open across exec.
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| KernelError::Spawn {
            python: python.to_string(),
            source,
        })?;
        if let Some(log) = engine_log {
            if let Some(out) = child.stdout.take() {
                tokio::spawn(copy_to_log(out, log.to_path_buf()));
            }
            if let Some(err) = child.stderr.take() {
                tokio::spawn(copy_to_log(err, log.to_path_buf()));
            }
        }
        drop((req_r, rep_w, ctl_r));
        let pid = child.id().unwrap_or(0);
        let codec = FrameCodec {
            max: max_frame.saturating_mul(REPLY_LIMIT_FRAMES),
        };
        let kernel = Self {
            process: Process::Child(child),
            to_kernel: pipe::Sender::from_owned_fd(req_w)?,
            from_kernel: FramedRead::new(pipe::Receiver::from_owned_fd(rep_r)?, codec),
            pid,
            rank: None,
            control: Arc::new(Control { pid, fd: ctl_w }),
        };
        kernel.ready().await
    }

    /// Takes the MPI rank that attaches to `listener` next, within `wait`, and waits until it
    /// is ready (see [`super::mpi`]). A connection from another user is refused and the wait
    /// goes on.
    pub async fn attach(
        listener: &tokio::net::UnixListener,
        wait: Duration,
        max_frame: usize,
    ) -> Result<Self, KernelError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let stream = match tokio::time::timeout_at(deadline, listener.accept()).await {
                Err(_) => return Err(KernelError::NoRank(wait.as_secs())),
                Ok(accepted) => accepted?.0,
            };
            match Self::adopt(stream, max_frame).await {
                Ok(kernel) => return kernel.ready().await,
                Err(why) => tracing::warn!("refused a process that attached as a kernel: {why}"),
            }
        }
    }

    /// Hands an attached rank its pipes and the kernel program.
    async fn adopt(mut stream: tokio::net::UnixStream, max_frame: usize) -> Result<Self, String> {
        use tokio::io::AsyncReadExt as _;
        let cred = stream.peer_cred().map_err(|e| e.to_string())?;
        if cred.uid() != nix::unistd::getuid().as_raw() {
            return Err(format!(
                "it runs as uid {}, not as this engine's user",
                cred.uid()
            ));
        }
        let pid = cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or("its pid is unknown")?;
        let mut said = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut said))
            .await
            .map_err(|_| "it did not say which rank it is".to_string())?
            .map_err(|e| e.to_string())?;
        let rank = u32::from_le_bytes(said);
        let ended = pidfd(pid).map_err(|e| format!("cannot watch its process: {e}"))?;
        let io = |e: std::io::Error| e.to_string();
        let [(req_r, req_w), (rep_r, rep_w), (ctl_r, ctl_w)] = kernel_pipes().map_err(io)?;
        // The pipes go over the socket with a byte to carry them, then the program until EOF.
        let stream = stream.into_std().map_err(io)?;
        stream.set_nonblocking(false).map_err(io)?;
        let fds = [req_r.as_raw_fd(), rep_w.as_raw_fd(), ctl_r.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(b"k")],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("cannot hand it its pipes: {e}"))?;
        drop((req_r, rep_w, ctl_r));
        let mut stream = stream;
        std::io::Write::write_all(&mut stream, KERNEL_SOURCE.as_bytes()).map_err(io)?;
        drop(stream);
        let codec = FrameCodec {
            max: max_frame.saturating_mul(REPLY_LIMIT_FRAMES),
        };
        Ok(Self {
            process: Process::Rank { pid, ended },
            to_kernel: pipe::Sender::from_owned_fd(req_w).map_err(io)?,
            from_kernel: FramedRead::new(pipe::Receiver::from_owned_fd(rep_r).map_err(io)?, codec),
            pid,
            rank: Some(rank),
            control: Arc::new(Control { pid, fd: ctl_w }),
        })
    }

    /// Waits for the kernel's first frame, which says it is ready.
    async fn ready(mut self) -> Result<Self, KernelError> {
        let ready = tokio::time::timeout(KERNEL_START_TIMEOUT, self.from_kernel.next()).await;
        match ready {
            Err(_) => Err(KernelError::StartTimeout(KERNEL_START_TIMEOUT.as_secs())),
            Ok(Some(Ok(f))) if f.header.get("ready").is_some() => Ok(self),
            Ok(Some(Ok(f))) => Err(KernelError::Garbled(format!(
                "its first frame was not `ready`: {}",
                f.header
            ))),
            Ok(None) => Err(KernelError::Died(self.exit_reason().await)),
            Ok(Some(Err(e))) => Err(e),
        }
    }

    /// How the kernel process ended, in words.
    async fn exit_reason(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.process.ended())
            .await
            .unwrap_or_else(|_| "closed its reply pipe".to_string())
    }

    /// Completes when the kernel process has ended; how, in words. Cancel-safe.
    pub async fn ended(&mut self) -> String {
        self.process.ended().await
    }

    async fn write(&mut self, frame: &KernelFrame) -> std::io::Result<()> {
        let pieces = frame.pieces();
        let size: usize = pieces.iter().map(Bytes::len).sum();
        if size <= SMALL_WRITE {
            // One write, one wake-up of the kernel: a small frame is copied whole.
            self.to_kernel.write_all(&pieces.concat()).await?;
        } else {
            for piece in pieces {
                self.to_kernel.write_all(&piece).await?;
            }
        }
        Ok(())
    }

    /// Kills the kernel: it broke the protocol.
    async fn kill(&mut self) {
        self.process.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.process.ended()).await;
    }

    /// Runs a batch of kernel tasks. Replies are handed to `ready` in order as they arrive —
    /// whenever the kernel has nothing more written yet — so a slow task does not hold back
    /// the results before it; what a running task writes goes to `output` as it comes.
    pub async fn run(
        &mut self,
        batch: &Batch,
        mut ready: impl FnMut(Vec<KernelReply>),
        mut output: impl FnMut(StreamedOutput),
    ) -> BatchOutcome {
        let mut pending = Vec::new();
        let mut done = 0;
        if let Err(e) = self.write(&batch.frame).await {
            let why = self.exit_reason().await;
            return BatchOutcome {
                done,
                died: Some(format!("{why} (write failed: {e})")),
            };
        }
        let mut died = None;
        while done < batch.ids.len() {
            let frame = tokio::select! {
                biased;
                f = self.from_kernel.next() => f,
                why = self.process.ended() => {
                    // The kernel is gone, though something it forked may still hold the pipe
                    // open: take what it wrote before it died, then report it.
                    while let Ok(Some(Ok(f))) = tokio::time::timeout(DRAIN_AFTER_EXIT, self.from_kernel.next()).await {
                        if streamed(&f).is_some() {
                            continue;
                        }
                        match decode_reply(&f, batch.ids[done]) {
                            Ok(reply) => {
                                pending.push(reply);
                                done += 1;
                                if done == batch.ids.len() {
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    died = Some(why);
                    break;
                }
            };
            match frame {
                None => {
                    died = Some(self.exit_reason().await);
                    break;
                }
                Some(Ok(f)) => match streamed(&f) {
                    Some(out) => {
                        output(out);
                        // Replies read before it go out now, as after a reply (below).
                        if !pending.is_empty() && self.from_kernel.read_buffer().is_empty() {
                            ready(std::mem::take(&mut pending));
                        }
                    }
                    None => match decode_reply(&f, batch.ids[done]) {
                        Ok(reply) => {
                            pending.push(reply);
                            done += 1;
                            if self.from_kernel.read_buffer().is_empty() {
                                ready(std::mem::take(&mut pending));
                            }
                        }
                        Err(e) => {
                            self.kill().await;
                            died = Some(e.to_string());
                            break;
                        }
                    },
                },
                Some(Err(e)) => {
                    self.kill().await;
                    died = Some(e.to_string());
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

fn decode_error(v: &Json) -> RemoteError {
    RemoteError {
        ename: text(v, "ename"),
        evalue: text(v, "evalue"),
        traceback: text(v, "traceback"),
    }
}

/// What a running task wrote, as its kernel sends it on (`{"stream": id, "out": .., "err": ..}`).
pub struct StreamedOutput {
    pub task: u64,
    pub stdout: String,
    pub stderr: String,
}

/// A frame of output the kernel sent while a task ran, rather than a reply.
fn streamed(f: &KernelFrame) -> Option<StreamedOutput> {
    let task = f.header.get("stream")?.as_u64()?;
    Some(StreamedOutput {
        task,
        stdout: text(&f.header, "out"),
        stderr: text(&f.header, "err"),
    })
}

/// One reply frame, which must answer task `expected`.
fn decode_reply(f: &KernelFrame, expected: u64) -> Result<KernelReply, KernelError> {
    let v = &f.header;
    match v.get("id").and_then(Json::as_u64) {
        Some(id) if id == expected => {}
        other => {
            return Err(KernelError::Garbled(format!(
                "it answered task {} while task {expected} was in flight (did the task write to the kernel's own pipe?)",
                other.map_or_else(|| "(none)".to_string(), |i| i.to_string())
            )))
        }
    }
    let outcome = if v.get("ok").and_then(Json::as_bool) != Some(true) {
        Outcome::Err(Box::new(decode_error(v)))
    } else if let Some(items) = v.get("items").and_then(Json::as_array) {
        Outcome::Items(
            items
                .iter()
                .map(|item| match item.get("e") {
                    Some(e) => Ok(Err(Box::new(decode_error(e)))),
                    None => f.decode_value(item).map(Ok),
                })
                .collect::<Result<_, _>>()?,
        )
    } else {
        Outcome::Ok {
            value: f.decode_value(v)?,
            display: v.get("d").and_then(Json::as_str).map(str::to_string),
        }
    };
    Ok(KernelReply {
        outcome,
        stdout: text(v, "out"),
        stderr: text(v, "err"),
        execution_count: v.get("n").and_then(Json::as_u64).unwrap_or(0),
        started: v.get("t0").and_then(Json::as_u64).unwrap_or(0),
        completed: v.get("t1").and_then(Json::as_u64).unwrap_or(0),
    })
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
            Outcome::Err(Box::new(RemoteError {
                ename: "ShellError".into(),
                evalue: format!("cannot run bash: {e}"),
                traceback: String::new(),
            })),
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
                Outcome::Err(Box::new(RemoteError {
                    ename: "ShellError".into(),
                    evalue: format!("the command {}", describe_exit(out.status)),
                    traceback: String::new(),
                }))
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
