//! What the `ec2` and `ssh` providers share: the local record of a cluster, starting a
//! cluster on nodes reachable by SSH, and the commands that act on its nodes over SSH
//! (`exec`, `put`, `get`, `connect`, and stopping a node's processes).
//!
//! The record (`~/.starling/clusters/<name>/cluster.json`, mode 0600) is a cache: the spec the
//! cluster was started from, so that later commands know the login user, key and setup. For
//! EC2 clusters the truth is in the instances' tags; a teammate without the record passes
//! `--region` and `--key-file` instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::{daemon_path, Launched, ProviderError};
use crate::bootstrap::{
    self, CommandError, Join, Login, MasterRole, NodeReport, NodeTarget, Plan, Progress, Remote,
    Transport,
};
use crate::client::connection::{ConnectionInfo, SshAccess, CONNECTION_FORMAT};
use crate::client::Client;
use crate::controller::ControllerConfig;
use crate::engine::shell_quote;
use crate::home;
use crate::proto::auth::Key;
use crate::proto::tls::ClusterCert;
use crate::spec::{ClusterSpec, ProviderKind};

/// How long `down` and other quick commands try to log in to a node.
pub const QUICK_LOGIN: Duration = Duration::from_secs(10);
/// Nodes an `exec`, `put` or `get` talks to at once.
const PARALLEL: usize = 32;

/// The local record of a cluster started from this machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub provider: ProviderKind,
    pub spec: ClusterSpec,
}

impl Record {
    pub fn path(cluster: &str) -> PathBuf {
        home::cluster_dir(cluster).join("cluster.json")
    }

    pub fn load(cluster: &str) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(cluster)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn save(&self) -> std::io::Result<()> {
        home::write_private(
            &Self::path(&self.spec.name),
            &serde_json::to_vec_pretty(self).expect("serializes"),
        )
    }
}

/// The cluster's own known_hosts file.
pub fn known_hosts(cluster: &str) -> PathBuf {
    home::cluster_dir(cluster).join("known_hosts")
}

/// How to log in to the nodes of a cluster started from `spec`.
pub fn login(spec: &ClusterSpec, timeout: Option<Duration>) -> Login {
    Login {
        key_file: spec.ssh.key_file.as_deref().map(bootstrap::expand_home),
        known_hosts: known_hosts(&spec.name),
        timeout: timeout.unwrap_or(Duration::from_secs(spec.ssh.timeout_s)),
    }
}

