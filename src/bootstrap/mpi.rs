//! What bootstrap adds for an MPI cluster (`mpi: true`) on SSH hosts and EC2: the cluster's
//! own SSH key (its private half on the master only, its public half authorized on every node,
//! so Open MPI's launcher on the master reaches them), a check that each node has Open MPI and
//! mpi4py, and — once every node is set up — the world file on the master, whose supervisor
//! then starts the ranks (see [`crate::engine::mpi`]).
//!
//! `add-node` appends the new nodes' ranks to the world file and `remove-node` takes a node's
//! out, each followed by SIGHUP to the master's supervisor, which ends the running world and
//! starts the new one: the ranks of a world are fixed while it runs. Engine ids stay what they
//! were; after a `remove-node` the ranks after the removed node's move down, so an engine's
//! rank can then differ from its id (`status` shows both).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::engine::mpi::{socket_path, Rank, World};

use super::{
    dir_in_shell, shell_quote, CommandError, NodeTarget, Remote, Transport, HOME_IN_SHELL,
};

/// The config file (in the master's `config/`) holding the cluster's private SSH key.
pub const KEY_FILE: &str = "mpi_key";
/// Its public key line, beside it: nodes that join later get it authorized.
pub const PUBLIC_KEY_FILE: &str = "mpi_key.pub";
/// The world file, in the master's `config/`.
const WORLD_FILE: &str = "mpi-world.json";

/// Exit statuses of [`check_script`]: what is missing.
const EXIT_NO_OPEN_MPI: i32 = 94;
const EXIT_NO_MPI4PY: i32 = 93;

