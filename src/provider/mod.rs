//! Providers: where a cluster's nodes come from.
//!
//! Three kinds, each one type behind the [`Provider`] trait that owns its clusters' whole life
//! (up, nodes, add/remove, stop/start, down, what exists after an interrupted up):
//! [`local::Local`] (this machine is the cluster's one node, the default), [`ec2::Ec2`] (EC2
//! instances, or LocalStack's) and [`ssh::Ssh`] (hosts listed in the spec). What a kind does
//! not have is the trait's default, [`ProviderError::Unsupported`]. Every kind starts its nodes
//! through [`crate::bootstrap`] — over SSH ([`remote`] holds what ec2 and ssh share), or over
//! the local transport. [`up`] starts a cluster of the kind its spec names; [`open`] finds one
//! by name — from this machine's record of it, or for EC2 from the instances' tags — as a
//! [`Cluster`], through which every command after `up` reaches its provider.

pub mod ec2;
pub mod local;
pub mod remote;
pub mod ssh;

use std::path::PathBuf;
use std::time::Duration;

use crate::bootstrap::{Login, NodeFailure, NodeReport, NodeTarget, Progress, Transport};
use crate::client::ClientError;
use crate::home;
use crate::proto::{ClusterStatus, EngineId};
use crate::spec::{ClusterSpec, ProviderKind};
use remote::Record;

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
    /// How each node's bootstrap went (clusters on other machines).
    pub nodes: Vec<NodeReport>,
}

/// A cluster that was taken down.
#[derive(Debug, Clone)]
pub struct Terminated {
    pub cluster: String,
    /// Processes that were running and were stopped.
    pub stopped: usize,
    /// Whether its processes had already exited before `down`.
    pub was_dead: bool,
    /// What was removed besides processes (instances, security group, key pair).
    pub removed: Vec<String>,
    /// Warnings: what could not be done and did not need to be.
    pub notes: Vec<String>,
    /// Whether anything of the cluster existed at all (`down` twice finds nothing).
    pub found: bool,
}

/// A controller started again on its cluster's address and task store.
#[derive(Debug, Clone)]
pub struct Restarted {
    pub cluster: String,
    /// The new controller's pid (on its machine).
    pub controller_pid: Option<u32>,
    /// The engines the cluster's nodes run: what to wait for.
    pub engines: u32,
    /// When the restart began.
    pub started: std::time::Instant,
}

/// A restarted cluster whose engines are back.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub cluster: String,
    pub controller_pid: Option<u32>,
    pub engines: Vec<EngineId>,
    /// From the start of the restart to the last engine back.
    pub elapsed: Duration,
}

/// One line of `starling list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSummary {
    pub name: String,
    pub provider: ProviderKind,
    /// The EC2 region.
    pub region: Option<String>,
    pub state: String,
    /// Machines (instances, hosts) or node processes.
    pub nodes: usize,
    /// Instance types.
    pub types: String,
    /// Seconds since the oldest instance was launched.
    pub age_s: Option<u64>,
    pub controller: String,
    /// Registered engines, when the controller answers.
    pub engines: Option<usize>,
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
    #[error("{0}")]
    Invalid(String),
    /// An operation this kind of cluster does not have.
    #[error("`{operation}` is for {needs}; '{cluster}' is {} {provider} cluster", if *.provider == ProviderKind::Local { "a" } else { "an" })]
    Unsupported {
        operation: &'static str,
        cluster: String,
        provider: ProviderKind,
        /// The clusters that have it.
        needs: &'static str,
    },
    /// An EC2 call failed; the message says what starling was doing and what to do.
    #[error("{0}")]
    Cloud(String),
    #[error("{0}")]
    Ssh(String),
    #[error("bootstrap failed on {} node(s):\n{}", .0.len(), .0.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    Bootstrap(Vec<NodeFailure>),
    /// `up` failed after creating things: what exists, and how to remove it.
    #[error("{error}\nwhat exists of cluster '{cluster}' now: {exists}\n`starling down {cluster}` removes it")]
    Partial {
        cluster: String,
        error: Box<ProviderError>,
        exists: String,
    },
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

