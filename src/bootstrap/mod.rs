//! Bootstrap: turn machines into a running cluster — every node the same way, whether reached
//! over SSH or, for a local cluster, this machine's own `sh` ([`transport`]).
//!
//! For every node, concurrently (at most [`PARALLEL`] at once) and each as soon as it answers:
//! log in (retrying until the login deadline), detect its architecture, directory and cores,
//! install `starlingd` (skipped when the checksum already matches; a local node links to this
//! machine's), run the spec's setup commands, copy
//! its files, check Python, write the config and secrets (mode 0600), then start the
//! controller (on the master) and the node's engines. `starlingd` leaves this machine once:
//! the master gets it uploaded and hands it to the other nodes ([`share`]) — also to nodes that
//! join later (`add-node`), when the master's copy is this very build — each of which keeps it
//! only if its checksum is the one computed here. Everything a node holds lives under
//! `~/.starling/node/<cluster>/<node>/` on it, and every process started there carries that
//! directory in [`MARK_VAR`](crate::node::MARK_VAR), so `starlingd stop --root` finds them all.
//! (On a local cluster's node, starling's home is `STARLING_HOME`, as everywhere on this
//! machine, and its controller picks a free port: bootstrap then writes down the address it
//! took, in the controller's and engines' config and in the node's report.)
//! On an MPI cluster ([`mpi`]) each node also gets the cluster's SSH key authorized, and once
//! every node is up the master's world file gets their engines' ranks (the whole world for a new
//! cluster, appended for nodes that join one); the master's supervisor then starts the world
//! (again). The caller then waits for the engines to register.

pub mod mpi;
pub mod share;
pub mod transport;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

pub use transport::{CommandError, Login, NodeTarget, Remote, Transport};

use crate::controller::ControllerConfig;
use crate::engine::{shell_quote, EngineConfig};
use crate::node::MARK_VAR;
use crate::spec::{ClusterSpec, Count};

/// Nodes bootstrapped at once.
pub const PARALLEL: usize = 32;

/// A node's directory, relative to the login user's home.
pub fn node_dir(cluster: &str, node: &str) -> String {
    format!(".starling/node/{cluster}/{node}")
}

/// starling's home on a node, in a shell: `STARLING_HOME` where it is set (a local cluster's
/// node is this machine, whose starling home it uses), else `~/.starling`.
pub const HOME_IN_SHELL: &str = "${STARLING_HOME:-$HOME/.starling}";

/// A node's directory in a node's shell, quoted.
pub fn dir_in_shell(cluster: &str, node: &str) -> String {
    format!("\"{HOME_IN_SHELL}/node/{cluster}/{node}\"")
}

/// The secrets and addresses engines need to join a cluster.
#[derive(Debug, Clone)]
pub struct Join {
    /// `host:port` of the controller as the nodes reach it.
    pub controller: String,
    pub cert_pem: String,
    pub engine_key: crate::proto::auth::Key,
    pub max_frame: usize,
    /// The master: it hands `starlingd` to the other nodes, and on an MPI cluster its world
    /// file takes their ranks.
    pub master: NodeTarget,
    /// On an MPI cluster: its public key line ([`mpi::make_key`]), authorized on every node.
    pub mpi_key: Option<String>,
}

/// What to start on the master, besides its engines.
#[derive(Debug, Clone)]
pub struct MasterRole {
    /// The controller's config (its `listen` is set from the master's private address).
    pub controller: ControllerConfig,
    /// The connection file, kept on the master for `starling connect` (not on a local
    /// cluster's, which is this machine).
    pub connection: Option<Vec<u8>>,
    /// On an MPI cluster: the private half of the cluster's SSH key, kept on the master only.
    pub mpi_key: Option<Vec<u8>>,
}

/// What bootstrap needs to know besides the nodes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub cluster: String,
    pub spec: ClusterSpec,
    pub transport: Transport,
    /// The local `starlingd` to upload (or, to a local cluster's node, to link to).
    pub daemon: PathBuf,
    pub join: Join,
    /// `Some` when the first node given is the master and starts the controller.
    pub master: Option<MasterRole>,
}

impl Plan {
    /// Whether the cluster's kernels are one MPI world: a remote cluster's nodes share its MPI
    /// key; a local cluster's ranks are all on this machine and need none.
    fn mpi(&self) -> bool {
        self.join.mpi_key.is_some() || (self.transport.is_local() && self.spec.mpi)
    }
}

/// How one node's bootstrap went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeReport {
    pub node: String,
    pub address: String,
    pub engines: u32,
    /// Whether `starlingd` had to be installed (false: the checksum matched).
    pub uploaded: bool,
    /// Whether it came from the master rather than from this machine.
    pub fetched: bool,
    /// Bytes this machine sent the node (`starlingd` when it uploaded it, config, files).
    pub sent_bytes: u64,
    /// Whether the engines' Python has cloudpickle, which functions sent from Python clients
    /// need (code from the CLI and Rust does not).
    pub cloudpickle: bool,
    pub seconds: f64,
    /// The address the controller listens on, when it chose its port (the master of a local
    /// cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
}

/// A node that failed, at which step, and why.
#[derive(Debug, Clone)]
pub struct NodeFailure {
    pub node: String,
    pub address: String,
    pub step: String,
    pub message: String,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}: {}",
            self.node, self.address, self.step, self.message
        )
    }
}

