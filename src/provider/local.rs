//! The `local` provider: a cluster on this machine.
//!
//! Its one node, `master`, is started by the same bootstrap as a remote cluster's nodes, over
//! the local transport ([`Transport::Local`]): its directory is
//! `~/.starling/node/<cluster>/master/` (config mode 0600, logs, pid files, `bin/starlingd` a
//! link to this machine's), its controller and engines are `starlingd` daemons marked with that
//! directory, and its kernels work in the directory `up` ran in. The controller picks a free
//! loopback port when it starts. The provider's own record, `clusters/<cluster>/local.json`,
//! names the task store, which outlives the cluster under `~/.starling/history/<cluster>/`.
//! `down` runs the same teardown as on a remote node (`starlingd stop --root`, then the node's
//! directory goes), then kills by pid whatever of the node's processes is left: every process
//! of the node carries [`MARK_VAR`](crate::node::MARK_VAR) in its environment or descends from
//! one that does, so none is missed and no stranger is hit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterSummary, Launched, Provider, ProviderError, Restarted, Terminated};
use crate::bootstrap::{self, Join, MasterRole, NodeTarget, Plan, Progress, Remote, Transport};
use crate::client::connection::{known_clusters, ConnectionInfo, CONNECTION_FORMAT};
use crate::client::Client;
use crate::controller::ControllerConfig;
use crate::engine::EngineConfig;
use crate::home;
use crate::node::{self, our_processes};
use crate::proto::auth::Key;
use crate::proto::tls::ClusterCert;
use crate::spec::{ClusterSpec, ProviderKind};

/// The local provider: this machine as a cluster's one node.
#[derive(Debug, Clone, Copy)]
pub struct Local;

impl Provider for Local {
    async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
        up(spec, progress).await
    }

    /// Everything it had started is stopped again.
    async fn after_interrupted_up(spec: &ClusterSpec) -> Option<String> {
        let _ = down(&spec.name).await;
        None
    }

    async fn nodes(&self, _cluster: &Cluster) -> Result<Vec<NodeTarget>, ProviderError> {
        Ok(vec![target()])
    }

    fn transport(&self, _cluster: &Cluster, _timeout: Duration) -> Transport {
        Transport::Local
    }

    async fn down(&self, cluster: &Cluster) -> Result<Terminated, ProviderError> {
        down(&cluster.name).await
    }

    async fn restart_controller(&self, cluster: &Cluster) -> Result<Restarted, ProviderError> {
        restart_controller(&cluster.name).await
    }

    /// Its node is this machine: no `ssh`, no connection file to fetch, no machines to add.
    fn has(&self, _operation: &str) -> bool {
        false
    }
}

/// How long `down` waits for what `starlingd stop` left, after killing it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The name of a local cluster's node.
const NODE: &str = "master";

/// The provider's record of a local cluster: `clusters/<name>/local.json`. Every path of a
/// cluster follows from its name; the record says it is a local one, and where its task store
/// is.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalState {
    cluster: String,
    /// The task store, under `history/<cluster>/`.
    #[serde(default)]
    db: Option<PathBuf>,
}

/// Where the nodes of local cluster `name` live.
fn node_root(name: &str) -> PathBuf {
    home::nodes_dir(&home::home(), name)
}

/// The directory of local cluster `name`'s node.
pub fn node_dir(name: &str) -> PathBuf {
    node_root(name).join(NODE)
}

/// Whether this machine has a local cluster called `name`.
pub fn exists(name: &str) -> bool {
    state_path(name).exists()
}

fn state_path(cluster: &str) -> PathBuf {
    home::cluster_dir(cluster).join("local.json")
}