/// What a kind of cluster does, from `up` to `down`. [`local::Local`], [`ssh::Ssh`] and
/// [`ec2::Ec2`] (a region's EC2 API) each own their clusters' whole life behind it; an
/// operation a kind does not have is the default here: [`ProviderError::Unsupported`].
#[allow(async_fn_in_trait)]
pub trait Provider {
    /// Starts a cluster from `spec`; returns once every engine has registered.
    async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError>;
    /// After an `up` interrupted by Ctrl-C: `None` when everything it had started was stopped
    /// again, else what exists of the cluster now, for `down` to remove.
    async fn after_interrupted_up(spec: &ClusterSpec) -> Option<String>;
    /// Its nodes, the master first.
    async fn nodes(&self, cluster: &Cluster) -> Result<Vec<NodeTarget>, ProviderError>;
    /// How to reach its nodes, waiting at most `timeout` for one to let starling log in.
    fn transport(&self, cluster: &Cluster, timeout: Duration) -> Transport {
        Transport::Ssh(cluster.login(timeout))
    }
    /// Stops everything of the cluster and removes what it left; idempotent.
    async fn down(&self, cluster: &Cluster) -> Result<Terminated, ProviderError>;
    /// Stops its controller, if it runs, and starts it again on the same address and task
    /// store; the engines keep running and reconnect by themselves.
    async fn restart_controller(&self, cluster: &Cluster) -> Result<Restarted, ProviderError> {
        remote::restart_controller(cluster).await
    }
    /// Whether it has `operation` (`add-node`, `remove-node`, `stop`, `start`, `ssh`,
    /// `connect`), so that a command can say `Unsupported` before it starts.
    fn has(&self, operation: &str) -> bool {
        matches!(operation, "ssh" | "connect")
    }
    /// Launches `count` more nodes from `spec` and bootstraps them into the running cluster.
    async fn add_nodes(
        &self,
        cluster: &Cluster,
        _spec: &ClusterSpec,
        _count: u32,
        _progress: &Progress,
    ) -> Result<Vec<NodeReport>, ProviderError> {
        Err(cluster.unsupported("add-node"))
    }
    /// Stops one node's processes and gives its machine back; notes on what could not be done.
    async fn remove_node(
        &self,
        cluster: &Cluster,
        _node: &str,
    ) -> Result<Vec<String>, ProviderError> {
        Err(cluster.unsupported("remove-node"))
    }
    /// Stops every machine, keeping their disks: how many, and notes.
    async fn stop(&self, cluster: &Cluster) -> Result<(usize, Vec<String>), ProviderError> {
        Err(cluster.unsupported("stop"))
    }
    /// Starts a stopped cluster again: its nodes, and how many engines they had.
    async fn start(
        &self,
        cluster: &Cluster,
        _spec: &ClusterSpec,
        _progress: &Progress,
    ) -> Result<(Vec<String>, u32), ProviderError> {
        Err(cluster.unsupported("start"))
    }
}

/// Brings a cluster up with the provider its spec names.
pub async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
    match spec.provider {
        ProviderKind::Local => local::Local::up(spec, progress).await,
        ProviderKind::Ec2 => ec2::Ec2::up(spec, progress).await,
        ProviderKind::Ssh => ssh::Ssh::up(spec, progress).await,
    }
}

/// After an `up` interrupted by Ctrl-C: `None` when everything it had started was stopped
/// again (a local cluster), else what exists of the cluster now, for `down` to remove.
pub async fn after_interrupted_up(spec: &ClusterSpec) -> Option<String> {
    match spec.provider {
        ProviderKind::Local => local::Local::after_interrupted_up(spec).await,
        ProviderKind::Ec2 => ec2::Ec2::after_interrupted_up(spec).await,
        ProviderKind::Ssh => ssh::Ssh::after_interrupted_up(spec).await,
    }
}