/// Live progress, one line per node: a spinner on a terminal, plain lines otherwise.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        use std::io::IsTerminal as _;
        Self {
            multi: std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A line above the bars (or on stderr).
    pub fn say(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// A bar counting up to `total` on a terminal (`None` elsewhere).
    pub fn counter(&self, total: u64, what: &str) -> Option<ProgressBar> {
        self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(&format!("  {{bar:30}} {{pos}}/{{len}} {what}"))
                    .expect("a valid template"),
            );
            bar
        })
    }

    /// A node's line: a spinner, then how its bootstrap ended. None for a local cluster's
    /// node (`shown` false), which is this machine: `up` says all there is to say.
    fn node(&self, name: &str, shown: bool) -> NodeBar {
        let bar = self.multi.as_ref().filter(|_| shown).map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("  {spinner} {prefix:<8} {elapsed:>4} {msg}")
                    .expect("a valid template"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        NodeBar {
            bar,
            progress: self.clone(),
            name: name.to_string(),
            started: Instant::now(),
            shown,
        }
    }
}

struct NodeBar {
    bar: Option<ProgressBar>,
    progress: Progress,
    name: String,
    started: Instant,
    shown: bool,
}

impl NodeBar {
    fn step(&self, msg: &str) {
        tracing::info!(
            "{} at {:.3} s: {msg}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    fn finish(&self, line: String) {
        match &self.bar {
            Some(b) => b.finish_with_message(line),
            None if self.shown => self.progress.say(&format!("  {line}")),
            None => {}
        }
    }
}

/// The state of the controller, as the nodes waiting to start their engines see it.
type ControllerState = Option<Result<(), String>>;

/// Where the nodes get `starlingd`, as they see it: `None` while the master is not ready to
/// hand it out, then the master's share (`Ok(None)`: from this machine), or why the master
/// failed.
type SourceState = Option<Result<Option<Source>, String>>;

/// A running `starlingd share` on the master.
#[derive(Debug, Clone)]
struct Source {
    addr: String,
    token: String,
}

struct Shared {
    plan: Plan,
    daemon: Vec<u8>,
    daemon_sha: String,
    controller: watch::Sender<ControllerState>,
    /// Whether the master hands `starlingd` to the other nodes (a fresh cluster of several, or
    /// nodes joining a running one).
    master_shares: bool,
    source: watch::Sender<SourceState>,
    /// `daemon` gzip-compressed, made once when a node first needs it.
    packed: tokio::sync::OnceCell<Vec<u8>>,
    progress: Progress,
}

/// `daemon` gzip-compressed (on a blocking thread: it takes a few hundred milliseconds).
async fn pack(daemon: &[u8]) -> Vec<u8> {
    let daemon = daemon.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(daemon.len() / 2),
            flate2::Compression::fast(),
        );
        gz.write_all(&daemon).expect("writing to memory");
        gz.finish().expect("writing to memory")
    })
    .await
    .expect("compressing does not panic")
}

/// Waits until the master's bootstrap has said what `state` tells (or failed, or ended).
async fn from_master<T: Clone>(
    state: &watch::Sender<Option<Result<T, String>>>,
) -> Result<T, String> {
    let mut rx = state.subscribe();
    let said = rx.wait_for(Option::is_some).await.map(|s| s.clone());
    match said {
        Ok(Some(r)) => r,
        _ => Err("the master's bootstrap ended".into()),
    }
}

/// Where a booted node keeps its things: its directory, and where its kernels work.
#[derive(Debug)]
struct Place {
    dir: String,
    workdir: String,
}

/// What one node's bootstrap did.
struct Booted {
    engines: u32,
    /// The node's directory, and where its kernels work.
    dir: String,
    workdir: String,
    /// Where the controller listens, when it chose its port.
    controller: Option<String>,
    uploaded: bool,
    fetched: bool,
    cloudpickle: bool,
    sent_bytes: u64,
}

