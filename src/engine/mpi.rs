//! MPI clusters: the engines' kernels are the ranks of one MPI world.
//!
//! A kernel started by its engine would not be an MPI process, and a child of an MPI process is
//! not a rank; so on an MPI cluster the kernels are started the other way round. The master's
//! supervisor runs one `mpiexec` over the cluster's nodes (the [`World`] file lists every rank:
//! its host, Python, working directory and socket), and each rank runs [`ATTACH`] (which every
//! node's supervisor writes into its `run` directory first): it connects to its engine's Unix
//! socket (`run/kernel-SLOT.sock` in its node's directory, a 0700 folder; the engine checks the
//! peer is its own user), says which rank it is, receives the kernel's three private pipes
//! (SCM_RIGHTS) and the kernel program, and initialises MPI. From there it is an ordinary
//! kernel — the same program, protocol and pipes as on any other cluster — that happens to be
//! rank N of `COMM_WORLD`, and its engine registers as engine N. Ranks are numbered in the world file's order: the nodes in
//! order, each node's engines in slot order.
//!
//! One rank cannot be replaced alone: when any kernel ends, Open MPI ends the whole world (every
//! rank initialises MPI before its kernel runs, so a rank that exits — even with status 0 —
//! aborts the job), every
//! engine reports its kernel gone, and the supervisor starts the world again; each engine takes
//! the new rank that attaches to its socket.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How long an engine waits for a new rank after its kernel ended with the world, and a rank
/// for its engine's socket: the whole world starts again at once, over SSH to every node.
pub const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// How long a new engine waits for its first rank: the world starts once every node of the
/// cluster has been set up, which on a large cluster with long `setup` commands takes a while.
pub const FIRST_ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

/// What a node's engines need to know on an MPI cluster (part of [`super::EngineConfig`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeMpi {
    /// Where the engines' sockets are (mode 0700).
    pub run_dir: PathBuf,
    /// On the node that starts the world (the master): the [`World`] file, which the
    /// supervisor reads at each start of the world.
    #[serde(default)]
    pub world: Option<PathBuf>,
}

impl NodeMpi {
    /// The socket the kernel of engine `slot` attaches to.
    pub fn socket(&self, slot: u32) -> PathBuf {
        socket_path(&self.run_dir, slot)
    }
}

/// The socket of engine `slot` in a node's `run` directory.
pub fn socket_path(run_dir: &Path, slot: u32) -> PathBuf {
    run_dir.join(format!("kernel-{slot}.sock"))
}

/// One rank of the world: where it runs and whom it attaches to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rank {
    /// The node's address, as the hostfile names it.
    pub host: String,
    pub python: String,
    pub workdir: PathBuf,
    /// Its engine's socket.
    pub socket: PathBuf,
    /// Its node's directory: the rank carries it as [`crate::node::MARK_VAR`], so stopping
    /// the node finds it.
    pub node_root: PathBuf,
}

/// The whole world, as the master's supervisor starts it: `config/mpi-world.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct World {
    pub mpiexec: String,
    /// The cluster's hostfile: each node with its slots.
    pub hostfile: PathBuf,
    /// How `mpiexec` reaches the other nodes (Open MPI's `plm_rsh_agent`): `ssh` with the
    /// cluster's own key. None on a one-node cluster.
    #[serde(default)]
    pub rsh_agent: Option<String>,
    /// MCA parameters, `--mca NAME VALUE`: a local cluster keeps Open MPI on loopback.
    #[serde(default)]
    pub mca: BTreeMap<String, String>,
    /// Every rank, in rank order.
    pub ranks: Vec<Rank>,
    /// Where `mpiexec` writes: its own messages, and what ranks print outside tasks.
    pub log: PathBuf,
}

/// The file, in a node's `run` directory, that holds [`ATTACH`] (what each rank runs).
const ATTACH_FILE: &str = "attach.py";

/// Writes [`ATTACH`] into a node's `run` directory (mode 0700), where its ranks run it: the
/// node's supervisor does, before any rank can start.
pub fn write_attach(run_dir: &Path) -> std::io::Result<()> {
    crate::home::create_private_dir(run_dir)?;
    crate::home::write_private(&run_dir.join(ATTACH_FILE), ATTACH.as_bytes())
}

/// What a rank runs (`python RUN_DIR/attach.py SOCKET RANK TIMEOUT`): it attaches to its engine
/// and puts the pipes it gets on fds 3–5, then initialises MPI (so the pipes cannot take fds
/// Open MPI holds) and runs the kernel program it was sent. Whatever way the kernel ends, the
/// process ends without finalising MPI, so its world ends with it.
pub const ATTACH: &str = r#"
import os, socket, struct, sys, time
path, rank, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# The pipes go to fds 3, 4 and 5 before MPI starts, so they cannot land on fds it holds.
said = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or os.environ.get("PMI_RANK")
if said is not None and int(said) != rank:
    sys.exit(f"starling: rank {said} was started for rank {rank}; the world is out of order")
deadline = time.monotonic() + wait
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        break
    except OSError as e:
        s.close()
        if time.monotonic() > deadline:
            sys.exit(f"starling: rank {rank} found no engine at {path} within {wait:.0f} s ({e})")
        time.sleep(0.05)
