//! `starlingd`: what runs on a node. `starlingd controller --config FILE` serves the cluster;
//! `starlingd engine --config FILE` hosts engines. Both log to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    },
    /// Host engines and their kernels.
    Engine {
        #[arg(long)]
        config: PathBuf,
    },
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

async fn run(cli: Cli) -> Result<(), String> {
    match cli.role {
        Role::Controller { config } => {
            let config: starling::controller::ControllerConfig = read_config(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "listening {addr}");
            let _ = out.flush();
            starling::controller::run(listener, config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Role::Engine { config } => {
            let config: starling::engine::EngineConfig = read_config(&config)?;
            tokio::select! {
                r = starling::engine::run(config) => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("starlingd: {e}");
            ExitCode::FAILURE
        }
    }
}