fn load_state(cluster: &str) -> Option<LocalState> {
    let text = std::fs::read_to_string(state_path(cluster)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_state(state: &LocalState) -> std::io::Result<()> {
    home::write_private(
        &state_path(&state.cluster),
        &serde_json::to_vec_pretty(state).expect("serializes"),
    )
}

/// The pid a daemon of the node wrote (`controller`, `engine`).
fn pid_of(cluster: &str, role: &str) -> Option<u32> {
    std::fs::read_to_string(node_dir(cluster).join(format!("{role}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The node, as bootstrap reaches it.
pub fn target() -> NodeTarget {
    NodeTarget {
        name: NODE.into(),
        ssh_host: "127.0.0.1".into(),
        private: "127.0.0.1".into(),
        port: 0,
        user: std::env::var("USER").unwrap_or_default(),
    }
}

/// Runs `script` on the node (this machine) as bootstrap would.
async fn run(script: &str) -> Result<String, bootstrap::CommandError> {
    let remote = Remote::open(&target(), &Transport::Local)
        .await
        .map_err(bootstrap::CommandError::NotRun)?;
    remote.run(script).await
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    if all.is_empty() {
        String::new()
    } else {
        format!(
            "\n--- last lines of {} ---\n{}",
            path.display(),
            all[start..].join("\n")
        )
    }
}

/// A new task store for cluster `name`, one file per `up`, so job ids never collide.
fn new_task_store(name: &str) -> std::io::Result<PathBuf> {
    let history = home::history_dir(name);
    home::create_private_dir(&history)?;
    let stamp = crate::proto::now_micros() / 1_000_000;
    Ok((0..1000)
        .map(|n| match n {
            0 => history.join(format!("tasks-{stamp}.db")),
            n => history.join(format!("tasks-{stamp}-{n}.db")),
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| history.join(format!("tasks-{stamp}-{}.db", std::process::id()))))
}

/// Starts a local cluster: its node bootstrapped over the local transport, then the wait for
/// every engine.
pub async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
    let started = Instant::now();
    let name = spec.name.as_str();
    home::check_name("cluster", name).map_err(ProviderError::Invalid)?;
    // Absolute: the node's `bin/starlingd` links to it.
    let daemon = std::path::absolute(super::daemon_path()?)?;
    let mut notes = Vec::new();
    if load_state(name).is_some() {
        if !our_processes(&node_dir(name)).is_empty() || !our_processes(&node_root(name)).is_empty()
        {
            return Err(ProviderError::AlreadyRunning {
                name: name.to_string(),
                pid: pid_of(name, "controller").unwrap_or(0),
            });
        }
        notes.push(format!(
            "cluster '{name}' had stopped without `down`; cleaned up what it left"
        ));
        remove_files(name);
    } else if home::connection_path(name).exists() {
        return Err(ProviderError::Invalid(format!(
            "a cluster named '{name}' from another provider exists on this machine; take it down first or pick another name"
        )));
    }
    if spec.mpi {
        // Before anything starts: a missing mpiexec or mpi4py leaves nothing behind.
        crate::engine::mpi::check_here(&spec.python).map_err(ProviderError::Invalid)?;
    }
    let cert = ClusterCert::generate(name).map_err(|e| ProviderError::Invalid(e.to_string()))?;
    let (client_key, engine_key) = (Key::generate(), Key::generate());
    let db = new_task_store(name)?;
    // The record first: `down` finds whatever an interrupted `up` started.
    save_state(&LocalState {
        cluster: name.to_string(),
        db: Some(db.clone()),
    })?;
    let plan = Plan {
        cluster: name.to_string(),
        spec: spec.clone(),
        transport: Transport::Local,
        daemon,
        join: Join {
            // The controller picks its port; bootstrap writes down which.
            controller: "127.0.0.1:0".into(),
            cert_pem: cert.cert_pem.clone(),
            engine_key: engine_key.clone(),
            max_frame: spec.max_frame(),
            master: target(),
            mpi_key: None,
        },
        master: Some(MasterRole {
            controller: ControllerConfig {
                cluster: name.to_string(),
                listen: String::new(),
                cert_pem: cert.cert_pem.clone(),
                key_pem: cert.key_pem.clone(),
                client_key: client_key.clone(),
                engine_key,
                db: Some(db),
                heartbeat_ms: spec.heartbeat_ms,
                task_attempts: spec.task_attempts,
                max_frame: spec.max_frame(),
            },
            connection: None,
            mpi_key: None,
        }),
    };
    let reports = match bootstrap::run(plan, vec![target()], progress).await {
        Ok(r) => r,
        Err(failures) => {
            let _ = down(name).await;
            return Err(ProviderError::Bootstrap(failures));
        }
    };
    let Some(addr) = reports.first().and_then(|r| r.controller.clone()) else {
        let _ = down(name).await;
        return Err(ProviderError::Start {
            what: "controller".into(),
            why: "it did not report its address".into(),
            log: String::new(),
        });
    };
    let engines: u32 = reports.iter().map(|r| r.engines).sum();
    let info = ConnectionInfo {
        version: CONNECTION_FORMAT,
        cluster: name.to_string(),
        provider: ProviderKind::Local.to_string(),
        controller: addr,
        certificate: cert.cert_pem,
        client_key,
        ssh: None,
        max_frame: spec.max_frame(),
    };
    let connection = home::connection_path(name);
    info.save(&connection)?;

    let timeout = Duration::from_secs(spec.register_timeout_s);
    let registered = async {
        let client = Client::connect_with(info).await?;
        super::await_engines(&client, engines, timeout, progress).await
    };
    match registered.await {
        Ok(ids) => {
            notes.extend(bootstrap::cloudpickle_note(&reports));
            Ok(Launched {
                cluster: name.to_string(),
                connection,
                engines: ids,
                elapsed: started.elapsed(),
                notes,
                nodes: reports,
            })
        }
        Err(e) => {
            let logs = node_dir(name).join("logs");
            let log = format!(
                "{}{}{}{}",
                tail(&logs.join("engine.log"), 20),
                tail(&logs.join("kernels.log"), 20),
                tail(&logs.join("mpi.log"), 20),
                tail(&logs.join("controller.log"), 10)
            );
            let _ = down(name).await;
            Err(ProviderError::Start {
                what: "cluster".into(),
                why: format!("{e}; everything it started was stopped again"),
                log,
            })
        }
    }
}

/// Stops local cluster `cluster`'s controller, if it runs, and starts it again on the same
/// address and task store; its engines keep running and reconnect by themselves.
pub async fn restart_controller(cluster: &str) -> Result<Restarted, ProviderError> {
    home::check_name("cluster", cluster).map_err(ProviderError::Invalid)?;
    if load_state(cluster).is_none() {
        return Err(ProviderError::NoSuchCluster(cluster.to_string()));
    }
    let started = Instant::now();
    let config = node_dir(cluster).join("config");
    let engines = read_config::<EngineConfig>(&config.join("engine.json"), "engine")?.engines;
    let known = ConnectionInfo::load(&home::connection_path(cluster))?.controller;
    let listen =
        read_config::<ControllerConfig>(&config.join("controller.json"), "controller")?.listen;
    if listen != known {
        return Err(ProviderError::Invalid(format!(
            "the controller's config says it listens on {listen}, but the connection file names {known}; take the cluster down and start it again"
        )));
    }
    let out = run(&bootstrap::restart_controller_script(cluster))
        .await
        .map_err(|e| ProviderError::Start {
            what: "controller".into(),
            why: e.to_string(),
            log: String::new(),
        })?;
    let addr = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("listening "))
        .map(str::trim);
    if addr != Some(known.as_str()) {
        return Err(ProviderError::Start {
            what: "controller".into(),
            why: format!("it said '{}', not that it listens on {known} where its engines and clients look for it", out.trim()),
            log: String::new(),
        });
    }
    Ok(Restarted {
        cluster: cluster.to_string(),
        controller_pid: out.lines().last().and_then(|l| l.trim().parse().ok()),
        engines,
        started,
    })
}

/// A node's config file (`what` names it in the error).
fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<T, ProviderError> {
    serde_json::from_slice(&std::fs::read(path)?).map_err(|e| {
        ProviderError::Invalid(format!(
            "{} is not a valid {what} config: {e}",
            path.display()
        ))
    })
}

/// Stops everything of local cluster `cluster` and removes what it left, keeping its task
/// store; idempotent.
pub async fn down(cluster: &str) -> Result<Terminated, ProviderError> {
    home::check_name("cluster", cluster).map_err(ProviderError::Invalid)?;
    let Some(state) = load_state(cluster) else {
        return Err(ProviderError::NoSuchCluster(cluster.to_string()));
    };
    let dir = node_dir(cluster);
    // A cluster started by an earlier build marked its processes with the cluster's directory.
    let earlier = node_root(cluster);
    let live = [our_processes(&dir), our_processes(&earlier)].concat();
    let mut notes = Vec::new();
    // As a node leaving: a local cluster authorized no MPI key, and the user's own
    // `authorized_keys` (this machine may be a host of someone's ssh cluster) stays untouched.
    if let Err(e) = run(&bootstrap::teardown_script(
        cluster,
        NODE,
        bootstrap::Leaving::Node,
    ))
    .await
    {
        notes.push(format!("stopping the node's processes: {e}"));
    }
    // Whatever is left — its starlingd gone from where the node's link points, a process
    // that ignores SIGTERM and outlived the grace — is killed by pid.
    node::kill_all(&dir, KILL_WAIT).await;
    node::kill_all(&earlier, KILL_WAIT).await;
    remove_files(cluster);
    if let Some(db) = state.db.filter(|db| db.exists()) {
        notes.push(format!("its task store is kept: {}", db.display()));
    }
    Ok(Terminated {
        cluster: cluster.to_string(),
        stopped: live.len(),
        was_dead: live.is_empty(),
        removed: Vec::new(),
        notes,
        found: true,
    })
}

/// The local clusters on this machine.
pub async fn list() -> Vec<ClusterSummary> {
    let mut out = Vec::new();
    for name in known_clusters() {
        if load_state(&name).is_none() {
            continue;
        }
        let path = home::connection_path(&name);
        let info = ConnectionInfo::load(&path).ok();
        let live = our_processes(&node_dir(&name));
        let alive = |role| pid_of(&name, role).is_some_and(|p| live.contains(&p));
        let running = alive("controller");
        // The connection file is written once the controller listens: the cluster's age.
        let age_s = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs());
        let engines = match (&info, running) {
            (Some(info), true) => {
                let ids = async { Client::connect_with(info.clone()).await?.ids().await };
                match tokio::time::timeout(Duration::from_secs(2), ids).await {
                    Ok(Ok(ids)) => Some(ids.len()),
                    _ => None,
                }
            }
            _ => None,
        };
        out.push(ClusterSummary {
            provider: ProviderKind::Local,
            region: None,
            state: if running { "running" } else { "stopped" }.into(),
            nodes: usize::from(alive("engine")),
            types: String::new(),
            age_s,
            controller: info.map(|i| i.controller).unwrap_or_default(),
            engines,
            name,
        });
    }
    out
}

/// Removes the directories starling made for local cluster `name` (its name was checked, so
/// both are inside `STARLING_HOME`); its task store in `history/` stays.
fn remove_files(name: &str) {
    let _ = std::fs::remove_dir_all(home::cluster_dir(name));
    let _ = std::fs::remove_dir_all(node_root(name));
}
