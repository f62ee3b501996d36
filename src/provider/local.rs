//! The `local` provider: a cluster of processes on this machine.
//!
//! `launch` writes the controller's and engine's config (mode 0600) under
//! `~/.starling/node/<cluster>/<node>/`, starts `starlingd controller` and `starlingd engine` as
//! daemons, each in its own process group with its log in its node directory, records their
//! pids in `~/.starling/clusters/<cluster>/local.json`, writes the connection file, and waits
//! for every engine to register. `terminate` asks the controller to stop, waits for the
//! processes to exit, and kills whatever of theirs remains, by pid: every process of a local
//! cluster carries [`MARK_VAR`](crate::node::MARK_VAR) in its environment or descends from one
//! that does, so none is missed and no stranger is hit. It removes only the directories
//! starling made for the cluster, worked out from its name (never paths read from a file), and
//! keeps the task store under `~/.starling/history/<cluster>/`.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{ClusterSummary, Launched, Provider, ProviderError, Restarted, Terminated};
use crate::client::connection::{known_clusters, ConnectionInfo, CONNECTION_FORMAT};
use crate::client::Client;
use crate::controller::ControllerConfig;
use crate::engine::EngineConfig;
use crate::home;
use crate::node::{self, our_processes, MARK_VAR};
use crate::proto::auth::Key;
use crate::proto::tls::ClusterCert;
use crate::spec::{ClusterSpec, ProviderKind};

/// How long the controller may take to bind its port and say so.
const CONTROLLER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `down` waits for processes to exit after asking them to, before it kills them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often `down` looks whether the processes are gone.
const EXIT_POLL: Duration = Duration::from_millis(5);

/// The provider's record of a local cluster: `clusters/<name>/local.json`. Only pids: every
/// path of a cluster follows from its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalState {
    cluster: String,
    controller_pid: u32,
    engine_pids: Vec<u32>,
    /// The task store, under `history/<cluster>/`.
    #[serde(default)]
    db: Option<PathBuf>,
}

/// Where the nodes of local cluster `name` live.
fn node_root(name: &str) -> PathBuf {
    home::nodes_dir(&home::home(), name)
}

#[derive(Debug, Default)]
pub struct LocalProvider;