/// What a caller knows about a cluster that this machine has no record of (a teammate's):
/// the region and endpoint to find it in by its tags, and a key to log in with.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub key_file: Option<PathBuf>,
}

/// A cluster found by name ([`open`]): local, or on other machines. Every operation on a
/// cluster after `up` goes through it to its kind's [`Provider`].
pub struct Cluster {
    pub name: String,
    /// This machine's record (the spec it was started from), if it has one.
    pub record: Option<Record>,
    pub hints: Hints,
    kind: Kind,
}

/// The provider of a cluster.
enum Kind {
    Local(local::Local),
    Ssh(ssh::Ssh),
    Ec2(ec2::Ec2),
}

/// `$call` with `$p` bound to the cluster's provider, whichever kind it is.
macro_rules! with_provider {
    ($cluster:expr, $p:ident => $call:expr) => {
        match &$cluster.kind {
            Kind::Local($p) => $call,
            Kind::Ssh($p) => $call,
            Kind::Ec2($p) => $call,
        }
    };
}

impl Cluster {
    /// Which kind of cluster it is.
    pub fn provider(&self) -> ProviderKind {
        match self.kind {
            Kind::Local(_) => ProviderKind::Local,
            Kind::Ssh(_) => ProviderKind::Ssh,
            Kind::Ec2(_) => ProviderKind::Ec2,
        }
    }

    /// Its region's EC2 API, for what only EC2 clusters show (their instances).
    pub fn ec2_api(&self) -> Option<&ec2::Ec2> {
        match &self.kind {
            Kind::Ec2(api) => Some(api),
            _ => None,
        }
    }

    /// How to reach its nodes, waiting at most `timeout` for one to let starling log in.
    pub fn transport(&self, timeout: Duration) -> Transport {
        with_provider!(self, p => Provider::transport(p, self, timeout))
    }

    /// How to log in over SSH, waiting at most `timeout` for a node.
    pub(crate) fn login(&self, timeout: Duration) -> Login {
        let key_file = self.hints.key_file.clone();
        match &self.record {
            Some(r) => {
                let mut login = remote::login(&r.spec, Some(timeout));
                if key_file.is_some() {
                    login.key_file = key_file;
                }
                login
            }
            None => Login {
                key_file,
                known_hosts: remote::known_hosts(&self.name),
                timeout,
            },
        }
    }

    fn has(&self, operation: &str) -> bool {
        with_provider!(self, p => Provider::has(p, operation))
    }

    /// `Unsupported`, for `operation` on this cluster.
    fn unsupported(&self, operation: &'static str) -> ProviderError {
        ProviderError::Unsupported {
            operation,
            cluster: self.name.clone(),
            provider: self.provider(),
            needs: match operation {
                "ssh" | "connect" => "clusters on other machines",
                _ => "EC2 clusters",
            },
        }
    }

    /// Whether this cluster can do `operation` (`add-node`, …): `Unsupported` if not.
    pub fn supports(&self, operation: &'static str) -> Result<(), ProviderError> {
        if self.has(operation) {
            Ok(())
        } else {
            Err(self.unsupported(operation))
        }
    }