s.sendall(struct.pack("<I", rank))
_, fds, _, _ = socket.recv_fds(s, 1, 3)
if len(fds) != 3:
    sys.exit(f"starling: rank {rank}: its engine sent {len(fds)} pipes, not 3")
chunks = []
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    chunks.append(b)
s.close()
import fcntl
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
for fd in fds:
    os.close(fd)
for fd, to in zip(high, (3, 4, 5)):
    os.dup2(fd, to)
    os.close(fd)
del s, fds, high
# Now an MPI process: from here on, however this process ends, its world ends with it.
try:
    from mpi4py import MPI
except ImportError as e:
    sys.exit(f"starling: this MPI kernel cannot import mpi4py ({e}); install it for {sys.executable}: python3 -m pip install mpi4py")
if MPI.COMM_WORLD.Get_rank() != rank:
    sys.exit(f"starling: rank {MPI.COMM_WORLD.Get_rank()} was started for rank {rank}; the world is out of order")
try:
    exec(compile(b"".join(chunks).decode(), "<starling-kernel>", "exec"))
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
"#;

impl World {
    /// Reads the world file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the MPI world {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("the MPI world {} is not valid: {e}", path.display()))
    }

    /// Writes the hostfile `mpiexec` reads.
    fn write_hostfile(&self) -> Result<(), String> {
        crate::home::write_private(&self.hostfile, self.hostfile_text().as_bytes())
            .map_err(|e| format!("cannot write the hostfile {}: {e}", self.hostfile.display()))
    }

    /// The hostfile's text: each host once, with its slots, in rank order.
    pub fn hostfile_text(&self) -> String {
        let mut hosts: Vec<(&str, u32)> = Vec::new();
        for r in &self.ranks {
            match hosts.iter_mut().find(|(h, _)| *h == r.host) {
                Some((_, n)) => *n += 1,
                None => hosts.push((&r.host, 1)),
            }
        }
        let mut text = String::new();
        for (h, n) in hosts {
            let _ = writeln!(text, "{h} slots={n}");
        }
        text
    }

    /// Options every `mpiexec` of the cluster takes: its hostfile, root, how to reach the
    /// other nodes, the spec's MCA parameters.
    fn common_args(&self, as_root: bool) -> Vec<String> {
        let mut args: Vec<String> = vec!["--hostfile".into(), self.hostfile.display().to_string()];
        if as_root {
            // Open MPI refuses root without this; root is who runs CI and many cloud images.
            args.push("--allow-run-as-root".into());
        }
        if let Some(agent) = &self.rsh_agent {
            args.extend(["--mca".into(), "plm_rsh_agent".into(), agent.clone()]);
            // The cluster's key is on the master only: every node's daemon is started from
            // there, not from other nodes (Open MPI's tree spawn, past 64 nodes).
            args.extend(["--mca".into(), "plm_rsh_no_tree_spawn".into(), "1".into()]);
        }
        for (k, v) in &self.mca {
            args.extend(["--mca".into(), k.clone(), v.clone()]);
        }
        args
    }

    /// `mpiexec`'s arguments for a plain MPI program over the cluster (`starling mpirun`):
    /// `n` ranks (default: every slot of the hostfile), filled node by node.
    pub fn mpirun_args(&self, as_root: bool, n: Option<u32>, command: &[String]) -> Vec<String> {
        let mut args = self.common_args(as_root);
        if let Some(n) = n {
            args.extend(["-n".into(), n.to_string()]);
        }
        args.extend(command.iter().cloned());
        args
    }

    /// `mpiexec`'s arguments: one application context per rank, so rank N is exactly the
    /// N-th entry (its host, socket and working directory), whatever Open MPI's mapping
    /// policy.
    pub fn mpiexec_args(&self, as_root: bool) -> Vec<String> {
        let mut args = self.common_args(as_root);
        // Engines per node is the user's choice, as on any cluster, and the kernels share their
        // node's cores with the engines: no binding, no refusal to oversubscribe.
        args.extend(["--oversubscribe", "--bind-to", "none"].map(String::from));
        let wait = ATTACH_TIMEOUT.as_secs().to_string();
        for (i, r) in self.ranks.iter().enumerate() {
            if i > 0 {
                args.push(":".into());
            }
            args.extend([
                "-n".into(),
                "1".into(),
                "--host".into(),
                r.host.clone(),
                "--wdir".into(),
                r.workdir.display().to_string(),
                // `env` execs Python: the rank is the Python process, marked as its node's.
                "env".into(),
                format!("{}={}", crate::node::MARK_VAR, r.node_root.display()),
                r.python.clone(),
                r.socket.with_file_name(ATTACH_FILE).display().to_string(),
                r.socket.display().to_string(),
                i.to_string(),
                wait.clone(),
            ]);
        }
        args
    }
}