/// Bootstraps `nodes` (the master first when `plan.master` is set). Returns every node's
/// report, or every failure.
pub async fn run(
    plan: Plan,
    nodes: Vec<NodeTarget>,
    progress: &Progress,
) -> Result<Vec<NodeReport>, Vec<NodeFailure>> {
    // A local cluster's node runs this machine's starlingd where it is.
    let read = if plan.transport.is_local() {
        Ok(Vec::new())
    } else {
        std::fs::read(&plan.daemon)
    };
    let daemon = match read {
        Ok(d) => d,
        Err(e) => {
            return Err(vec![NodeFailure {
                node: "this machine".into(),
                address: "local".into(),
                step: "reading starlingd".into(),
                message: format!("cannot read {}: {e}", plan.daemon.display()),
            }])
        }
    };
    let daemon_sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &daemon,
    ));
    let initial = if plan.master.is_some() {
        None
    } else {
        Some(Ok(()))
    };
    let (tx, _) = watch::channel(initial);
    // The master hands starlingd to the other nodes: a fresh cluster's master once it has it,
    // and to nodes that join a running cluster its copy, if that is this very build.
    let master_shares = if plan.master.is_some() {
        nodes.len() > 1
    } else {
        !nodes.is_empty()
    };
    let (source, _) = watch::channel(if master_shares { None } else { Some(Ok(None)) });
    let shared = Arc::new(Shared {
        plan,
        daemon,
        daemon_sha,
        controller: tx,
        master_shares,
        source,
        packed: tokio::sync::OnceCell::new(),
        progress: progress.clone(),
    });
    let order: Vec<NodeTarget> = nodes.clone();
    let has_master = shared.plan.master.is_some();
    if !has_master && shared.master_shares {
        let shared = shared.clone();
        tokio::spawn(async move {
            let offered = offer_from_master(&shared).await;
            shared.source.send_replace(Some(Ok(offered)));
        });
    }
    if has_master && !shared.plan.transport.is_local() {
        // A new cluster's master almost always needs starlingd: compress it while the nodes
        // are being logged in to and probed.
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.packed.get_or_init(|| pack(&shared.daemon)).await;
        });
    }
    let results: Vec<Result<(Place, NodeReport), NodeFailure>> =
        futures::stream::iter(nodes.into_iter().enumerate().map(|(i, node)| {
            let shared = shared.clone();
            async move {
                let is_master = has_master && i == 0;
                let bar = shared
                    .progress
                    .node(&node.name, !shared.plan.transport.is_local());
                let started = Instant::now();
                let r = boot(&shared, &node, is_master, &bar).await;
                match r {
                    Ok(Booted {
                        engines,
                        dir,
                        workdir,
                        controller,
                        uploaded,
                        fetched,
                        cloudpickle,
                        sent_bytes,
                    }) => {
                        bar.finish(format!(
                            "{} ready: {engines} engine{} in {:.1} s",
                            node.name,
                            if engines == 1 { "" } else { "s" },
                            started.elapsed().as_secs_f64()
                        ));
                        Ok((
                            Place { dir, workdir },
                            NodeReport {
                                node: node.name.clone(),
                                address: node.ssh_host.clone(),
                                engines,
                                uploaded,
                                fetched,
                                sent_bytes,
                                cloudpickle,
                                seconds: started.elapsed().as_secs_f64(),
                                controller,
                            },
                        ))
                    }
                    Err((step, message)) => {
                        if is_master {
                            let why = format!("the master failed at {step}");
                            shared.controller.send_replace(Some(Err(why.clone())));
                            shared.source.send_if_modified(|s| {
                                s.is_none().then(|| *s = Some(Err(why))).is_some()
                            });
                        }
                        bar.finish(format!("{} failed at {step}", node.name));
                        Err(NodeFailure {
                            node: node.name.clone(),
                            address: node.ssh_host.clone(),
                            step,
                            message,
                        })
                    }
                }
            }
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if !failed.is_empty() {
        return Err(failed.into_iter().map(|r| r.unwrap_err()).collect());
    }
    let booted: Vec<(Place, NodeReport)> = ok.into_iter().map(Result::unwrap).collect();
    if shared.plan.mpi() {
        settle_world(&shared.plan, has_master, &order, &booted).await?;
    }
    let mut reports: Vec<NodeReport> = booted.into_iter().map(|(_, r)| r).collect();
    reports.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(reports)
}

/// For nodes joining a running cluster: the master's `starlingd`, handed out by a `starlingd
/// share` started there, if it is this very build; `None` (each node gets it from here) if not,
/// or if the master cannot.
async fn offer_from_master(shared: &Shared) -> Option<Source> {
    let plan = &shared.plan;
    let master = &plan.join.master;
    let qdir = dir_in_shell(&plan.cluster, "master");
    let script = format!(
        "[ \"$(sha256sum {qdir}/bin/starlingd 2>/dev/null | cut -d' ' -f1)\" = {sha} ] || \
         {{ echo starling:other-build; exit 0; }}; {}",
        share_command(&qdir, &master.private),
        sha = shared.daemon_sha
    );
    let said = match Remote::open(master, &plan.transport).await {
        Ok(remote) => {
            let said = remote.run(&script).await;
            remote.close().await;
            said
        }
        Err(e) => Err(CommandError::NotRun(e)),
    };
    let offered = said.as_deref().ok().and_then(offer_in);
    if offered.is_none() {
        tracing::warn!(
            "the master does not hand its starlingd out ({}); the new nodes get it from here",
            said.unwrap_or_else(|e| e.to_string()).trim()
        );
    }
    offered
}

/// The command that starts `starlingd share` of the node's own `starlingd` (in `qdir`, quoted)
/// on `private`; it prints `sharing ADDR TOKEN`, or `starling:no-share` if it cannot.
fn share_command(qdir: &str, private: &str) -> String {
    format!(
        "{{ {MARK_VAR}={qdir} {qdir}/bin/starlingd share --file {qdir}/bin/starlingd \
         --listen {private}:0 --daemon --log {qdir}/logs/share.log --pid-file {qdir}/share.pid \
         || echo starling:no-share; }}"
    )
}

/// The share [`share_command`]'s output offers, if it does.
fn offer_in(out: &str) -> Option<Source> {
    out.lines().find_map(|l| {
        let mut words = l.strip_prefix("sharing ")?.split_whitespace();
        Some(Source {
            addr: words.next()?.to_string(),
            token: words.next()?.to_string(),
        })
    })
}

/// Gives the booted nodes' engines their ranks in the world file on the master: a new
/// cluster's whole world (`fresh`; `order` has the master first), or the ranks of nodes that join
/// a running one after those it has. The master's supervisor then starts the world (again).
async fn settle_world(
    plan: &Plan,
    fresh: bool,
    order: &[NodeTarget],
    booted: &[(Place, NodeReport)],
) -> Result<(), Vec<NodeFailure>> {
    let nodes: Vec<mpi::WorldNode> = order
        .iter()
        .filter_map(|t| {
            let (Place { dir, workdir }, report) = booted.iter().find(|(_, r)| r.node == t.name)?;
            Some(mpi::WorldNode {
                name: t.name.clone(),
                private: t.private.clone(),
                dir: dir.clone(),
                workdir: workdir.clone(),
                engines: report.engines,
            })
        })
        .collect();
    let spec = &plan.spec;
    let master = &plan.join.master;
    let failure = |message: String| {
        vec![NodeFailure {
            node: master.name.clone(),
            address: master.ssh_host.clone(),
            step: "giving the engines their MPI ranks".into(),
            message,
        }]
    };
    let remote = Remote::open(master, &plan.transport)
        .await
        .map_err(failure)?;
    let settled = async {
        if fresh {
            // Open MPI reaches a remote cluster's nodes with the cluster's key; a local
            // cluster's ranks are all here.
            let ssh = (!plan.transport.is_local()).then_some((master.port, master.user.as_str()));
            let world = mpi::world(&spec.python, ssh, &spec.mpi_mca, &nodes);
            mpi::write_world(&remote, &plan.cluster, &world, mpi::Change::New).await
        } else {
            let mut world = mpi::read_world(&remote, &plan.cluster)
                .await?
                .ok_or_else(|| "the master has no MPI world file".to_string())?;
            world.ranks.extend(mpi::ranks(&spec.python, &nodes));
            let addresses: Vec<String> = nodes.iter().map(|n| n.private.clone()).collect();
            let change = mpi::Change::Of {
                addresses: &addresses,
                ssh_port: master.port,
            };
            mpi::write_world(&remote, &plan.cluster, &world, change).await
        }
    }
    .await;
    remote.close().await;
    settled.map_err(failure)
}

type StepError = (String, String);

fn at<E: std::fmt::Display>(step: &str) -> impl Fn(E) -> StepError + '_ {
    move |message| (step.to_string(), message.to_string())
}

/// Facts about a node, from one command.
struct Probe {
    arch: String,
    /// The node's directory.
    dir: String,
    /// Where scripts start, and the kernels work: the login user's home, or on a local
    /// cluster's node the directory `up` ran in.
    workdir: String,
    cores: u32,
}

fn machine_arch(uname: &str) -> &str {
    match uname {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    }
}

async fn boot(
    shared: &Shared,
    node: &NodeTarget,
    is_master: bool,
    bar: &NodeBar,
) -> Result<Booted, StepError> {
    let plan = &shared.plan;
    bar.step("waiting for sshd");
    let remote = Remote::open(node, &plan.transport)
        .await
        .map_err(at("logging in"))?;
    let result = boot_in(shared, &remote, is_master, bar).await;
    remote.close().await;
    result
}

async fn boot_in<'s>(
    shared: &'s Shared,
    remote: &Remote,
    is_master: bool,
    bar: &NodeBar,
) -> Result<Booted, StepError> {
    let plan = &shared.plan;
    let node = &remote.node;
    let spec = &plan.spec;
    let local = plan.transport.is_local();

    // Every command is a round trip and a session on the node (~0.1 s on a small sshd), so
    // the steps are packed into as few commands as their order allows.
    bar.step("detecting the machine");
    let probe = remote
        .run(&format!(
            "d={d}; {{ mkdir -p \"$d/bin\" \"$d/config\" \"$d/logs\" && chmod 700 \"$d\" \"$d/config\"; }} || exit 1; \
             uname -m; printf '%s\\n' \"$d\" \"$PWD\"; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN; \
             {sha}; command -v gzip >/dev/null 2>&1 && echo gzip || echo no-gzip",
            d = dir_in_shell(&plan.cluster, &node.name),
            // A local node links to this machine's starlingd instead: no checksum to compare.
            sha = if local {
                "echo local"
            } else {
                "{ sha256sum \"$d/bin/starlingd\" 2>/dev/null || echo none; }"
            },
        ))
        .await
        .map_err(at("detecting the machine"))?;
    let mut lines = probe.lines();
    let probe = Probe {
        arch: lines.next().unwrap_or("").trim().to_string(),
        dir: lines.next().unwrap_or("").trim().to_string(),
        workdir: lines.next().unwrap_or("").trim().to_string(),
        cores: lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(1),
    };
    let have_sha = lines
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    let gunzip = lines.next().is_some_and(|l| l.trim() == "gzip");
    let ours = std::env::consts::ARCH;
    if !local && machine_arch(&probe.arch) != ours {
        return Err((
            "detecting the machine".into(),
            format!(
                "the node is {} but this starlingd is built for {ours}; use {ours} instances, or set STARLINGD to a starlingd built for {}",
                probe.arch, probe.arch
            ),
        ));
    }
    if !probe.dir.starts_with('/') || !probe.workdir.starts_with('/') {
        return Err((
            "detecting the machine".into(),
            format!(
                "the node's directory is '{}' and its working directory '{}': not absolute paths (is $HOME set?)",
                probe.dir, probe.workdir
            ),
        ));
    }
    let dir = probe.dir.clone();
    let qdir = shell_quote(&dir);

    // The node's config and secrets (mode 0600), written with the upload; the engines' config
    // with the command that starts them (it names the controller's address, which a local
    // cluster's controller picks when it starts).
    let engines = match spec.engines_per_node {
        Count::N(n) => n,
        // This machine's own count honours CPU quotas (a container's), which `nproc` does not.
        Count::Auto if local => spec.engines_per_node.resolve_here(),
        Count::Auto => probe.cores.max(1),
    };
    let engine = EngineConfig {
        cluster: plan.cluster.clone(),
        controller: plan.join.controller.clone(),
        cert_pem: plan.join.cert_pem.clone(),
        engine_key: plan.join.engine_key.clone(),
        node: node.name.clone(),
        host: node.private.clone(),
        engines,
        python: spec.python.clone(),
        workdir: PathBuf::from(&probe.workdir),
        log: Some(PathBuf::from(format!("{dir}/logs/kernels.log"))),
        max_frame: plan.join.max_frame,
        reconnect_s: spec.reconnect_s,
        mpi: plan.mpi().then(|| crate::engine::mpi::NodeMpi {
            run_dir: PathBuf::from(format!("{dir}/run")),
            world: is_master.then(|| PathBuf::from(format!("{dir}/config/mpi-world.json"))),
        }),
    };
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    let master = if is_master {
        plan.master.as_ref()
    } else {
        None
    };
    if let (Some(private), Some(public)) =
        (master.and_then(|m| m.mpi_key.as_ref()), &plan.join.mpi_key)
    {
        files.push((mpi::KEY_FILE, private.clone()));
        files.push((mpi::PUBLIC_KEY_FILE, public.clone().into_bytes()));
    }
    let mut controller = master.map(|m| {
        let mut controller = m.controller.clone();
        controller.listen.clone_from(&plan.join.controller);
        // The provider's task store, or one in the node's directory.
        if controller.db.is_none() {
            controller.db = Some(PathBuf::from(format!("{dir}/tasks.db")));
        }
        controller
    });
    if let Some(c) = &controller {
        files.push((
            "controller.json",
            serde_json::to_vec_pretty(c).expect("serializes"),
        ));
    }
    if let Some(connection) = master.and_then(|m| m.connection.as_ref()) {
        files.push(("connection.json", connection.clone()));
    }
    let py = shell_quote(&spec.python);
    // One Python start (a tenth of a second behind a pyenv shim): its version, and whether it
    // has cloudpickle — not a failure: the CLI and Rust clients work without it, and `up` says
    // which nodes lack it.
    let python_check = format!(
        "{{ command -v {py} >/dev/null 2>&1 || {{ echo 'no {} on the PATH' >&2; exit {EXIT_NO_PYTHON}; }}; \
         {py} -c 'import sys\nif sys.version_info < (3, 8): sys.exit(1)\ntry:\n    import cloudpickle\nexcept ImportError:\n    print(\"{NO_CLOUDPICKLE}\")' \
         || {{ echo 'it is older than 3.8' >&2; exit {EXIT_NO_PYTHON}; }}; }}",
        spec.python.replace('\'', "")
    );
    let python_error = |m: CommandError| {
        (
            "checking python".to_string(),
            if local {
                format!("{m}; install Python 3.8 or newer, or name the one to use with `python:` in the spec")
            } else {
                format!("{m}; install Python 3.8 or newer with a setup command (e.g. `sudo apt-get install -y python3`), or set `python:` in the spec")
            },
        )
    };
    // Without setup commands or files, python cannot change before the engines start: check
    // it with the upload.
    let check_early = spec.setup.is_empty() && spec.files.is_empty();

    let uploaded = !local && have_sha != shared.daemon_sha;
    // Where the node gets starlingd: from the master once it hands it out, else from here.
    let source = if uploaded && !is_master {
        bar.step("waiting for the master's starlingd");
        match from_master(&shared.source).await {
            Ok(source) => source,
            Err(why) => return Err(("waiting for the master's starlingd".into(), why)),
        }
    } else {
        None
    };
    let shares = is_master && shared.master_shares && !local;
    // What goes up compressed, when this machine uploads starlingd to a node with gzip.
    let packed = || async move {
        if gunzip {
            Some(&shared.packed.get_or_init(|| pack(&shared.daemon)).await[..])
        } else {
            None
        }
    };
    // Config and secrets go on stdin, after starlingd when it is uploaded: one round trip,
    // and nothing secret in a command line.
    let install_script = |source: Option<&Source>, packed: Option<&'s [u8]>| {
        let mut install = String::from("umask 077");
        let mut input: Vec<&[u8]> = Vec::new();
        if master.is_some() {
            // A new cluster starts a new task store (a controller started on an old one would
            // take up its jobs): one left by an earlier cluster of this name is kept beside it.
            let _ = write!(
                install,
                " && if [ -e {qdir}/tasks.db ]; then t=$(date +%s); for f in tasks.db tasks.db-wal tasks.db-shm; do \
                 [ ! -e {qdir}/$f ] || mv -f {qdir}/$f {qdir}/tasks-$t.db${{f#tasks.db}}; done; fi"
            );
        }
        let part = format!("{qdir}/bin/starlingd.part");
        match (uploaded, source) {
            (false, _) if local => {
                let _ = write!(
                    install,
                    " && ln -sfn {} {qdir}/bin/starlingd",
                    shell_quote(&plan.daemon.to_string_lossy())
                );
            }
            (false, _) => {}
            (true, Some(src)) => {
                // Without a Python to fetch with (setup commands may install it), this exit
                // status:
                // this machine uploads it instead.
                let fetch = share::fetch_command(
                    &spec.python,
                    &src.addr,
                    &src.token,
                    &part,
                    shared.daemon.len(),
                    &shared.daemon_sha,
                );
                let _ = write!(
                    install,
                    " && {{ command -v {py} >/dev/null 2>&1 || exit {EXIT_NO_PYTHON_TO_FETCH}; }} && {fetch} && chmod 755 {part} && \
                     mv -f {part} {qdir}/bin/starlingd"
                );
            }
            (true, None) => {
                // Compressed where the node can unpack it: about a third of the bytes.
                let (bytes, unpack) = match packed {
                    Some(p) => (p, " | gzip -dc"),
                    None => (&shared.daemon[..], ""),
                };
                let _ = write!(
                    install,
                    " && head -c {len}{unpack} > {part} && chmod 755 {part} && \
                     [ \"$(sha256sum {part} | cut -d' ' -f1)\" = {sha} ] && \
                     mv -f {part} {qdir}/bin/starlingd",
                    len = bytes.len(),
                    sha = shared.daemon_sha
                );
                input.push(bytes);
            }
        }
        for (name, bytes) in &files {
            let _ = write!(install, " && {}", write_config(&qdir, name, bytes));
            input.push(bytes);
        }
        if check_early {
            let _ = write!(install, " && {python_check}");
        }
        if shares {
            // The master hands starlingd to the other nodes; if it cannot, they get it from
            // here.
            let _ = write!(install, " && {}", share_command(&qdir, &node.private));
        }
        (install, input)
    };
    bar.step(match (uploaded, &source) {
        (false, _) => "writing config",
        (true, Some(_)) => "fetching starlingd from the master",
        (true, None) => "uploading starlingd",
    });
    let first_packed = if uploaded && source.is_none() {
        packed().await
    } else {
        None
    };
    let (install, input) = install_script(source.as_ref(), first_packed);
    let mut sent_bytes: u64 = input.iter().map(|b| b.len() as u64).sum();
    let mut fetched = source.is_some();
    let mut result = remote.run_with_input(&install, &input).await;
    // No Python to fetch with yet (setup commands may install it), or the master out of reach
    // (a firewall between listed hosts): this machine uploads it after all.
    if fetched
        && matches!(&result, Err(e) if matches!(e.status(), Some(s) if s == EXIT_NO_PYTHON_TO_FETCH || s == i32::from(share::EXIT_UNREACHABLE)))
    {
        if let Err(m) = &result {
            tracing::warn!(node = %node, "{m}; uploading starlingd from here instead");
        }
        bar.step("uploading starlingd (the master's copy is out of reach)");
        let (install, input) = install_script(None, packed().await);
        sent_bytes += input.iter().map(|b| b.len() as u64).sum::<u64>();
        fetched = false;
        result = remote.run_with_input(&install, &input).await;
    }
    // What the node's scripts printed: the Python check's word on cloudpickle is in it.
    let mut said = match result {
        Ok(out) => out,
        Err(e) if e.status() == Some(EXIT_NO_PYTHON) => return Err(python_error(e)),
        Err(e) if fetched && e.status() == Some(i32::from(share::EXIT_CORRUPT)) => {
            return Err(at("fetching starlingd from the master")(e))
        }
        Err(e) => return Err(at("installing starlingd and its config")(e)),
    };
    if shares {
        let offered = offer_in(&said);
        if offered.is_none() {
            tracing::warn!(
                "the master cannot hand starlingd out ({}); nodes get it from here",
                said.trim()
            );
        }
        shared.source.send_replace(Some(Ok(offered)));
    }

    for (i, cmd) in spec.setup.iter().enumerate() {
        let step = format!(
            "setup command {} of {} (`{}`)",
            i + 1,
            spec.setup.len(),
            one_line(cmd)
        );
        bar.step(&format!("setup {}/{}", i + 1, spec.setup.len()));
        remote
            .run_unbounded(&format!(
                "out=$(cd \"$HOME\" && STARLING_CLUSTER={} STARLING_NODE={} bash -c {} 2>&1 </dev/null); rc=$?; \
                 printf '%s\\n' \"$out\" >> {qdir}/logs/setup.log; printf '%s\\n' \"$out\"; exit $rc",
                plan.cluster,
                node.name,
                shell_quote(cmd)
            ), &[])
            .await
            .map_err(|e| (step, e.to_string()))?;
    }

    for f in &spec.files {
        bar.step(&format!("copying {}", f.dest));
        let step = format!("copying {} to {}", f.src.display(), f.dest);
        let bytes = std::fs::read(expand_home(&f.src)).map_err(|e| {
            (
                step.clone(),
                format!("cannot read {}: {e}", f.src.display()),
            )
        })?;
        let dest = shell_quote(&f.dest);
        sent_bytes += bytes.len() as u64;
        remote
            .run_with_input(
                &format!("cd \"$HOME\" && mkdir -p \"$(dirname {dest})\" && cat > {dest}"),
                &[&bytes],
            )
            .await
            .map_err(|e| (step, e.to_string()))?;
    }

    if let Some(public) = &plan.join.mpi_key {
        bar.step("checking MPI");
        remote
            .run(&mpi::check_script(&spec.python, &plan.cluster, public))
            .await
            .map_err(|e| {
                (
                    "checking MPI".to_string(),
                    mpi::check_error(&spec.python, &e),
                )
            })?;
    }

    let start = |role: &str| start_command(&qdir, role);
    let pre = if check_early {
        "cd \"$HOME\"".to_string()
    } else {
        format!("cd \"$HOME\" && {python_check}")
    };
    let engine_json =
        |engine: &EngineConfig| serde_json::to_vec_pretty(engine).expect("serializes");
    let mut chosen = None;
    let out = if let Some(controller) = &mut controller {
        bar.step("starting controller and engines");
        let failed = |e: CommandError| {
            if e.status() == Some(EXIT_NO_PYTHON) {
                python_error(e)
            } else {
                at("starting the controller and engines")(e)
            }
        };
        let said_address = |out: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix("listening "))
                .map(|a| a.trim().to_string())
                .ok_or_else(|| {
                    (
                        "starting the controller".to_string(),
                        format!("it said '{}' instead of its address", out.trim()),
                    )
                })
        };
        let out = if controller.listen.ends_with(":0") {
            // The controller picks its port (a local cluster): its config and the engines'
            // name the address it took, so that a restarted controller listens there too.
            let out = remote
                .run(&format!("{pre} && {}", start("controller")))
                .await
                .map_err(failed)?;
            let addr = said_address(&out)?;
            controller.listen.clone_from(&addr);
            let engine = EngineConfig {
                controller: addr.clone(),
                ..engine
            };
            let (cjson, ejson) = (
                serde_json::to_vec_pretty(&*controller).expect("serializes"),
                engine_json(&engine),
            );
            sent_bytes += (cjson.len() + ejson.len()) as u64;
            let rest = remote
                .run_with_input(
                    &format!(
                        "{} && {} && {}",
                        write_config(&qdir, "controller.json", &cjson),
                        write_config(&qdir, "engine.json", &ejson),
                        start("engine")
                    ),
                    &[&cjson, &ejson],
                )
                .await
                .map_err(failed)?;
            chosen = Some(addr);
            out + &rest
        } else {
            let ejson = engine_json(&engine);
            sent_bytes += ejson.len() as u64;
            let out = remote
                .run_with_input(
                    &format!(
                        "{pre} && {} && {} && {}",
                        start("controller"),
                        write_config(&qdir, "engine.json", &ejson),
                        start("engine")
                    ),
                    &[&ejson],
                )
                .await
                .map_err(failed)?;
            said_address(&out)?;
            out
        };
        shared.controller.send_replace(Some(Ok(())));
        out
    } else {
        if !check_early {
            bar.step("checking python");
            said.push_str(&remote.run(&pre).await.map_err(python_error)?);
        }
        bar.step("waiting for the controller");
        if let Err(why) = from_master(&shared.controller).await {
            return Err(("waiting for the controller".into(), why));
        }
        bar.step("starting engines");
        let ejson = engine_json(&engine);
        sent_bytes += ejson.len() as u64;
        remote
            .run_with_input(
                &format!(
                    "cd \"$HOME\" && {} && {}",
                    write_config(&qdir, "engine.json", &ejson),
                    start("engine")
                ),
                &[&ejson],
            )
            .await
            .map_err(at("starting engines"))?
    };
    Ok(Booted {
        engines,
        dir,
        workdir: probe.workdir.clone(),
        controller: chosen,
        uploaded,
        fetched,
        cloudpickle: !said.contains(NO_CLOUDPICKLE) && !out.contains(NO_CLOUDPICKLE),
        sent_bytes,
    })
}