/// The cluster's own SSH key pair, made with `ssh-keygen` here: (private key file, public
/// key line ending in the cluster's marker).
pub fn make_key(cluster: &str) -> Result<(Vec<u8>, String), String> {
    // Under this user's own starling home, not a shared /tmp: nobody else can put a key there.
    let dir = crate::home::home().join(format!("keygen-{}-{cluster}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::home::create_private_dir(&dir)
        .map_err(|e| format!("cannot make a folder for the cluster's key: {e}"))?;
    let made = keygen(cluster, &dir.join("key"));
    let _ = std::fs::remove_dir_all(&dir);
    made
}

fn keygen(cluster: &str, path: &std::path::Path) -> Result<(Vec<u8>, String), String> {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(marker(cluster))
        .arg("-f")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh-keygen (OpenSSH's client tools): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let private = std::fs::read(path).map_err(|e| e.to_string())?;
    let public = std::fs::read_to_string(path.with_extension("pub")).map_err(|e| e.to_string())?;
    Ok((private, public.trim().to_string()))
}

/// The comment that marks the cluster's key in `authorized_keys`, so `down` removes it.
fn marker(cluster: &str) -> String {
    format!("starling-mpi:{cluster}")
}

/// Checks that the node has Open MPI and the engines' Python has mpi4py, then authorizes the
/// cluster's key for the login user.
pub fn check_script(python: &str, cluster: &str, public_key: &str) -> String {
    let py = shell_quote(python);
    format!(
        "{{ command -v orted >/dev/null 2>&1 && command -v mpiexec >/dev/null 2>&1 || exit {EXIT_NO_OPEN_MPI}; }} && \
         {{ {py} -c 'import mpi4py' >/dev/null 2>&1 || exit {EXIT_NO_MPI4PY}; }} && {}",
        authorize_script(cluster, public_key)
    )
}

/// Puts the cluster's key in the login user's `authorized_keys`, on a line of its own: an older
/// key of a cluster of this name goes first.
fn authorize_script(cluster: &str, public_key: &str) -> String {
    format!(
        "mkdir -p \"$HOME/.ssh\" && chmod 700 \"$HOME/.ssh\" && touch \"$HOME/.ssh/authorized_keys\" && \
         {{ {}; }} && f=\"$HOME/.ssh/authorized_keys\" && \
         {{ [ -z \"$(tail -c 1 \"$f\")\" ] || echo >> \"$f\"; }} && printf '%s\\n' {k} >> \"$f\"",
        unauthorize_script(cluster),
        k = shell_quote(public_key),
    )
}

/// What a failed [`check_script`] means, and what to do.
pub fn check_error(python: &str, error: &CommandError) -> String {
    if error.status() == Some(EXIT_NO_OPEN_MPI) {
        "Open MPI is not installed on this node (no mpiexec and orted on the PATH); add `sudo apt-get install -y openmpi-bin` to the spec's setup (templates/ec2-mpi.yaml has it)".into()
    } else if error.status() == Some(EXIT_NO_MPI4PY) {
        format!("the engines' Python (`{python}`) cannot import mpi4py; add `{python} -m pip install mpi4py` (or `sudo apt-get install -y python3-mpi4py`) to the spec's setup")
    } else {
        error.to_string()
    }
}

/// Removes the cluster's key from `authorized_keys` (`down`, `remove-node`): the lines that end
/// in its marker exactly. The file is rewritten only when `grep` read it whole.
pub fn unauthorize_script(cluster: &str) -> String {
    // Cluster names are lowercase letters, digits and `-`: nothing a regex treats specially.
    let pattern = shell_quote(&format!(" {}$", marker(cluster)));
    format!(
        "f=\"$HOME/.ssh/authorized_keys\"; if [ -f \"$f\" ] && grep -q {pattern} \"$f\"; then \
         grep -v {pattern} \"$f\" > \"$f.starling\"; if [ $? -le 1 ]; then cat \"$f.starling\" > \"$f\"; fi; \
         rm -f \"$f.starling\"; fi; true"
    )
}

/// One node of the world, as bootstrap found it.
#[derive(Debug, Clone)]
pub struct WorldNode {
    pub name: String,
    /// The address the other nodes reach it at.
    pub private: String,
    /// Its directory, and where its kernels work.
    pub dir: String,
    pub workdir: String,
    pub engines: u32,
}

/// The world of `nodes` (the master first): their engines' kernels as ranks in node order.
/// The master reaches the other nodes over SSH as `ssh` (port, user) says, with the cluster's
/// key; a local cluster (`None`) has a single node, this machine, and keeps Open MPI's own
/// connections on loopback unless `mca` says otherwise.
pub fn world(
    python: &str,
    ssh: Option<(u16, &str)>,
    mca: &BTreeMap<String, String>,
    nodes: &[WorldNode],
) -> World {
    let mdir = &nodes[0].dir;
    let mut ranks = ranks(python, nodes);
    let (rsh_agent, mca) = match ssh {
        Some((port, user)) => (
            Some(format!(
                "ssh -i {mdir}/config/{KEY_FILE} -o BatchMode=yes -o StrictHostKeyChecking=accept-new \
                 -o UserKnownHostsFile={mdir}/known_hosts -o LogLevel=ERROR -p {port} -l {user}"
            )),
            mca.clone(),
        ),
        None => {
            for r in &mut ranks {
                r.host = "localhost".into();
            }
            let lo = [("oob_tcp_if_include", "lo"), ("btl_tcp_if_include", "lo")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()));
            (None, lo.chain(mca.clone()).collect())
        }
    };
    World {
        mpiexec: "mpiexec".into(),
        hostfile: PathBuf::from(format!("{mdir}/hostfile")),
        rsh_agent,
        mca,
        ranks,
        log: PathBuf::from(format!("{mdir}/logs/mpi.log")),
    }
}

/// The ranks of `nodes`' engines, in node order, each node's in slot order.
pub fn ranks(python: &str, nodes: &[WorldNode]) -> Vec<Rank> {
    nodes
        .iter()
        .flat_map(|n| {
            let dir = PathBuf::from(&n.dir);
            (0..n.engines).map(move |slot| Rank {
                host: n.private.clone(),
                python: python.to_string(),
                workdir: PathBuf::from(&n.workdir),
                socket: socket_path(&dir.join("run"), slot),
                node_root: dir.clone(),
            })
        })
        .collect()
}

/// Takes the ranks of node `node` out of `world`; the addresses they had (none: the node had
/// no ranks).
pub fn remove_node(world: &mut World, node: &str) -> Vec<String> {
    let mut gone: Vec<String> = Vec::new();
    world.ranks.retain(|r| {
        let of_node = r.node_root.file_name().and_then(|n| n.to_str()) == Some(node);
        if of_node && !gone.contains(&r.host) {
            gone.push(r.host.clone());
        }
        !of_node
    });
    gone
}

/// The master's directory in its shell, quoted.
fn master_dir(cluster: &str) -> String {
    dir_in_shell(cluster, "master")
}

/// The world file on the master, if the cluster is an MPI cluster.
pub async fn read_world(remote: &Remote, cluster: &str) -> Result<Option<World>, String> {
    let f = format!("{}/config/{WORLD_FILE}", master_dir(cluster));
    let text = remote
        .run(&format!("if [ -f {f} ]; then cat {f}; fi"))
        .await?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("the master's MPI world file is unreadable: {e}"))
}

/// How a world file is written.
pub enum Change<'a> {
    /// A new cluster's world: its supervisor is waiting for the file.
    New,
    /// A running cluster's world changed: the host keys of `addresses` (new to the world, or
    /// leaving it: EC2 hands addresses out again) are forgotten from the master's
    /// `known_hosts`, then the supervisor is told (SIGHUP) to end the running world and start
    /// this one.
    Of {
        addresses: &'a [String],
        ssh_port: u16,
    },
}