/// Starts the world described in the file at `path`: writes its hostfile, then runs
/// `mpiexec` with its output going to the world's log, kept under
/// [`LOG_LIMIT`](super::kernel::LOG_LIMIT). The caller reaps it (the supervisor reaps every
/// child). Call it inside the runtime: the log is copied by tasks of it.
pub fn launch(path: &Path) -> Result<nix::unistd::Pid, String> {
    let world = World::load(path)?;
    world.write_hostfile()?;
    let as_root = nix::unistd::geteuid().is_root();
    let mut child = std::process::Command::new(&world.mpiexec)
        .args(world.mpiexec_args(as_root))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}; install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin)", world.mpiexec))?;
    if let Some(out) = child
        .stdout
        .take()
        .and_then(|o| tokio::process::ChildStdout::from_std(o).ok())
    {
        tokio::spawn(super::kernel::copy_to_log(out, world.log.clone()));
    }
    if let Some(err) = child
        .stderr
        .take()
        .and_then(|e| tokio::process::ChildStderr::from_std(e).ok())
    {
        tokio::spawn(super::kernel::copy_to_log(err, world.log.clone()));
    }
    let pid = i32::try_from(child.id()).map_err(|_| "pid out of range".to_string())?;
    Ok(nix::unistd::Pid::from_raw(pid))
}

/// Runs `command` as an MPI program over the world's hostfile (`starlingd mpirun`): replaces
/// this process with `mpiexec`, so its output, exit status and signals are the program's.
/// Returns only when `mpiexec` cannot be run.
pub fn mpirun(world_path: &Path, n: Option<u32>, command: &[String]) -> String {
    use std::os::unix::process::CommandExt as _;
    let world = match World::load(world_path) {
        Ok(w) => w,
        Err(e) => return e,
    };
    if let Err(e) = world.write_hostfile() {
        return e;
    }
    let err = std::process::Command::new(&world.mpiexec)
        .args(world.mpirun_args(nix::unistd::geteuid().is_root(), n, command))
        .exec();
    format!(
        "cannot run `{}`: {err}; install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin)",
        world.mpiexec
    )
}

/// Whether this machine can start MPI kernels with `python`: `mpiexec` on the PATH, and
/// mpi4py importable. The error names what to install.
pub fn check_here(python: &str) -> Result<(), String> {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("mpiexec").is_file()));
    if !on_path {
        return Err("MPI engines need Open MPI's `mpiexec`, and it is not on the PATH; install Open MPI (Debian/Ubuntu: `apt-get install openmpi-bin`), or start without --mpi".into());
    }
    let out = std::process::Command::new(python)
        .args(["-c", "import mpi4py; print(mpi4py.__version__)"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{python}` to look for mpi4py: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim().lines().last().unwrap_or("it failed");
        return Err(format!(
            "MPI engines need mpi4py for `{python}`, and it cannot import it ({why}); install it: `{python} -m pip install mpi4py`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        let rank = |host: &str, slot: u32| Rank {
            host: host.into(),
            python: "python3".into(),
            workdir: "/w".into(),
            socket: socket_path(Path::new(&format!("/n/{host}/run")), slot),
            node_root: format!("/n/{host}").into(),
        };
        World {
            mpiexec: "mpiexec".into(),
            hostfile: "/n/hostfile".into(),
            rsh_agent: Some("ssh -i /k".into()),
            mca: BTreeMap::from([("btl_tcp_if_include".into(), "lo".into())]),
            ranks: vec![
                rank("127.0.1.1", 0),
                rank("127.0.1.1", 1),
                rank("127.0.1.2", 0),
            ],
            log: "/n/mpi.log".into(),
        }
    }

    #[test]
    fn the_hostfile_lists_each_node_once_with_its_slots_in_rank_order() {
        assert_eq!(
            world().hostfile_text(),
            "127.0.1.1 slots=2\n127.0.1.2 slots=1\n"
        );
    }

    #[test]
    fn every_rank_is_its_own_application_context_in_rank_order() {
        let args = world().mpiexec_args(true);
        assert!(args.contains(&"--allow-run-as-root".to_string()));
        assert!(!world()
            .mpiexec_args(false)
            .contains(&"--allow-run-as-root".to_string()));
        let contexts: Vec<&[String]> = args.split(|a| a == ":").collect();
        assert_eq!(contexts.len(), 3);
        let sockets: Vec<&String> = contexts.iter().map(|c| &c[c.len() - 3]).collect::<Vec<_>>();
        assert_eq!(
            sockets,
            [
                "/n/127.0.1.1/run/kernel-0.sock",
                "/n/127.0.1.1/run/kernel-1.sock",
                "/n/127.0.1.2/run/kernel-0.sock"
            ]
        );
        let ranks: Vec<&String> = contexts.iter().map(|c| &c[c.len() - 2]).collect();
        assert_eq!(
            contexts[2][contexts[2].len() - 4],
            "/n/127.0.1.2/run/attach.py"
        );
        assert_eq!(ranks, ["0", "1", "2"]);
        let agent = args.iter().position(|a| a == "plm_rsh_agent").unwrap();
        assert_eq!(args[agent + 1], "ssh -i /k");
        assert!(contexts[2].contains(&"STARLING_NODE_ROOT=/n/127.0.1.2".to_string()));
    }
}