/// The command that writes config file `name` of the node in `qdir` (quoted), mode 0600, from
/// the next `bytes.len()` bytes of its stdin: whole or not at all.
fn write_config(qdir: &str, name: &str, bytes: &[u8]) -> String {
    format!(
        "(umask 077 && head -c {len} > {qdir}/config/{name}.part && mv -f {qdir}/config/{name}.part {qdir}/config/{name})",
        len = bytes.len()
    )
}

/// The exit status of a node's scripts when its Python is missing or too old.
const EXIT_NO_PYTHON: i32 = 97;
/// The exit status of the install script when the node has no Python to fetch `starlingd`
/// from the master with.
const EXIT_NO_PYTHON_TO_FETCH: i32 = 96;

/// What a node's start command prints when its Python lacks cloudpickle.
const NO_CLOUDPICKLE: &str = "starling:no-cloudpickle";

/// The note `up` gives when some nodes' Python lacks cloudpickle.
pub fn cloudpickle_note(reports: &[NodeReport]) -> Option<String> {
    let lacking: Vec<&str> = reports
        .iter()
        .filter(|r| !r.cloudpickle)
        .map(|r| r.node.as_str())
        .collect();
    (!lacking.is_empty()).then(|| {
        format!(
            "the engines' Python on {} lacks cloudpickle: functions sent from Python clients fail there until it is installed (`python3 -m pip install cloudpickle`; on other machines, e.g. in the spec's `setup`)",
            lacking.join(", ")
        )
    })
}