    /// The command that runs a shell command line (its last argument, for the caller to add)
    /// on `node`, with a terminal when `tty`: `ssh` to a node on another machine, `sh -c` on a
    /// local cluster's node, in the node's shell environment either way.
    pub fn command_on(
        &self,
        node: &NodeTarget,
        tty: bool,
    ) -> Result<std::process::Command, ProviderError> {
        let login = match self.transport(remote::QUICK_LOGIN) {
            Transport::Local => return Ok(crate::bootstrap::transport::local_shell()),
            Transport::Ssh(login) => login,
        };
        let mut cmd = std::process::Command::new("ssh");
        cmd.arg("-p")
            .arg(node.port.to_string())
            .arg("-o")
            .arg("StrictHostKeyChecking=accept-new")
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                login.known_hosts.display()
            ));
        if let Some(k) = &login.key_file {
            cmd.arg("-i").arg(k).arg("-o").arg("IdentitiesOnly=yes");
        }
        if tty {
            cmd.arg("-t");
        }
        cmd.arg(format!("{}@{}", node.user, node.ssh_host));
        if let Some(parent) = login.known_hosts.parent() {
            home::create_private_dir(parent)?;
        }
        Ok(cmd)
    }

    /// `ssh` to `node` (`starling ssh`), with a terminal when `tty`; the caller adds the
    /// command, if any. A local cluster's node is this machine: `Unsupported`.
    pub fn ssh_to(
        &self,
        node: &NodeTarget,
        tty: bool,
    ) -> Result<std::process::Command, ProviderError> {
        self.supports("ssh")?;
        self.command_on(node, tty)
    }

    /// The connection file its master keeps (`starling connect`); a local cluster's is on
    /// this machine already: `Unsupported`.
    pub async fn fetch_connection(&self) -> Result<crate::client::ConnectionInfo, ProviderError> {
        self.supports("connect")?;
        let nodes = self.nodes().await?;
        let master = nodes
            .iter()
            .find(|n| n.name == "master")
            .ok_or_else(|| ProviderError::NoSuchCluster(self.name.clone()))?;
        remote::fetch_connection(&self.name, master, &self.transport(remote::QUICK_LOGIN)).await
    }

    /// Its nodes, the master first (EC2: the running instances).
    pub async fn nodes(&self) -> Result<Vec<NodeTarget>, ProviderError> {
        with_provider!(self, p => Provider::nodes(p, self).await)
    }

    /// Stops everything of the cluster and removes what it left (instances, security group,
    /// key pair; a local cluster's processes and files); idempotent.
    pub async fn down(&self) -> Result<Terminated, ProviderError> {
        with_provider!(self, p => Provider::down(p, self).await)
    }

    /// Stops its controller, if it runs, and starts it again on the same address and task
    /// store; the engines keep running and reconnect by themselves.
    pub async fn restart_controller(&self) -> Result<Restarted, ProviderError> {
        with_provider!(self, p => Provider::restart_controller(p, self).await)
    }

    /// Launches `count` more nodes from `spec` and bootstraps them into the running cluster.
    pub async fn add_nodes(
        &self,
        spec: &ClusterSpec,
        count: u32,
        progress: &Progress,
    ) -> Result<Vec<NodeReport>, ProviderError> {
        with_provider!(self, p => Provider::add_nodes(p, self, spec, count, progress).await)
    }

    /// Stops one node's processes and gives its machine back; notes on what could not be done.
    pub async fn remove_node(&self, node: &str) -> Result<Vec<String>, ProviderError> {
        with_provider!(self, p => Provider::remove_node(p, self, node).await)
    }

    /// Stops every machine, keeping their disks: how many, and notes.
    pub async fn stop(&self) -> Result<(usize, Vec<String>), ProviderError> {
        with_provider!(self, p => Provider::stop(p, self).await)
    }

    /// Starts a stopped cluster again: its nodes, and how many engines they had.
    pub async fn start(
        &self,
        spec: &ClusterSpec,
        progress: &Progress,
    ) -> Result<(Vec<String>, u32), ProviderError> {
        with_provider!(self, p => Provider::start(p, self, spec, progress).await)
    }

    /// The spec the cluster was started from (needed to add nodes or start it again).
    pub fn spec(&self, action: &str) -> Result<&ClusterSpec, ProviderError> {
        self.record.as_ref().map(|r| &r.spec).ok_or_else(|| {
            ProviderError::Invalid(format!(
                "{action} needs the cluster's spec, and this machine did not start '{}'; pass it with -f SPEC",
                self.name
            ))
        })
    }
}