impl LocalProvider {
    pub fn new() -> Self {
        Self
    }
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

fn log_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl Provider for LocalProvider {
    async fn launch(&self, spec: &ClusterSpec) -> Result<Launched, ProviderError> {
        let started = Instant::now();
        let name = spec.name.as_str();
        home::check_name("cluster", name).map_err(ProviderError::Invalid)?;
        let daemon = super::daemon_path()?;
        let mut notes = Vec::new();
        if let Some(old) = load_state(name) {
            if !our_processes(&node_root(name)).is_empty() {
                return Err(ProviderError::AlreadyRunning {
                    name: name.to_string(),
                    pid: old.controller_pid,
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
        let cert =
            ClusterCert::generate(name).map_err(|e| ProviderError::Invalid(e.to_string()))?;
        let (client_key, engine_key) = (Key::generate(), Key::generate());
        let node_root = node_root(name);
        let master = node_root.join("master");
        // The task store outlives the cluster: one file per `up`, so job ids never collide.
        let history = home::history_dir(name);
        home::create_private_dir(&history)?;
        let stamp = crate::proto::now_micros() / 1_000_000;
        let db = (0..1000)
            .map(|n| match n {
                0 => history.join(format!("tasks-{stamp}.db")),
                n => history.join(format!("tasks-{stamp}-{n}.db")),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| history.join(format!("tasks-{stamp}-{}.db", std::process::id())));
        let node0 = node_root.join("node000");
        for d in [&master, &node0] {
            home::create_private_dir(&d.join("config"))?;
            home::create_private_dir(&d.join("logs"))?;
        }

        // The controller.
        let controller_config = ControllerConfig {
            cluster: name.to_string(),
            listen: "127.0.0.1:0".into(),
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
            client_key: client_key.clone(),
            engine_key: engine_key.clone(),
            db: Some(db.clone()),
            heartbeat_ms: spec.heartbeat_ms,
            task_attempts: spec.task_attempts,
            max_frame: spec.max_frame(),
        };
        let cfg_path = master.join("config/controller.json");
        home::write_private(
            &cfg_path,
            &serde_json::to_vec_pretty(&controller_config).expect("serializes"),
        )?;
        let controller_log = master.join("logs/controller.log");
        let mut state = LocalState {
            cluster: name.to_string(),
            controller_pid: 0,
            engine_pids: Vec::new(),
            db: Some(db),
        };
        let started_controller = start_controller(&daemon, &node_root, |pid| {
            state.controller_pid = pid;
            save_state(&state)
        })
        .await;
        let addr = match started_controller {
            Ok(addr) => addr,
            Err(e) => {
                let _ = self.terminate(name).await;
                return Err(e);
            }
        };
        // A restarted controller listens where this one does: engines and clients know it there.
        let controller_config = ControllerConfig {
            listen: addr.clone(),
            ..controller_config
        };
        if let Err(e) = home::write_private(
            &cfg_path,
            &serde_json::to_vec_pretty(&controller_config).expect("serializes"),
        ) {
            let _ = self.terminate(name).await;
            return Err(e.into());
        }

        // The engines: one engine process on this machine, hosting them all.
        let engines = spec.engines_per_node.resolve_here();
        let workdir = std::env::current_dir()?;
        let mpi = if spec.mpi {
            match local_world(spec, &node_root, &node0, engines, &workdir) {
                Ok(m) => Some(m),
                Err(e) => {
                    let _ = self.terminate(name).await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        let engine_config = EngineConfig {
            cluster: name.to_string(),
            controller: addr.clone(),
            cert_pem: cert.cert_pem.clone(),
            engine_key,
            node: "node000".into(),
            host: "127.0.0.1".into(),
            engines,
            python: spec.python.clone(),
            workdir,
            log: Some(node0.join("logs/kernels.log")),
            max_frame: spec.max_frame(),
            reconnect_s: spec.reconnect_s,
            mpi,
        };
        let ecfg_path = node0.join("config/engine.json");
        home::write_private(
            &ecfg_path,
            &serde_json::to_vec_pretty(&engine_config).expect("serializes"),
        )?;
        let engine_log = node0.join("logs/engine.log");
        let engine = std::process::Command::new(&daemon)
            .arg("engine")
            .arg("--config")
            .arg(&ecfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&engine_log)?)
            .env(MARK_VAR, &node_root)
            .process_group(0)
            .spawn();
        let engine = match engine {
            Ok(e) => e,
            Err(e) => {
                let _ = self.terminate(name).await;
                return Err(ProviderError::Start {
                    what: "engine process".into(),
                    why: format!("cannot run {}: {e}", daemon.display()),
                    log: String::new(),
                });
            }
        };
        state.engine_pids.push(engine.id());
        save_state(&state)?;
        std::fs::write(node0.join("starlingd.pid"), format!("{}\n", engine.id()))?;

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
            super::await_engines(
                &client,
                engines,
                timeout,
                &crate::bootstrap::Progress::new(),
            )
            .await
        };
        match registered.await {
            Ok(ids) => Ok(Launched {
                cluster: name.to_string(),
                connection,
                engines: ids,
                elapsed: started.elapsed(),
                notes,
                nodes: Vec::new(),
            }),
            Err(e) => {
                let log = format!(
                    "{}{}{}{}",
                    tail(&engine_log, 20),
                    tail(&node0.join("logs/kernels.log"), 20),
                    tail(&node0.join("logs/mpi.log"), 20),
                    tail(&controller_log, 10)
                );
                let _ = self.terminate(name).await;
                Err(ProviderError::Start {
                    what: "cluster".into(),
                    why: format!("{e}; everything it started was stopped again"),
                    log,
                })
            }
        }
    }

    async fn restart_controller(&self, cluster: &str) -> Result<Restarted, ProviderError> {
        home::check_name("cluster", cluster).map_err(ProviderError::Invalid)?;
        let Some(mut state) = load_state(cluster) else {
            return Err(ProviderError::NoSuchCluster(cluster.to_string()));
        };
        let started = Instant::now();
        let root = node_root(cluster);
        let daemon = super::daemon_path()?;
        let engines =
            read_config::<EngineConfig>(&root.join("node000/config/engine.json"), "engine")?
                .engines;
        // It listens where engines and clients know it: clusters started before the address
        // was written into the config listened on port 0.
        let cfg_path = root.join("master/config/controller.json");
        let mut config: ControllerConfig = read_config(&cfg_path, "controller")?;
        let known = ConnectionInfo::load(&home::connection_path(cluster))?.controller;
        if config.listen != known {
            config.listen.clone_from(&known);
            home::write_private(
                &cfg_path,
                &serde_json::to_vec_pretty(&config).expect("serializes"),
            )?;
        }
        // SIGTERM: it stops without telling its engines to, and they reconnect. Only the
        // controller: a pid reused since by an engine or a task is left alone.
        let controller_cmd = format!("controller --config {}", cfg_path.display());
        if node::command_line(state.controller_pid).is_some_and(|c| c.contains(&controller_cmd)) {
            node::stop_one(&root, state.controller_pid, STOP_GRACE).await;
        }
        let addr = start_controller(&daemon, &root, |pid| {
            state.controller_pid = pid;
            save_state(&state)
        })
        .await?;
        if addr != known {
            return Err(ProviderError::Start {
                what: "controller".into(),
                why: format!("it listens on {addr}, not on {known} where its engines and clients look for it"),
                log: String::new(),
            });
        }
        Ok(Restarted {
            cluster: cluster.to_string(),
            controller_pid: Some(state.controller_pid),
            engines,
            started,
        })
    }

    async fn terminate(&self, cluster: &str) -> Result<Terminated, ProviderError> {
        home::check_name("cluster", cluster).map_err(ProviderError::Invalid)?;
        let Some(state) = load_state(cluster) else {
            return Err(ProviderError::NoSuchCluster(cluster.to_string()));
        };
        let root = node_root(cluster);
        let live = our_processes(&root);
        if !live.is_empty() {
            // Politely first: the controller tells its engines to stop, and they their kernels.
            if let Ok(info) = ConnectionInfo::load(&home::connection_path(cluster)) {
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(2), Client::connect_with(info)).await
                {
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
                }
            }
            let deadline = Instant::now() + STOP_GRACE;
            while !our_processes(&root).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(EXIT_POLL).await;
            }
            // Whatever is left — a hung daemon, a kernel stuck in C code, a process a task
            // left behind — is killed by pid.
            node::kill_all(&root, STOP_GRACE).await;
        }
        remove_files(cluster);
        let notes = match state.db.filter(|db| db.exists()) {
            Some(db) => vec![format!("its task store is kept: {}", db.display())],
            None => Vec::new(),
        };
        Ok(Terminated {
            cluster: cluster.to_string(),
            stopped: live.len(),
            was_dead: live.is_empty(),
            removed: Vec::new(),
            notes,
            found: true,
        })
    }

    async fn list(&self) -> Result<Vec<ClusterSummary>, ProviderError> {
        let mut out = Vec::new();
        for name in known_clusters() {
            let Some(state) = load_state(&name) else {
                continue;
            };
            let path = home::connection_path(&name);
            let info = ConnectionInfo::load(&path).ok();
            let live = our_processes(&node_root(&name));
            let running = live.contains(&state.controller_pid);
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
                name,
                provider: ProviderKind::Local,
                region: None,
                state: if running { "running" } else { "stopped" }.into(),
                nodes: state
                    .engine_pids
                    .iter()
                    .filter(|p| live.contains(p))
                    .count(),
                types: String::new(),
                age_s,
                controller: info.map(|i| i.controller).unwrap_or_default(),
                engines,
            });
        }
        Ok(out)
    }
}

/// Starts the controller of the local cluster whose nodes live in `root` from its config
/// (`master/config/controller.json`), logging to `master/logs/controller.log`; `started`
/// records its pid before anything can go wrong. Returns the address it listens on.
/// An MPI world of `engines` ranks on this machine (`up --local --mpi`): writes the world file
/// the node's supervisor starts, and returns what the engines need to know.
fn local_world(
    spec: &ClusterSpec,
    node_root: &Path,
    node: &Path,
    engines: u32,
    workdir: &Path,
) -> Result<crate::engine::mpi::NodeMpi, ProviderError> {
    use crate::engine::mpi::{socket_path, NodeMpi, Rank, World};
    let run_dir = node.join("run");
    let world_file = node.join("config/mpi-world.json");
    let world = World {
        mpiexec: "mpiexec".into(),
        hostfile: node.join("hostfile"),
        rsh_agent: None,
        // One machine: Open MPI's own connections stay on loopback, unless the spec says else.
        mca: [("oob_tcp_if_include", "lo"), ("btl_tcp_if_include", "lo")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(spec.mpi_mca.clone())
            .collect(),
        ranks: (0..engines)
            .map(|slot| Rank {
                host: "localhost".into(),
                python: spec.python.clone(),
                workdir: workdir.to_path_buf(),
                socket: socket_path(&run_dir, slot),
                node_root: node_root.to_path_buf(),
            })
            .collect(),
        log: node.join("logs/mpi.log"),
    };
    home::write_private(
        &world_file,
        &serde_json::to_vec_pretty(&world).expect("serializes"),
    )?;
    Ok(NodeMpi {
        run_dir,
        world: Some(world_file),
    })
}

async fn start_controller(
    daemon: &Path,
    root: &Path,
    started: impl FnOnce(u32) -> std::io::Result<()>,
) -> Result<String, ProviderError> {
    let master = root.join("master");
    let log = master.join("logs/controller.log");
    let mut child = tokio::process::Command::new(daemon)
        .arg("controller")
        .arg("--config")
        .arg(master.join("config/controller.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&log)?)
        .env(MARK_VAR, root)
        .process_group(0)
        .spawn()
        .map_err(|e| ProviderError::Start {
            what: "controller".into(),
            why: format!("cannot run {}: {e}", daemon.display()),
            log: String::new(),
        })?;
    let pid = child.id().unwrap_or(0);
    started(pid)?;
    std::fs::write(master.join("starlingd.pid"), format!("{pid}\n"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut first = String::new();
    let read = tokio::time::timeout(
        CONTROLLER_START_TIMEOUT,
        BufReader::new(stdout).read_line(&mut first),
    )
    .await;
    match (read, first.trim().strip_prefix("listening ")) {
        (Ok(Ok(_)), Some(addr)) => Ok(addr.to_string()),
        _ => Err(ProviderError::Start {
            what: "controller".into(),
            why: "it did not report its address".into(),
            log: tail(&log, 20),
        }),
    }
}

/// Removes the directories starling made for local cluster `name` (its name was checked, so
/// both are inside `STARLING_HOME`); its task store in `history/` stays.
fn remove_files(name: &str) {
    let _ = std::fs::remove_dir_all(home::cluster_dir(name));
    let _ = std::fs::remove_dir_all(node_root(name));
}