fn one_line(cmd: &str) -> String {
    let first = cmd.lines().next().unwrap_or("");
    let mut s: String = first.chars().take(60).collect();
    if s.len() < cmd.len() {
        s.push('…');
    }
    s
}

/// `~/x` → `$HOME/x` on this machine.
pub fn expand_home(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME")
            .map_or_else(|| path.to_path_buf(), |h| PathBuf::from(h).join(rest)),
        Err(_) => path.to_path_buf(),
    }
}

/// The command that starts a node's `starlingd ROLE` (`controller` or `engine`) from its
/// config as a daemon marked with the node's directory `dir` (shell-quoted). It returns once
/// the daemon is ready; the controller prints `listening ADDR`.
fn start_command(dir: &str, role: &str) -> String {
    format!(
        "{MARK_VAR}={dir} {dir}/bin/starlingd {role} --config {dir}/config/{role}.json \
         --daemon --log {dir}/logs/{role}.log --pid-file {dir}/{role}.pid"
    )
}

/// The script that stops a node's processes and keeps its files (`stop`).
pub fn stop_script(cluster: &str, node: &str) -> String {
    let q = dir_in_shell(cluster, node);
    format!(
        "if [ -x {q}/bin/starlingd ]; then {q}/bin/starlingd stop --root {q} >/dev/null; fi; true"
    )
}