/// Starts a fresh cluster on `nodes` (the master first): new certificate and keys, bootstrap
/// of every node, the connection file, and the wait for every engine.
pub async fn start_cluster(
    spec: &ClusterSpec,
    nodes: Vec<NodeTarget>,
    started: Instant,
    progress: &Progress,
) -> Result<Launched, ProviderError> {
    let name = spec.name.clone();
    let master = nodes
        .first()
        .cloned()
        .ok_or_else(|| ProviderError::Invalid("a cluster needs at least one node".into()))?;
    let cert = ClusterCert::generate(&name).map_err(|e| ProviderError::Invalid(e.to_string()))?;
    let (client_key, engine_key) = (Key::generate(), Key::generate());
    let info = ConnectionInfo {
        version: CONNECTION_FORMAT,
        cluster: name.clone(),
        provider: spec.provider.to_string(),
        controller: format!("{}:{}", master.ssh_host, spec.controller_port),
        certificate: cert.cert_pem.clone(),
        client_key: client_key.clone(),
        ssh: Some(SshAccess {
            host: master.ssh_host.clone(),
            port: master.port,
            user: master.user.clone(),
        }),
        max_frame: spec.max_frame(),
    };
    let controller = ControllerConfig {
        cluster: name.clone(),
        listen: String::new(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        client_key,
        engine_key: engine_key.clone(),
        db: None,
        heartbeat_ms: spec.heartbeat_ms,
        task_attempts: spec.task_attempts,
        max_frame: spec.max_frame(),
    };
    // An MPI cluster's own SSH key, for Open MPI's launcher on the master.
    let mpi_key = if spec.mpi {
        let key = bootstrap::mpi::make_key(&name).map_err(|message| {
            ProviderError::Bootstrap(vec![bootstrap::NodeFailure {
                node: "this machine".into(),
                address: "local".into(),
                step: "making the cluster's SSH key".into(),
                message,
            }])
        })?;
        Some(key)
    } else {
        None
    };
    let plan = Plan {
        cluster: name.clone(),
        spec: spec.clone(),
        transport: Transport::Ssh(login(spec, None)),
        daemon: daemon_path()?,
        join: Join {
            controller: format!("{}:{}", master.private, spec.controller_port),
            cert_pem: cert.cert_pem.clone(),
            engine_key,
            max_frame: spec.max_frame(),
            master: master.clone(),
            mpi_key: mpi_key.as_ref().map(|(_, public)| public.clone()),
        },
        master: Some(MasterRole {
            controller,
            connection: Some(serde_json::to_vec_pretty(&info).expect("serializes")),
            mpi_key: mpi_key.map(|(private, _)| private),
        }),
    };
    progress.say(&format!("bootstrapping {} node(s)", nodes.len()));
    let reports = bootstrap::run(plan, nodes, progress)
        .await
        .map_err(ProviderError::Bootstrap)?;
    let connection = home::connection_path(&name);
    info.save(&connection)?;
    let engines: u32 = reports.iter().map(|r| r.engines).sum();
    progress.say(&format!("waiting for {engines} engines to register"));
    let client = Client::connect_with(info).await?;
    let ids = super::await_engines(
        &client,
        engines,
        Duration::from_secs(spec.register_timeout_s),
        progress,
    )
    .await?;
    Ok(Launched {
        cluster: name,
        connection,
        engines: ids,
        elapsed: started.elapsed(),
        notes: bootstrap::cloudpickle_note(&reports).into_iter().collect(),
        nodes: reports,
    })
}

/// Bootstraps more nodes into a running cluster: the engine key and certificate come from the
/// master's own config, so this works from any machine that can log in. On an MPI cluster
/// (the master has the cluster's MPI key, whatever `spec` says) the new nodes' engines join
/// its world.
pub async fn join_cluster(
    spec: &ClusterSpec,
    master: &NodeTarget,
    nodes: Vec<NodeTarget>,
    transport: &Transport,
    progress: &Progress,
) -> Result<Vec<NodeReport>, ProviderError> {
    const MPI_KEY: &str = "\n--- the cluster's MPI key\n";
    let dir = bootstrap::dir_in_shell(&spec.name, "master");
    let said = run_once(
        master,
        transport,
        &format!(
            "cat {dir}/config/controller.json && printf %s {} && \
             {{ cat {dir}/config/{} 2>/dev/null; true; }}",
            shell_quote(MPI_KEY),
            bootstrap::mpi::PUBLIC_KEY_FILE
        ),
        &[],
    )
    .await;
    let said = said.map_err(|e| {
        ProviderError::Ssh(format!(
            "cannot read the controller's config on {master}: {e}"
        ))
    })?;
    let (cfg, mpi_key) = said.split_once(MPI_KEY).unwrap_or((&said, ""));
    let mpi_key = mpi_key.trim();
    if spec.mpi && mpi_key.is_empty() {
        return Err(ProviderError::Invalid(format!(
            "the spec says `mpi: true` but cluster '{}' was not started as an MPI cluster (its master has no MPI key); add nodes with a spec without `mpi: true`",
            spec.name
        )));
    }
    let controller: ControllerConfig = serde_json::from_str(cfg).map_err(|e| {
        ProviderError::Ssh(format!(
            "the controller's config on {master} is unreadable: {e}"
        ))
    })?;
    let plan = Plan {
        cluster: spec.name.clone(),
        spec: spec.clone(),
        transport: transport.clone(),
        daemon: daemon_path()?,
        join: Join {
            controller: controller.listen.clone(),
            cert_pem: controller.cert_pem.clone(),
            engine_key: controller.engine_key.clone(),
            max_frame: controller.max_frame,
            master: master.clone(),
            mpi_key: (!mpi_key.is_empty()).then(|| mpi_key.to_string()),
        },
        master: None,
    };
    bootstrap::run(plan, nodes, progress)
        .await
        .map_err(ProviderError::Bootstrap)
}

/// Logs in to `node`, runs `script` with `input` on its stdin, and logs out.
async fn run_once(
    node: &NodeTarget,
    transport: &Transport,
    script: &str,
    input: &[&[u8]],
) -> Result<String, CommandError> {
    let remote = Remote::open(node, transport)
        .await
        .map_err(CommandError::NotRun)?;
    let r = remote.run_with_input(script, input).await;
    remote.close().await;
    r
}

/// Runs a script on every node at once (`script` gives each node its own), with `input` on
/// its stdin; each node's output or error, in node order.
pub async fn run_on_each(
    nodes: &[NodeTarget],
    transport: &Transport,
    script: impl Fn(&NodeTarget) -> String,
    input: &[&[u8]],
) -> Vec<(NodeTarget, Result<String, CommandError>)> {
    let script = &script;
    let mut out: Vec<(NodeTarget, Result<String, CommandError>)> =
        futures::stream::iter(nodes.iter().cloned().map(|node| async move {
            let r = run_once(&node, transport, &script(&node), input).await;
            (node, r)
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    out
}

/// Runs `script` on every node at once; each node's output or error, in node order.
pub async fn run_everywhere(
    nodes: &[NodeTarget],
    transport: &Transport,
    script: &str,
) -> Vec<(NodeTarget, Result<String, CommandError>)> {
    run_on_each(nodes, transport, |_| script.to_string(), &[]).await
}

/// The failures among `results`, as `node (address): why` lines.
pub fn failures(results: Vec<(NodeTarget, Result<String, CommandError>)>) -> Vec<String> {
    results
        .into_iter()
        .filter_map(|(node, r)| r.err().map(|e| format!("{node}: {e}")))
        .collect()
}

/// Stops the cluster's processes on `nodes` and removes their node directories. Returns the
/// nodes where that failed, with why.
pub async fn stop_nodes(
    cluster: &str,
    nodes: &[NodeTarget],
    transport: &Transport,
    leaving: bootstrap::Leaving,
) -> Vec<String> {
    let results = run_on_each(
        nodes,
        transport,
        |node| bootstrap::teardown_script(cluster, &node.name, leaving),
        &[],
    )
    .await;
    failures(results)
}

/// Copies a local file to `dest` on every node in `nodes`.
pub async fn put(
    nodes: &[NodeTarget],
    transport: &Transport,
    src: &Path,
    dest: &str,
) -> Result<Vec<(NodeTarget, Result<String, CommandError>)>, ProviderError> {
    let bytes = std::fs::read(src)
        .map_err(|e| ProviderError::Invalid(format!("cannot read {}: {e}", src.display())))?;
    let d = shell_quote(dest);
    let script = format!(
        "if [ -d {d} ]; then t={d}/{}; else mkdir -p \"$(dirname {d})\" && t={d}; fi && cat > \"$t\" && echo \"$t\"",
        shell_quote(
            &src.file_name()
                .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned())
        )
    );
    Ok(run_on_each(nodes, transport, |_| script.clone(), &[&bytes]).await)
}

/// Restarts the controller on the master of `cluster` (its engines keep running); counts the
/// engines its nodes run, to wait for.
pub async fn restart_controller(
    cluster: &super::Cluster,
) -> Result<super::Restarted, ProviderError> {
    let started = Instant::now();
    let nodes = cluster.nodes().await?;
    let transport = cluster.transport(QUICK_LOGIN);
    let master = nodes
        .iter()
        .find(|n| n.name == "master")
        .cloned()
        .ok_or_else(|| {
            ProviderError::Invalid(format!(
                "cluster '{}' has no master node to restart the controller on",
                cluster.name
            ))
        })?;
    let out = run_once(
        &master,
        &transport,
        &bootstrap::restart_controller_script(&cluster.name),
        &[],
    )
    .await
    .map_err(|e| ProviderError::Ssh(format!("restarting the controller on {master}: {e}")))?;
    let controller_pid = out
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok());
    let counts = run_on_each(
        &nodes,
        &transport,
        |n| bootstrap::engine_count_script(&cluster.name, &n.name),
        &[],
    )
    .await;
    let engines = counts
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter_map(|out| out.trim().parse::<u32>().ok())
        .sum();
    Ok(super::Restarted {
        cluster: cluster.name.clone(),
        controller_pid,
        engines,
        started,
    })
}

/// Registered engines, when this machine holds the cluster's connection file and the
/// controller answers quickly.
pub async fn engines_of(cluster: &str) -> Option<usize> {
    let info = ConnectionInfo::load(&home::connection_path(cluster)).ok()?;
    let ask = async {
        let client = Client::connect_with(info).await.ok()?;
        client.ids().await.ok().map(|ids| ids.len())
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// Reads a file from one node.
pub async fn get(
    node: &NodeTarget,
    transport: &Transport,
    src: &str,
) -> Result<Vec<u8>, ProviderError> {
    read(node, transport, &shell_quote(src), src).await
}

/// Reads the file at `path` (a word of the node's shell, expanded there) from one node;
/// `src` names it in errors.
async fn read(
    node: &NodeTarget,
    transport: &Transport,
    path: &str,
    src: &str,
) -> Result<Vec<u8>, ProviderError> {
    // base64 keeps binary files intact through the text-oriented helper.
    let r = run_once(node, transport, &format!("base64 < {path}"), &[]).await;
    let text = r.map_err(|e| ProviderError::Ssh(format!("{node}: cannot read {src}: {e}")))?;
    let clean: String = text.split_whitespace().collect();
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, clean)
        .map_err(|e| ProviderError::Ssh(format!("{node}: {src} came back garbled: {e}")))
}

/// Fetches the connection file a cluster's master keeps (for `starling connect`).
pub async fn fetch_connection(
    cluster: &str,
    master: &NodeTarget,
    transport: &Transport,
) -> Result<ConnectionInfo, ProviderError> {
    let path = format!(
        "{}/config/connection.json",
        bootstrap::dir_in_shell(cluster, "master")
    );
    let bytes = read(master, transport, &path, "the connection file").await?;
    let info: ConnectionInfo = serde_json::from_slice(&bytes).map_err(|e| {
        ProviderError::Ssh(format!(
            "the connection file on {master} is unreadable: {e}"
        ))
    })?;
    if info.cluster != cluster {
        return Err(ProviderError::Ssh(format!(
            "{master} holds the connection file of cluster '{}', not '{cluster}'",
            info.cluster
        )));
    }
    Ok(info)
}

/// The nodes of a cluster of the `ssh` provider: the spec's hosts, the first the master.
pub fn ssh_nodes(spec: &ClusterSpec) -> Vec<NodeTarget> {
    spec.hosts
        .iter()
        .enumerate()
        .map(|(i, h)| NodeTarget {
            name: node_name(i),
            ssh_host: h.host.to_string(),
            private: h.host.to_string(),
            port: h.port,
            user: h.user.to_string(),
        })
        .collect()
}

/// `master` for 0, `node001` for 1, …
pub fn node_name(i: usize) -> String {
    if i == 0 {
        "master".into()
    } else {
        format!("node{i:03}")
    }
}