/// The region to look for a cluster in: the hint, or AWS_REGION / AWS_DEFAULT_REGION.
fn region_hint(hints: &Hints) -> Option<String> {
    hints.region.clone().or_else(|| {
        ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
    })
}

/// Finds a cluster on other machines by name: this machine's record of it, or (with a region)
/// its EC2 tags.
pub async fn open(name: &str, hints: &Hints) -> Result<Cluster, ProviderError> {
    home::check_name("cluster", name).map_err(ProviderError::Invalid)?;
    let cluster = |kind, record| Cluster {
        name: name.to_string(),
        record,
        hints: hints.clone(),
        kind,
    };
    if let Some(record) = Record::load(name) {
        let kind = match record.provider {
            ProviderKind::Ec2 => Kind::Ec2(ec2::api_for(&record.spec).await?),
            ProviderKind::Ssh => Kind::Ssh(ssh::Ssh),
            ProviderKind::Local => Kind::Local(local::Local),
        };
        return Ok(cluster(kind, Some(record)));
    }
    if local::exists(name) {
        return Ok(cluster(Kind::Local(local::Local), None));
    }
    let Some(region) = region_hint(hints) else {
        return Err(ProviderError::Invalid(format!(
            "this machine has no record of cluster '{name}'; for a teammate's EC2 cluster pass --region (or set AWS_REGION), and --key-file to log in"
        )));
    };
    let api = ec2::Ec2::connect(&region, hints.endpoint_url.as_deref()).await;
    if api.resources(name).await?.is_empty() {
        return Err(ProviderError::NoSuchCluster(name.to_string()));
    }
    Ok(cluster(Kind::Ec2(api), None))
}

/// Takes a cluster down with whichever provider it belongs to; idempotent.
pub async fn down(name: &str, hints: &Hints) -> Result<Terminated, ProviderError> {
    home::check_name("cluster", name).map_err(ProviderError::Invalid)?;
    // Idempotent: a second `down` finds nothing, and says so.
    let nothing = |notes: Vec<String>| Terminated {
        cluster: name.to_string(),
        stopped: 0,
        was_dead: true,
        removed: Vec::new(),
        notes,
        found: false,
    };
    if Record::load(name).is_none() && !local::exists(name) && region_hint(hints).is_none() {
        return Ok(nothing(vec![
            "this machine has no record of it; for a teammate's EC2 cluster pass --region (or set AWS_REGION)".into(),
        ]));
    }
    let cluster = match open(name, hints).await {
        Ok(c) => c,
        Err(ProviderError::NoSuchCluster(_)) => return Ok(nothing(Vec::new())),
        Err(e) => return Err(e),
    };
    cluster.down().await
}

/// How long a restarted controller waits for its engines to come back: they retry every 2 s
/// at most, so this leaves room for a loaded machine.
const RESTART_REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// Restarts a cluster's controller (killed, hung, or running) on the same address and task
/// store, and waits until its engines are back: unfinished work goes on where it stopped.
pub async fn restart(
    name: &str,
    hints: &Hints,
    progress: &Progress,
) -> Result<Resumed, ProviderError> {
    let restarted = open(name, hints).await?.restart_controller().await?;
    let info = crate::client::ConnectionInfo::load(&home::connection_path(name))?;
    let client = crate::client::Client::connect_with(info).await?;
    let engines = await_engines(
        &client,
        restarted.engines,
        RESTART_REGISTER_TIMEOUT,
        progress,
    )
    .await?;
    Ok(Resumed {
        cluster: restarted.cluster,
        controller_pid: restarted.controller_pid,
        engines,
        elapsed: restarted.started.elapsed(),
    })
}

/// The kernels of an MPI cluster's engines now (none on any other cluster): what
/// [`await_world`] waits to see replaced after the cluster's nodes change.
pub fn world_kernels(status: &ClusterStatus) -> std::collections::BTreeSet<(EngineId, u32)> {
    status
        .engines
        .iter()
        .filter(|e| e.rank.is_some())
        .map(|e| (e.id, e.pid))
        .collect()
}