/// Whom a teardown is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The whole cluster goes (`down`): the cluster's MPI key leaves `authorized_keys` too.
    Cluster,
    /// One node leaves a cluster that stays (`remove-node`): the key stays, since the node's
    /// home may be the other nodes' too (a shared /home), and its instance goes anyway.
    Node,
}

/// The script that stops a node's processes and removes its directory (`down`,
/// `remove-node`). Harmless where nothing of the cluster is.
pub fn teardown_script(cluster: &str, node: &str, leaving: Leaving) -> String {
    let mut script = format!(
        "{}; rm -rf {}; rmdir \"{HOME_IN_SHELL}/node/{cluster}\" 2>/dev/null; ",
        stop_script(cluster, node),
        dir_in_shell(cluster, node),
    );
    if leaving == Leaving::Cluster {
        let _ = write!(script, "{}; ", mpi::unauthorize_script(cluster));
    }
    script.push_str("true");
    script
}

/// The shell command that prints a node's engine count, from its config.
fn engine_count_command(q: &str) -> String {
    format!("sed -n 's/^ *\"engines\": *\\([0-9]*\\).*/\\1/p' {q}/config/engine.json")
}

/// The script that restarts a node's processes from the config it already has (`start`
/// after `stop`). A restarted controller takes up its task store where it stopped. It prints
/// the node's engine count last.
pub fn restart_script(cluster: &str, node: &str, controller: bool) -> String {
    let q = dir_in_shell(cluster, node);
    let mut script = format!("cd \"$HOME\" && {q}/bin/starlingd stop --root {q} >/dev/null && ");
    if controller {
        let _ = write!(script, "{} && ", start_command(&q, "controller"));
    }
    let _ = write!(
        script,
        "{} >/dev/null && {}",
        start_command(&q, "engine"),
        engine_count_command(&q)
    );
    script
}

