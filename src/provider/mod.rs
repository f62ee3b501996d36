//! Providers: where a cluster's nodes come from.
//!
//! A [`Provider`] launches, lists and terminates the nodes of a named cluster. This release
//! has the `local` provider ([`local`]: processes on this machine, the default); `ec2` and
//! `ssh` are specified in the spec but not built yet, and say so.

pub mod local;

use std::path::PathBuf;
use std::time::Duration;

use crate::client::ClientError;
use crate::proto::EngineId;
use crate::spec::{ClusterSpec, ProviderKind};

/// A cluster that came up.
#[derive(Debug, Clone)]
pub struct Launched {
    pub cluster: String,
    pub connection: PathBuf,
    pub engines: Vec<EngineId>,
    /// From the start of `up` to the last engine registered.
    pub elapsed: Duration,
    /// A note for the user, e.g. that a dead cluster of the same name was cleaned up first.
    pub notes: Vec<String>,
}

/// A cluster that was taken down.
#[derive(Debug, Clone)]
pub struct Terminated {
    pub cluster: String,
    /// Processes that were running and were stopped.
    pub stopped: usize,
    /// Whether its processes had already exited before `down`.
    pub was_dead: bool,
}

/// One line of `starling list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSummary {
    pub name: String,
    pub provider: ProviderKind,
    pub state: String,
    pub controller: String,
    pub engine_processes: usize,
}

/// Errors of providers.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cluster '{name}' is already running (controller pid {pid}); use `starling down --cluster {name}` first, or pick another name with --name")]
    AlreadyRunning { name: String, pid: u32 },
    #[error(
        "there is no cluster '{0}' on this machine; `starling list` shows the clusters there are"
    )]
    NoSuchCluster(String),
    #[error("cannot find `starlingd` at {0}; build it with `cargo build --release` (it sits next to `starling`), or set STARLINGD to its path")]
    NoDaemon(PathBuf),
    #[error("the {what} failed to start: {why}{log}")]
    Start {
        what: String,
        why: String,
        log: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the {0} provider is not available in this release; use `provider: local`")]
    NotBuilt(ProviderKind),
    #[error("{0}")]
    Invalid(String),
}

/// What every provider does.
#[allow(async_fn_in_trait)]
pub trait Provider {
    /// Starts the cluster's nodes, controller and engines; returns once every engine has
    /// registered.
    async fn launch(&self, spec: &ClusterSpec) -> Result<Launched, ProviderError>;
    /// Stops everything of the cluster and removes what it left; idempotent.
    async fn terminate(&self, cluster: &str) -> Result<Terminated, ProviderError>;
    /// The clusters this provider can see.
    async fn list(&self) -> Result<Vec<ClusterSummary>, ProviderError>;
}

/// The `starlingd` binary to run: `STARLINGD`, or the one next to the running executable.
pub fn daemon_path() -> Result<PathBuf, ProviderError> {
    if let Some(p) = std::env::var_os("STARLINGD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut path = exe.with_file_name("starlingd");
    if !path.exists() {
        // Test binaries live in target/<profile>/deps; the daemon one level up.
        if let Some(parent) = exe.parent().and_then(|p| p.parent()) {
            let up = parent.join("starlingd");
            if up.exists() {
                path = up;
            }
        }
    }
    if path.exists() {
        Ok(path)
    } else {
        Err(ProviderError::NoDaemon(path))
    }
}

/// Brings a cluster up with the provider its spec names.
pub async fn up(spec: &ClusterSpec) -> Result<Launched, ProviderError> {
    match spec.provider {
        ProviderKind::Local => local::LocalProvider::new().launch(spec).await,
        other => Err(ProviderError::NotBuilt(other)),
    }
}