/// Waits until an MPI cluster's world has started again after its nodes changed: `n` engines,
/// whose kernels are ranks 0..n and none of the kernels in `old` (the world before: each
/// engine's kernel pid). Work sent from then on runs in the new world.
pub async fn await_world(
    client: &crate::client::Client,
    cluster: &str,
    old: &std::collections::BTreeSet<(EngineId, u32)>,
    n: usize,
) -> Result<(), ProviderError> {
    // Engines wait this long for their new ranks.
    let timeout = crate::engine::mpi::ATTACH_TIMEOUT;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let status = client.status().await?;
        let mut ranks: Vec<u32> = status.engines.iter().filter_map(|e| e.rank).collect();
        ranks.sort_unstable();
        let renewed = status.engines.iter().all(|e| !old.contains(&(e.id, e.pid)));
        if renewed && status.engines.len() == n && ranks.iter().copied().eq(0..n as u32) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(ProviderError::Start {
                what: "changed MPI world".into(),
                why: format!(
                    "its {n} ranks did not all reach their engines within {} s ({} engines, ranks {ranks:?})",
                    timeout.as_secs(),
                    status.engines.len()
                ),
                log: format!(
                    "; Open MPI's messages are in ~/{}/logs/mpi.log on the master",
                    crate::bootstrap::node_dir(cluster, "master")
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `n` engines have registered (or `timeout` passes), counting them on a terminal
/// meanwhile: `up` of many engines shows how far it got.
pub async fn await_engines(
    client: &crate::client::Client,
    n: u32,
    timeout: Duration,
    progress: &crate::bootstrap::Progress,
) -> Result<Vec<EngineId>, ClientError> {
    let Some(bar) = progress.counter(u64::from(n), "engines registered") else {
        return client.wait_for_engines(n, timeout).await;
    };
    let wait = client.wait_for_engines(n, timeout);
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let out = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tick.tick() => {
                if let Ok(ids) = client.ids().await {
                    bar.set_position(ids.len() as u64);
                }
            }
        }
    };
    bar.finish_and_clear();
    out
}

/// Every cluster this machine knows, and every EC2 cluster in the regions it knows of (the
/// hint, AWS_REGION, and the regions of the EC2 clusters it started).
pub async fn list(hints: &Hints) -> Result<Vec<ClusterSummary>, ProviderError> {
    let mut out = local::list().await;
    let mut regions: Vec<(String, Option<String>)> = Vec::new();
    if let Some(r) = region_hint(hints) {
        regions.push((r, hints.endpoint_url.clone()));
    }
    for name in crate::client::connection::known_clusters() {
        if let Some(record) = Record::load(&name) {
            match (&record.provider, &record.spec.ec2) {
                (ProviderKind::Ec2, Some(e)) => {
                    let key = (
                        e.region.as_str().to_string(),
                        e.endpoint_url.as_ref().map(|u| u.as_str().to_string()),
                    );
                    if !regions.contains(&key) {
                        regions.push(key);
                    }
                }
                (ProviderKind::Ssh, _) => out.push(ssh::summary(&record).await),
                _ => {}
            }
        }
    }
    for (region, endpoint) in regions {
        let api = ec2::Ec2::connect(&region, endpoint.as_deref()).await;
        for c in ec2::list(&api).await? {
            if !out.iter().any(|o| o.name == c.name) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_a_cluster_does_not_have_says_which_kind_has_it() {
        let cluster = Cluster {
            name: "lab".into(),
            record: None,
            hints: Hints::default(),
            kind: Kind::Ssh(ssh::Ssh),
        };
        let Err(err) = cluster.supports("add-node") else {
            panic!("an ssh cluster cannot add nodes")
        };
        assert!(matches!(
            err,
            ProviderError::Unsupported {
                operation: "add-node",
                provider: ProviderKind::Ssh,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "`add-node` is for EC2 clusters; 'lab' is an ssh cluster"
        );
    }
}