/// The script that restarts the controller on the master (`restart`), leaving its engines
/// running: the controller whose pid file names it (checked against its command line, so a
/// reused pid is never hit) gets SIGTERM, then SIGKILL after 5 s; a new one starts from the
/// same config and task store. It prints `listening ADDR`, then the new pid.
pub fn restart_controller_script(cluster: &str) -> String {
    let q = dir_in_shell(cluster, "master");
    format!(
        "cd \"$HOME\" && pid=$(cat {q}/controller.pid 2>/dev/null); \
         if [ -n \"$pid\" ] && tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -qF \"controller --config {HOME_IN_SHELL}/node/{cluster}/master/config/controller.json\"; then \
         kill $pid; n=0; while kill -0 $pid 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; kill -9 $pid 2>/dev/null; \
         n=0; while kill -0 $pid 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; fi; \
         {} && cat {q}/controller.pid",
        start_command(&q, "controller"),
    )
}

/// The script that prints a node's engine count.
pub fn engine_count_script(cluster: &str, node: &str) -> String {
    engine_count_command(&dir_in_shell(cluster, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_directories_are_per_cluster_and_node() {
        assert_eq!(
            node_dir("science", "node003"),
            ".starling/node/science/node003"
        );
        // A node's shell finds the directory under its starling home: `~/.starling` on a
        // remote node, `STARLING_HOME` on this machine (a local cluster's node).
        let q = dir_in_shell("science", "node003");
        let echo = |home: Option<&str>| {
            let mut sh = std::process::Command::new("sh");
            sh.args(["-c", &format!("printf %s {q}")])
                .env("HOME", "/home/u")
                .env_remove("STARLING_HOME");
            if let Some(h) = home {
                sh.env("STARLING_HOME", h);
            }
            String::from_utf8(sh.output().unwrap().stdout).unwrap()
        };
        assert_eq!(echo(None), "/home/u/.starling/node/science/node003");
        assert_eq!(echo(Some("/tmp/s")), "/tmp/s/node/science/node003");
        let s = teardown_script("science", "node003", Leaving::Cluster);
        assert!(s.contains(&format!("stop --root {q}")), "{s}");
        assert!(s.contains(&format!("rm -rf {q};")), "{s}");
        assert!(s.contains("starling-mpi:science"));
        assert!(!teardown_script("science", "node003", Leaving::Node).contains("starling-mpi"));
        let m = dir_in_shell("science", "master");
        let r = restart_script("science", "master", true);
        assert!(r.contains(&format!(
            "starlingd controller --config {m}/config/controller.json"
        )));
        assert!(r.contains("starlingd engine --config"));
        assert!(!restart_script("science", "node001", false).contains("controller"));
        assert!(
            !r.contains("tasks.db"),
            "a restarted controller keeps its task store: {r}"
        );
        let c = restart_controller_script("science");
        assert!(
            c.contains(&format!("controller --config {m}/config/controller.json")),
            "{c}"
        );
        assert!(
            !c.contains("starlingd stop"),
            "the engines keep running: {c}"
        );
    }

    #[test]
    fn architectures_are_compared_by_their_kernel_names() {
        assert_eq!(machine_arch("amd64"), "x86_64");
        assert_eq!(machine_arch("arm64"), "aarch64");
        assert_eq!(machine_arch("x86_64"), "x86_64");
    }

    #[test]
    fn long_setup_commands_are_shortened_in_messages() {
        assert_eq!(one_line("apt-get update"), "apt-get update");
        let long = format!("echo {}", "x".repeat(100));
        assert!(one_line(&long).ends_with('…'));
        assert_eq!(one_line("a\nb"), "a…");
    }
}