/// Writes the world file on the master.
pub async fn write_world(
    remote: &Remote,
    cluster: &str,
    world: &World,
    change: Change<'_>,
) -> Result<(), String> {
    remote
        .run_with_input(
            &write_world_script(cluster, &change),
            &[&serde_json::to_vec_pretty(world).expect("serializes")],
        )
        .await
        .map(|_| ())
        .map_err(String::from)
}

/// The shell command that writes the world file on the master from stdin; for a changed world,
/// it then forgets the changed addresses' host keys and sends SIGHUP to the master's
/// supervisor: the process its pid file names, checked against its command line, so a reused
/// pid is never hit.
fn write_world_script(cluster: &str, change: &Change<'_>) -> String {
    let dir = master_dir(cluster);
    let mut script = format!(
        "umask 077 && cat > {dir}/config/{WORLD_FILE}.part && mv -f {dir}/config/{WORLD_FILE}.part {dir}/config/{WORLD_FILE}"
    );
    if let Change::Of {
        addresses,
        ssh_port,
    } = change
    {
        let _ = write!(script, " && {{ ");
        for a in *addresses {
            for host in [a.clone(), format!("[{a}]:{ssh_port}")] {
                let _ = write!(
                    script,
                    "ssh-keygen -R {} -f {dir}/known_hosts >/dev/null 2>&1; ",
                    shell_quote(&host)
                );
            }
        }
        let _ = write!(
            script,
            "pid=$(cat {dir}/engine.pid 2>/dev/null); \
             if [ -n \"$pid\" ] && tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -qF \"engine --config {HOME_IN_SHELL}/node/{cluster}/master/config/engine.json\"; then kill -HUP \"$pid\"; fi; true; }}"
        );
    }
    script
}

