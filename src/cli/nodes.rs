//! The commands that act on a cluster's machines: ssh, exec, put, get, add-node, remove-node,
//! stop, start, connect. Each finds the cluster with [`provider::open`] and calls the provider.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{
    hints, output, AddNodeArgs, ClusterArg, ExecArgs, GetArgs, Global, MpirunArgs, PutArgs,
    RemoveNodeArgs, SshArgs,
};
use crate::bootstrap::{NodeTarget, Progress};
use crate::client::connection::ConnectionInfo;
use crate::client::Client;
use crate::home;
use crate::provider::{self, remote, Cluster};

async fn open(g: &Global, name: &str) -> Result<Cluster> {
    Ok(provider::open(name, &hints(g)).await?)
}

fn pick(nodes: Vec<NodeTarget>, wanted: &[String]) -> Result<Vec<NodeTarget>> {
    if wanted.is_empty() {
        return Ok(nodes);
    }
    let mut out = Vec::new();
    for w in wanted {
        match nodes.iter().find(|n| &n.name == w) {
            Some(n) => out.push(n.clone()),
            None => bail!(
                "there is no node '{w}'; the nodes are {}",
                nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

pub async fn ssh(g: &Global, args: &SshArgs) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let wanted = args.node.clone().unwrap_or_else(|| "master".into());
    let node = pick(cluster.nodes().await?, &[wanted])?.remove(0);
    let err = cluster
        .ssh_to(&node, args.command.is_empty())?
        .args(&args.command)
        .exec();
    bail!("cannot run ssh: {err}")
}

/// `starling mpirun`: a plain MPI program over an MPI cluster's nodes, run by `starlingd
/// mpirun` where the cluster's world file is — on this machine for a local cluster, on the
/// master over SSH otherwise — with its output streamed and its exit status returned.
pub async fn mpirun(g: &Global, args: &MpirunArgs) -> Result<ExitCode> {
    let name = super::cluster_name(g, args.name.as_ref())?;
    let mut rest: Vec<String> = Vec::new();
    if let Some(n) = args.n {
        rest.extend(["-n".into(), n.to_string()]);
    }
    rest.push("--".into());
    rest.extend(args.command.iter().cloned());
    let not_mpi = || {
        anyhow::anyhow!(
            "cluster '{name}' was not started as an MPI cluster, so it has no hostfile; start one with `starling up --mpi` or `mpi: true` in its spec"
        )
    };
    let cluster = open(g, &name).await?;
    let master = pick(cluster.nodes().await?, &["master".into()])?.remove(0);
    let dir = crate::bootstrap::dir_in_shell(&name, "master");
    let quoted: Vec<String> = rest.iter().map(|a| crate::engine::shell_quote(a)).collect();
    let script = format!(
        "if [ ! -f {dir}/config/mpi-world.json ]; then echo {} >&2; exit 2; fi; \
         exec {dir}/bin/starlingd mpirun --world {dir}/config/mpi-world.json {}",
        crate::engine::shell_quote(&not_mpi().to_string()),
        quoted.join(" ")
    );
    // It runs where a shell on the master starts: the login user's home, or on a local
    // cluster the directory this command runs in. With a terminal, Ctrl-C reaches mpiexec on
    // the master, not only ssh here.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let err = cluster.command_on(&master, tty)?.arg(script).exec();
    bail!("cannot reach the master: {err}")
}

pub async fn exec(g: &Global, args: &ExecArgs) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let nodes = pick(cluster.nodes().await?, &args.nodes)?;
    let transport = cluster.transport(remote::QUICK_LOGIN);
    let results = remote::run_everywhere(&nodes, &transport, &args.command).await;
    Ok(super::exit(output::per_node(g.output, &results)))
}

pub async fn put(g: &Global, args: &PutArgs) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let nodes = pick(cluster.nodes().await?, &args.nodes)?;
    let transport = cluster.transport(remote::QUICK_LOGIN);
    let results = remote::put(&nodes, &transport, &args.src, &args.dest).await?;
    Ok(super::exit(output::per_node(g.output, &results)))
}

pub async fn get(g: &Global, args: &GetArgs) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let node = pick(cluster.nodes().await?, std::slice::from_ref(&args.node))?.remove(0);
    let transport = cluster.transport(remote::QUICK_LOGIN);
    let bytes = remote::get(&node, &transport, &args.src).await?;
    let mut dest = args.dest.clone();
    if dest.is_dir() {
        let file = std::path::Path::new(&args.src)
            .file_name()
            .context("the remote path names no file")?;
        dest = dest.join(file);
    }
    std::fs::write(&dest, &bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    output::fetched(g.output, &node.name, &args.src, &dest, bytes.len());
    Ok(ExitCode::SUCCESS)
}

pub async fn add_node(g: &Global, args: &AddNodeArgs) -> Result<ExitCode> {
    if args.count == 0 {
        bail!("-n must be at least 1");
    }
    let cluster = open(g, &args.name).await?;
    cluster.supports("add-node")?;
    let spec = match &args.file {
        Some(path) => {
            let mut s = crate::spec::load(path)?;
            s.name.clone_from(&cluster.name);
            s
        }
        None => cluster.spec("add-node")?.clone(),
    };
    let info = ConnectionInfo::load(&home::connection_path(&cluster.name))
        .context("add-node waits for the new engines through the connection file; `starling connect NAME` fetches it")?;
    let client = Client::connect_with(info).await?;
    let status = client.status().await?;
    let before = status.engines.len() as u32;
    let world = provider::world_kernels(&status);
    let progress = Progress::new();
    let started = std::time::Instant::now();
    let reports = cluster.add_nodes(&spec, args.count, &progress).await?;
    let new: u32 = reports.iter().map(|r| r.engines).sum();
    let ids = client
        .wait_for_engines(before + new, Duration::from_secs(spec.register_timeout_s))
        .await?;
    if !world.is_empty() {
        progress.say("waiting for the MPI world to start again with the new ranks");
        provider::await_world(&client, &cluster.name, &world, ids.len()).await?;
    }
    output::added(g.output, &reports, &ids, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

pub async fn remove_node(g: &Global, args: &RemoveNodeArgs) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    cluster.supports("remove-node")?;
    // On an MPI cluster, the world starts again without the node: wait for it, so that what
    // is sent next runs there.
    let client = match ConnectionInfo::load(&home::connection_path(&cluster.name)) {
        Ok(info) => Client::connect_with(info).await.ok(),
        Err(_) => None,
    };
    let mut world = None;
    if let Some(c) = &client {
        let status = c.status().await?;
        let old = provider::world_kernels(&status);
        let staying = status
            .engines
            .iter()
            .filter(|e| e.node != args.node)
            .count();
        // A node whose engines never had ranks (its add-node failed) leaves the world as it is.
        let in_world = status
            .engines
            .iter()
            .any(|e| e.node == args.node && e.rank.is_some());
        if in_world {
            world = Some((c, old, staying));
        }
    }
    let notes = cluster.remove_node(&args.node).await?;
    for n in notes {
        eprintln!("note: {n}");
    }
    if let Some((c, old, staying)) = world {
        provider::await_world(c, &cluster.name, &old, staying).await?;
    }
    output::message(
        g.output,
        &format!("removed {} from cluster '{}'", args.node, cluster.name),
        &serde_json::json!({"cluster": cluster.name, "removed": args.node}),
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(g: &Global, args: &ClusterArg) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let (n, notes) = cluster.stop().await?;
    for note in notes {
        eprintln!("note: {note}");
    }
    output::message(
        g.output,
        &format!(
            "cluster '{}' is stopped: {n} instance(s), disks kept; `starling start {}` resumes it",
            cluster.name, cluster.name
        ),
        &serde_json::json!({"cluster": cluster.name, "stopped": n}),
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn start(g: &Global, args: &ClusterArg) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let spec = cluster.spec("start")?.clone();
    let progress = Progress::new();
    let (nodes, engines) = cluster.start(&spec, &progress).await?;
    let info = ConnectionInfo::load(&home::connection_path(&cluster.name))?;
    let client = Client::connect_with(info).await?;
    // Every node comes back with the engines it had.
    let ids = client
        .wait_for_engines(engines, Duration::from_secs(spec.register_timeout_s))
        .await?;
    output::message(
        g.output,
        &format!(
            "cluster '{}' is running again: {} node(s), {} engines",
            cluster.name,
            nodes.len(),
            ids.len()
        ),
        &serde_json::json!({"cluster": cluster.name, "nodes": nodes, "engines": ids}),
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn connect(g: &Global, args: &ClusterArg) -> Result<ExitCode> {
    let cluster = open(g, &args.name).await?;
    let info = cluster.fetch_connection().await?;
    let path: PathBuf = home::connection_path(&cluster.name);
    info.save(&path)?;
    output::message(
        g.output,
        &format!(
            "connection file of cluster '{}' saved to {}",
            cluster.name,
            path.display()
        ),
        &serde_json::json!({"cluster": cluster.name, "connection": path}),
    );
    Ok(ExitCode::SUCCESS)
}
