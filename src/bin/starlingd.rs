//! `starlingd`: what runs on a node. `starlingd controller --config FILE` serves the cluster;
//! `starlingd engine --config FILE` hosts engines; `starlingd stop --root DIR` stops a node's
//! processes. Both daemons log to stderr, or with `--daemon` detach from the terminal (their
//! own session, stderr to `--log`, pid to `--pid-file`) and return once they are ready — which
//! is how bootstrap starts them over SSH.

use std::io::{BufRead as _, Write};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;

#[derive(Parser)]
#[command(name = "starlingd", version, about = "starling's node daemon")]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve the cluster: prints `listening HOST:PORT` once bound.
    Controller {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Run the node's engines: one process per engine, restarted when it dies.
    Engine {
        #[arg(long)]
        config: PathBuf,
        /// Run one engine, the node's engine SLOT (what the supervisor starts; stops when its
        /// stdin closes).
        #[arg(long, value_name = "SLOT")]
        slot: Option<u32>,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Serve FILE to the cluster's other nodes (the master hands them starlingd): prints
    /// `sharing HOST:PORT TOKEN`, then sends FILE to whoever sends TOKEN; exits once nobody has
    /// asked for a while.
    Share {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Address to listen on, e.g. the node's private address with port 0.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Run a plain MPI program over an MPI cluster's nodes (what `starling mpirun` runs on the
    /// master): `mpiexec` with the cluster's hostfile and SSH key, in the foreground.
    Mpirun {
        /// The cluster's MPI world file (the master's `config/mpi-world.json`).
        #[arg(long, value_name = "FILE")]
        world: PathBuf,
        /// Ranks to start (default: one per engine slot of the cluster).
        #[arg(short = 'n', long = "np", value_name = "N")]
        n: Option<u32>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Stop every process of the node whose directory is DIR (SIGTERM, then SIGKILL).
    Stop {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 3)]
        grace: u64,
    },
}

#[derive(Args)]
#[allow(clippy::struct_field_names)] // the flags are --daemon, --log, --pid-file
struct Daemon {
    /// Detach: run in a new session, log to --log, and return once ready.
    #[arg(long, requires = "log")]
    daemon: bool,
    /// The log file (appended to) when detached.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Where to write the daemon's pid.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
}

fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a valid config: {e}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Says "ready" on stdout — to the terminal, or through the pipe to the parent that waits
/// for it when detached — and then lets go of stdout.
fn ready(line: &str, detached: bool) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if detached {
        if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Why a daemon stopped, and the exit status that says so.
struct Failure {
    message: String,
    status: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { message, status: 1 }
    }
}

impl From<starling::engine::EngineError> for Failure {
    fn from(e: starling::engine::EngineError) -> Self {
        Self {
            status: e.exit_status(),
            message: e.to_string(),
        }
    }
}

/// Completes when stdin reaches its end: an engine process's supervisor is gone.
async fn stdin_closed() {
    use tokio::io::AsyncReadExt as _;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned();
    let Ok(mut pipe) = stdin.and_then(tokio::net::unix::pipe::Receiver::from_owned_fd) else {
        // Not a pipe (started by hand): nothing to watch.
        return std::future::pending().await;
    };
    let mut buf = [0u8; 64];
    while matches!(pipe.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn run(role: Role, detached: bool) -> Result<(), Failure> {
    match role {
        Role::Controller { config, .. } => {
            let config: starling::controller::ControllerConfig = read_config(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            ready(&format!("listening {addr}"), detached);
            starling::controller::run(listener, config, shutdown_signal())
                .await
                .map_err(|e| Failure::from(e.to_string()))
        }
        Role::Engine {
            config: path,
            slot: None,
            ..
        } => {
            let config: starling::engine::EngineConfig = read_config(&path)?;
            // SIGHUP (the MPI world changed) is handled from before anyone is told we run:
            // its default action would end the supervisor.
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| format!("cannot watch for SIGHUP: {e}"))?;
            ready(&format!("started {}", std::process::id()), detached);
            starling::engine::supervisor::supervise(&path, &config, hangups, shutdown_signal())
                .await
                .map_err(Failure::from)
        }
        Role::Engine {
            config,
            slot: Some(slot),
            ..
        } => {
            let config: starling::engine::EngineConfig = read_config(&config)?;
            tokio::select! {
                r = starling::engine::run(config, vec![slot]) => r.map_err(Failure::from),
                () = shutdown_signal() => Ok(()),
                () = stdin_closed() => Ok(()),
            }
        }
        Role::Share { file, listen, .. } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            starling::bootstrap::share::serve(
                listener,
                &file,
                starling::bootstrap::share::IDLE,
                |token| {
                    ready(&format!("sharing {addr} {token}"), detached);
                },
            )
            .await
            .map_err(Failure::from)
        }
        Role::Stop { .. } | Role::Mpirun { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// Forks: the parent waits for the child's ready line (or its exit) and prints it; the child
/// goes on in its own session with stdin from /dev/null and stderr to the log. Returns in the
/// child only.
fn detach(daemon: &Daemon) -> Result<(), ExitCode> {
    let log_path = daemon.log.as_deref().expect("clap requires --log");
    let fail = |msg: String| {
        eprintln!("starlingd: {msg}");
        ExitCode::FAILURE
    };
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| fail(format!("cannot open the log {}: {e}", log_path.display())))?;
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe().map_err(|e| fail(format!("cannot make a pipe: {e}")))?;
    // SAFETY: no thread has been started yet; the child goes on as a single-threaded process.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(fail(format!("cannot fork: {e}"))),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(write);
            let mut line = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(read)).read_line(&mut line);
            if line.is_empty() {
                let text = std::fs::read_to_string(log_path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(fail(format!(
                    "the daemon exited before it was ready; last lines of {}:\n{}",
                    log_path.display(),
                    tail.join("\n")
                )));
            }
            print!("{line}");
            Err(ExitCode::SUCCESS)
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read);
            let _ = nix::unistd::setsid();
            if let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
            }
            let _ = nix::unistd::dup2(write.as_raw_fd(), 1);
            let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
            Ok(())
        }
    }
}

/// Large blocks (frames) on huge pages: see `starling::proto::huge`.
#[global_allocator]
static ALLOC: starling::proto::huge::HugePages = starling::proto::huge::HugePages;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Role::Mpirun { world, n, command } = &cli.role {
        let err = starling::engine::mpi::mpirun(world, *n, command);
        eprintln!("starlingd: {err}");
        return ExitCode::FAILURE;
    }
    if let Role::Stop { root, grace } = &cli.role {
        let n = starling::node::stop(root, Duration::from_secs(*grace));
        println!("stopped {n}");
        return ExitCode::SUCCESS;
    }
    let (Role::Controller { daemon, .. }
    | Role::Engine { daemon, .. }
    | Role::Share { daemon, .. }) = &cli.role
    else {
        unreachable!("stop and mpirun returned above");
    };
    let detached = daemon.daemon;
    if detached {
        if let Err(code) = detach(daemon) {
            return code;
        }
    }
    if let Some(pid_file) = &daemon.pid_file {
        if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
            eprintln!("starlingd: cannot write {}: {e}", pid_file.display());
            return ExitCode::FAILURE;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // One thread: a message crosses no thread boundary inside the daemon, which keeps a round
    // trip through controller and engine at a few microseconds per hop.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(cli.role, detached)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { message, status }) => {
            tracing::error!("{message}");
            eprintln!("starlingd: {message}");
            ExitCode::from(status)
        }
    }
}