/// Takes node `node`'s ranks out of the world on the master (`remove-node`), which starts
/// again without them. `Ok(false)`: the cluster is not an MPI cluster.
pub async fn leave_world(
    master: &NodeTarget,
    transport: &Transport,
    cluster: &str,
    node: &str,
) -> Result<bool, String> {
    let remote = Remote::open(master, transport).await?;
    let left = async {
        let Some(mut world) = read_world(&remote, cluster).await? else {
            return Ok(false);
        };
        let gone = remove_node(&mut world, node);
        if !gone.is_empty() {
            let change = Change::Of {
                addresses: &gone,
                ssh_port: master.port,
            };
            write_world(&remote, cluster, &world, change).await?;
        }
        Ok(true)
    }
    .await;
    remote.close().await;
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, engines: u32) -> WorldNode {
        WorldNode {
            name: name.into(),
            private: ip.into(),
            dir: format!("/home/u/.starling/node/sci/{name}"),
            workdir: "/home/u".into(),
            engines,
        }
    }

    #[test]
    fn nodes_that_join_get_the_next_ranks_and_a_removed_nodes_ranks_leave() {
        let mut w = world(
            "python3",
            Some((22, "ubuntu")),
            &BTreeMap::new(),
            &[
                node("master", "127.0.1.4", 2),
                node("node001", "127.0.1.5", 1),
            ],
        );
        w.ranks
            .extend(ranks("python3", &[node("node002", "127.0.1.6", 2)]));
        assert_eq!(
            w.hostfile_text(),
            "127.0.1.4 slots=2\n127.0.1.5 slots=1\n127.0.1.6 slots=2\n"
        );
        assert_eq!(
            w.ranks[3].socket.display().to_string(),
            "/home/u/.starling/node/sci/node002/run/kernel-0.sock"
        );
        assert_eq!(remove_node(&mut w, "node001"), ["127.0.1.5"]);
        assert!(remove_node(&mut w, "node009").is_empty());
        // node002's engines are now ranks 2 and 3.
        assert_eq!(w.hostfile_text(), "127.0.1.4 slots=2\n127.0.1.6 slots=2\n");
        assert!(w.ranks[2].node_root.ends_with("node002"));
    }

    #[test]
    fn the_world_numbers_ranks_by_node_then_slot_and_reaches_nodes_with_the_cluster_key() {
        let w = world(
            "python3",
            Some((22, "ubuntu")),
            &BTreeMap::from([("btl".into(), "self,tcp".into())]),
            &[
                node("master", "127.0.1.4", 2),
                node("node001", "127.0.1.5", 1),
            ],
        );
        assert_eq!(w.hostfile_text(), "127.0.1.4 slots=2\n127.0.1.5 slots=1\n");
        let sockets: Vec<String> = w
            .ranks
            .iter()
            .map(|r| r.socket.display().to_string())
            .collect();
        assert_eq!(
            sockets,
            [
                "/home/u/.starling/node/sci/master/run/kernel-0.sock",
                "/home/u/.starling/node/sci/master/run/kernel-1.sock",
                "/home/u/.starling/node/sci/node001/run/kernel-0.sock"
            ]
        );
        let agent = w.rsh_agent.unwrap();
        assert!(agent.contains("-i /home/u/.starling/node/sci/master/config/mpi_key"));
        assert!(agent.contains("-l ubuntu") && agent.contains("-p 22"));
    }

    #[test]
    fn a_changed_world_is_written_and_the_changed_addresses_host_keys_forgotten() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(super::super::node_dir("sci", "master"));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let key = home.path().join("hostkey");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(made.success());
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let public = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let known = |hosts: &[&str]| -> String {
            hosts.iter().fold(String::new(), |mut text, h| {
                let _ = writeln!(text, "{h} {public}");
                text
            })
        };
        std::fs::write(
            dir.join("known_hosts"),
            known(&["127.0.1.4", "127.0.1.5", "[127.0.1.5]:2222"]),
        )
        .unwrap();
        let change = Change::Of {
            addresses: &["127.0.1.5".to_string()],
            ssh_port: 2222,
        };
        let mut child = std::process::Command::new("bash")
            .args(["-c", &write_world_script("sci", &change)])
            .env("HOME", home.path())
            .env_remove("STARLING_HOME")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"{\"world\": 1}").unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(dir.join("config").join(WORLD_FILE)).unwrap(),
            "{\"world\": 1}"
        );
        let left = std::fs::read_to_string(dir.join("known_hosts")).unwrap();
        assert!(left.starts_with("127.0.1.4 ssh-ed25519 "), "{left}");
        assert!(!left.contains("127.0.1.5"), "{left}");
    }

    #[test]
    fn keys_are_authorized_on_their_own_line_and_removed_by_exact_name() {
        let home = tempfile::tempdir().unwrap();
        let keys = home.path().join(".ssh/authorized_keys");
        let sh = |script: String| {
            let out = std::process::Command::new("bash")
                .args(["-c", &script])
                .env("HOME", home.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::create_dir_all(keys.parent().unwrap()).unwrap();
        // The user's own key, without a final newline.
        std::fs::write(&keys, "ssh-ed25519 AAAmine me@laptop").unwrap();
        sh(authorize_script(
            "mpi-2",
            "ssh-ed25519 AAAtwo starling-mpi:mpi-2",
        ));
        sh(authorize_script(
            "mpi",
            "ssh-ed25519 AAAold starling-mpi:mpi",
        ));
        sh(authorize_script(
            "mpi",
            "ssh-ed25519 AAAnew starling-mpi:mpi",
        ));
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAmine me@laptop\nssh-ed25519 AAAtwo starling-mpi:mpi-2\nssh-ed25519 AAAnew starling-mpi:mpi\n"
        );
        sh(unauthorize_script("mpi"));
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAmine me@laptop\nssh-ed25519 AAAtwo starling-mpi:mpi-2\n"
        );
    }

    #[test]
    fn a_missing_open_mpi_or_mpi4py_says_what_to_install() {
        let failed = |status| CommandError::Failed {
            status: Some(status),
            stdout: String::new(),
            stderr: String::new(),
        };
        assert!(check_error("python3", &failed(94)).contains("apt-get install -y openmpi-bin"));
        assert!(check_error("python3", &failed(93)).contains("pip install mpi4py"));
        assert_eq!(check_error("python3", &failed(1)), "exit status 1");
    }
}
