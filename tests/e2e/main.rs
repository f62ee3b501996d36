//! The end-to-end suite: `starling` against LocalStack's EC2 API and a real OpenSSH server,
//! inside a private network namespace (tests/e2e/run.sh builds the rig and runs this there).
//! Every instance's address is a loopback address served by that sshd, so clusters are real:
//! starlingd is uploaded over SSH, the controller and engines run, python3 kernels compute.
//! Without the rig these tests fail, loudly: they are not skipped.

use std::io::BufRead as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use starling::provider::ec2::{Ec2, Resources};

const STARLING: &str = env!("CARGO_BIN_EXE_starling");
const ENDPOINT: &str = "http://127.0.0.1:4566";
const REGION: &str = "us-east-1";
const TEMPLATE: &str = include_str!("../../templates/localstack.yaml");
/// The longest any one command may take on the rig before the test calls it hung.
const COMMAND_LIMIT: Duration = Duration::from_secs(240);

/// The rig's directory; panics with what to do when the suite runs without its rig.
fn rig() -> PathBuf {
    match std::env::var_os("STARLING_RIG") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "the end-to-end rig is missing (no STARLING_RIG): run `tests/e2e/run.sh`, which starts LocalStack and sshd in a network namespace and runs this suite there"
        ),
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn fails(self) -> Self {
        assert_ne!(
            self.code, 0,
            "expected failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// A user of the rig: a home with the rig's SSH key as `~/.ssh/id_ed25519` and a private
/// STARLING_HOME. On drop, takes its cluster down (printing the nodes' logs first if the test
/// failed) so that a failing test leaves nothing behind either.
struct User {
    home: tempfile::TempDir,
    cluster: String,
}

impl User {
    fn new(cluster: &str) -> Self {
        let rig = rig();
        let home = tempfile::Builder::new()
            .prefix("starling-e2e-")
            .tempdir()
            .expect("a temp dir");
        let ssh = home.path().join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        for (from, to) in [("userkey", "id_ed25519"), ("userkey.pub", "id_ed25519.pub")] {
            std::fs::copy(rig.join(from), ssh.join(to)).unwrap();
        }
        std::fs::set_permissions(
            ssh.join("id_ed25519"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Self {
            home,
            cluster: cluster.to_string(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(STARLING);
        cmd.args(args)
            .env("HOME", self.home.path())
            .env("STARLING_HOME", self.home.path().join(".starling"))
            .env_remove("STARLING_CLUSTER")
            .current_dir(self.home.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `starling ARGS`; a run that hangs is killed after [`COMMAND_LIMIT`] and fails the
    /// test with what it printed.
    fn run(&self, args: &[&str]) -> Run {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starling runs");
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
        let Some(status) = status else {
            panic!(
                "`starling {}` did not finish within {COMMAND_LIMIT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                args.join(" ")
            );
        };
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }

    /// Writes a spec: the LocalStack template with `changes` (YAML lines replacing the keys
    /// they name at the top level, or appended).
    fn spec(&self, file: &str, changes: &str) -> PathBuf {
        let mut text = String::new();
        let replaced: Vec<&str> = changes
            .lines()
            .filter(|l| !l.starts_with(' ') && l.contains(':'))
            .map(|l| l.split(':').next().unwrap())
            .collect();
        let mut skipping = false;
        for line in TEMPLATE.lines() {
            let key = line.split(':').next().unwrap_or("");
            if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
                skipping = replaced.contains(&key);
            }
            if !skipping {
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str(changes);
        let path = self.home.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    /// `starling connect NAME` as a teammate does: from the tags, with their own key.
    fn connect(&self, name: &str) -> Run {
        let key = self.path(".ssh/id_ed25519");
        self.run(&[
            "connect",
            name,
            "--region",
            REGION,
            "--endpoint-url",
            ENDPOINT,
            "-i",
            key.to_str().unwrap(),
        ])
        .ok()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_node_logs(&self.cluster);
        }
        let _ = self.run(&["down", &self.cluster]);
    }
}

/// Where the rig's nodes keep a cluster's files (every "instance" is this machine).
fn node_root(cluster: &str) -> PathBuf {
    PathBuf::from(std::env::var("STARLING_RIG_NODE_HOME").unwrap_or_else(|_| "/root".into()))
        .join(".starling/node")
        .join(cluster)
}

fn print_node_logs(cluster: &str) {
    let Ok(nodes) = std::fs::read_dir(node_root(cluster)) else {
        return;
    };
    for node in nodes.flatten() {
        let Ok(logs) = std::fs::read_dir(node.path().join("logs")) else {
            continue;
        };
        for log in logs.flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- {} (last 30 lines) ----", log.path().display());
            eprintln!("{}", lines[lines.len().saturating_sub(30)..].join("\n"));
        }
    }
}

/// Processes on this machine that belong to a node of `cluster`.
fn cluster_processes(cluster: &str) -> Vec<u32> {
    let mark = format!(
        "{}={}/",
        starling::node::MARK_VAR,
        node_root(cluster).display()
    );
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|kv| kv.starts_with(mark.as_bytes()))
            })
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .collect()
}

fn ec2_resources(cluster: &str) -> Resources {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let api = Ec2::connect(REGION, Some(ENDPOINT)).await;
        api.resources(cluster).await.expect("LocalStack answers")
    })
}

/// Polls `check` until it holds or `within` passes.
#[track_caller]
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `down` must leave: nothing in EC2, no process, no node files.
#[track_caller]
fn assert_nothing_left(cluster: &str) {
    let left = ec2_resources(cluster);
    assert!(left.is_empty(), "EC2 still has: {}", left.describe());
    eventually(
        Duration::from_secs(10),
        "no starlingd process of the cluster",
        || cluster_processes(cluster).is_empty(),
    );
    assert!(
        !node_root(cluster).exists(),
        "{} is still there",
        node_root(cluster).display()
    );
}

/// `up -f SPEC` fails; what it said.
#[track_caller]
fn up_fails(user: &User, spec: &std::path::Path) -> String {
    user.run(&["up", "-f", spec.to_str().unwrap()])
        .fails()
        .stderr
}

/// `text` says every one of `wants`.
#[track_caller]
fn assert_says(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "'{want}' in:\n{text}");
    }
}

/// `down` works, and leaves nothing of the cluster.
#[track_caller]
fn down_leaves_nothing(user: &User, cluster: &str) {
    user.run(&["down", cluster]).ok();
    assert_nothing_left(cluster);
}

/// The engines `status` lists (it prints the nodes document, then the engines document).
fn status_engines(user: &User, cluster: &str) -> Vec<Json> {
    let status = user
        .run(&["status", cluster, "--output", "json"])
        .ok()
        .stdout;
    let mut docs = serde_json::Deserializer::from_str(&status).into_iter::<Json>();
    let _nodes = docs.next().expect("a nodes document").unwrap();
    let engines = docs.next().expect("an engines document").unwrap();
    engines["engines"].as_array().unwrap().clone()
}

/// Each engine of an MPI cluster, in id order: (id, rank, world size, the sum of the ranks by
/// `allreduce`, its node's address), from `px` (importing afresh: a world that started again
/// has new kernels).
fn world_of(user: &User, cluster: &str) -> Vec<(u64, u64, u64, u64, String)> {
    let px = user
        .run(&[
            "px",
            "--cluster",
            cluster,
            "--output",
            "json",
            "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n\
             (c.rank, c.size, c.allreduce(c.rank), os.environ['SSH_CONNECTION'].split()[2])",
        ])
        .ok()
        .json();
    let mut out: Vec<_> = px
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v = r["display"].as_str().unwrap();
            let nums: Vec<u64> = v
                .trim_start_matches('(')
                .split(", ")
                .take(3)
                .map(|n| n.parse().unwrap())
                .collect();
            let host = v.split('\'').nth(1).unwrap().to_string();
            (
                r["engine"].as_u64().unwrap(),
                nums[0],
                nums[1],
                nums[2],
                host,
            )
        })
        .collect();
    out.sort();
    out
}

/// Each engine's node address (from `status`), by engine id.
fn engine_hosts(user: &User, cluster: &str) -> Vec<(u64, String, String)> {
    status_engines(user, cluster)
        .iter()
        .filter(|e| e["state"] != "lost")
        .map(|e| {
            (
                e["id"].as_u64().unwrap(),
                e["node"].as_str().unwrap().to_string(),
                e["host"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn ec2_cluster_from_the_localstack_template_end_to_end() {
    let name = "e2e-main";
    let user = User::new(name);
    let teammate = User::new(name);

    // up: a master and 2 nodes, 2 engines each, from templates/localstack.yaml as it is.
    let up = user
        .run(&[
            "up",
            "-f",
            &format!("{}/templates/localstack.yaml", env!("CARGO_MANIFEST_DIR")),
            "--name",
            name,
            "--output",
            "json",
        ])
        .ok();
    let launched = up.json();
    assert_eq!(launched["cluster"], name);
    assert_eq!(
        launched["engines"].as_array().unwrap().len(),
        6,
        "{}",
        up.stderr
    );
    assert_eq!(launched["nodes"].as_array().unwrap().len(), 3);
    // starlingd left this machine once, compressed: the master handed it to the other nodes,
    // and this machine sent each of them only a few KB (their config).
    let daemon = std::fs::metadata(std::env::var("STARLINGD").unwrap())
        .unwrap()
        .len();
    let sent: Vec<(&str, bool, u64)> = launched["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap(),
                n["fetched"].as_bool().unwrap(),
                n["sent_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        sent[0] == ("master", false, sent[0].2) && sent[0].2 > daemon / 10 && sent[0].2 < daemon,
        "{sent:?} for a starlingd of {daemon} bytes"
    );
    for (node, fetched, bytes) in &sent[1..] {
        assert!(*fetched && *bytes < 64 << 10, "{node}: {sent:?}");
    }
    let conn: Json = serde_json::from_str(
        &std::fs::read_to_string(user.path(&format!(".starling/clusters/{name}/connection.json")))
            .unwrap(),
    )
    .unwrap();
    let controller = conn["controller"].as_str().unwrap().to_string();
    assert!(
        controller.starts_with("127.0.0."),
        "the master's own address: {controller}"
    );

    // Every resource is tagged with the cluster.
    let res = ec2_resources(name);
    assert_eq!(res.instances.len(), 3);
    assert_eq!(res.security_groups.len(), 1);
    assert_eq!(res.key_pairs, vec![format!("starling-{name}")]);
    let mut nodes: Vec<&str> = res.instances.iter().map(|i| i.node.as_str()).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["master", "node001", "node002"]);

    // list shows it, from the tags.
    let list = user.run(&["list", "--output", "json"]).ok().json();
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list}"));
    assert_eq!(mine["provider"], "ec2");
    assert_eq!(mine["state"], "running");
    assert_eq!(mine["nodes"], 3);
    assert_eq!(mine["types"], "t3.small");
    assert_eq!(mine["engines"], 6);

    // px on every engine: each runs on its own node, at that node's own address.
    let px = user
        .run(&[
            "px",
            "--cluster",
            name,
            "--output",
            "json",
            "import os; os.environ['SSH_CONNECTION'].split()[2]",
        ])
        .ok()
        .json();
    let hosts = engine_hosts(&user, name);
    assert_eq!(hosts.len(), 6);
    let by_engine: std::collections::HashMap<u64, String> = hosts
        .iter()
        .map(|(id, _, host)| (*id, host.clone()))
        .collect();
    for r in px.as_array().unwrap() {
        let id = r["engine"].as_u64().unwrap();
        assert_eq!(r["value"].as_str().unwrap(), by_engine[&id], "engine {id}");
    }
    let mut addrs: Vec<&String> = by_engine.values().collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "three nodes, three addresses: {addrs:?}");

    // A load-balanced map.
    let map = user
        .run(&[
            "map",
            "--cluster",
            name,
            "--output",
            "json",
            "lambda x: x * x",
            "--range",
            "200",
        ])
        .ok()
        .json();
    let squares: Vec<i64> = (0..200).map(|x| x * x).collect();
    assert_eq!(map, serde_json::json!(squares));

    // A teammate with the same account: sees it, fetches the connection file, uses it.
    let tl = teammate
        .run(&[
            "list",
            "--region",
            REGION,
            "--endpoint-url",
            ENDPOINT,
            "--output",
            "json",
        ])
        .ok()
        .json();
    assert!(
        tl.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == name && c["nodes"] == 3),
        "{tl}"
    );
    teammate.connect(name);
    let ids = teammate.run(&["ids", "--cluster", name]).ok();
    assert_eq!(ids.stdout.trim(), "[0, 1, 2, 3, 4, 5]");

    // add-node: a new node whose engines take work.
    let added = user
        .run(&["add-node", name, "-n", "1", "--output", "json"])
        .ok()
        .json();
    assert_eq!(added["nodes"][0]["node"], "node003");
    assert_eq!(added["engines"].as_array().unwrap().len(), 8);
    // The new node got starlingd from the master: this machine sent it config only.
    assert_eq!(added["nodes"][0]["fetched"], true, "{added}");
    let sent = added["nodes"][0]["sent_bytes"].as_u64().unwrap();
    assert!(sent < 64 << 10, "{sent} bytes sent to the new node");
    let hosts = engine_hosts(&user, name);
    let new: Vec<u64> = hosts
        .iter()
        .filter(|h| h.1 == "node003")
        .map(|h| h.0)
        .collect();
    assert_eq!(new.len(), 2);
    user.run(&[
        "map",
        "--cluster",
        name,
        "f",
        "--def",
        "import time\ndef f(x):\n    time.sleep(0.02)\n    return x",
        "--range",
        "200",
        "--chunksize",
        "1",
    ])
    .ok();
    let status = user.run(&["status", name, "--output", "json"]).ok().stdout;
    let mut docs = serde_json::Deserializer::from_str(&status).into_iter::<Json>();
    let nodes_doc = docs.next().unwrap().unwrap();
    assert_eq!(nodes_doc["nodes"].as_array().unwrap().len(), 4);
    let engines_doc = docs.next().unwrap().unwrap();
    for e in engines_doc["engines"].as_array().unwrap() {
        if new.contains(&e["id"].as_u64().unwrap()) {
            assert!(
                e["tasks_done"].as_u64().unwrap() > 0,
                "the new engine took work: {e}"
            );
        }
    }

    // remove-node: its engines go, the rest keep working.
    user.run(&["remove-node", name, "node003"]).ok();
    eventually(
        Duration::from_secs(20),
        "6 engines after remove-node",
        || engine_hosts(&user, name).len() == 6,
    );
    assert_eq!(ec2_resources(name).instances.len(), 3);
    user.run(&["px", "--cluster", name, "1 + 1"]).ok();

    // exec on every node, output prefixed by node.
    let exec = user
        .run(&["exec", name, "echo $SSH_CONNECTION | cut -d' ' -f3"])
        .ok();
    let lines: Vec<&str> = exec.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", exec.stdout);
    for node in ["master", "node001", "node002"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{node}: 127.0.0."))),
            "{node} in {lines:?}"
        );
    }

    // put and get.
    let src = user.path("data.txt");
    std::fs::write(&src, "measurements\n1 2 3\n").unwrap();
    user.run(&[
        "put",
        name,
        src.to_str().unwrap(),
        "e2e-main-input/data.txt",
    ])
    .ok();
    let exec = user
        .run(&["exec", name, "cat e2e-main-input/data.txt | wc -l"])
        .ok();
    assert_eq!(
        exec.stdout.lines().filter(|l| l.ends_with(": 2")).count(),
        3,
        "{}",
        exec.stdout
    );
    let back = user.path("back.txt");
    user.run(&[
        "get",
        name,
        "e2e-main-input/data.txt",
        back.to_str().unwrap(),
        "--node",
        "node002",
    ])
    .ok();
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "measurements\n1 2 3\n"
    );
    user.run(&["exec", name, "rm -rf e2e-main-input"]).ok();

    // ssh to a node runs the command there.
    let ssh = user
        .run(&["ssh", name, "node001", "--", "echo", "$SSH_CONNECTION"])
        .ok();
    let node001 = &res
        .instances
        .iter()
        .find(|i| i.node == "node001")
        .unwrap()
        .private_ip;
    assert!(
        ssh.stdout.contains(node001.as_deref().unwrap()),
        "{}",
        ssh.stdout
    );

    // down: nothing of the cluster is left, anywhere.
    let down = user.run(&["down", name]).ok();
    assert!(
        down.stdout.contains("nothing of it remains"),
        "{}",
        down.stdout
    );
    assert_nothing_left(name);
    // And again: idempotent.
    let again = user.run(&["down", name]).ok();
    assert!(again.stdout.contains("nothing"), "{}", again.stdout);
}

/// The network block of a spec whose instances live in subnet 127.0.N.0/24.
fn network(n: u8) -> String {
    format!(
        "network:\n  vpc_id: vpc-00000000057a41196\n  subnet_id: subnet-000000000057a41{n:02x}\n  use_private_ip: true\n  ssh_cidrs: [127.0.0.0/8]\n  client_cidrs: [127.0.0.0/8]\n"
    )
}

#[test]
fn broken_specs_are_refused_before_anything_is_created() {
    let user = User::new("broken");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/specs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus of broken specs");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let up = user.run(&["up", "-f", file.to_str().unwrap()]).fails();
        assert!(
            up.stderr.contains(expect),
            "{}: expected '{expect}' in:\n{}",
            file.display(),
            up.stderr
        );
    }
    // Nothing was created: no record, no cluster in EC2.
    assert!(
        !user.path(".starling/clusters").exists()
            || std::fs::read_dir(user.path(".starling/clusters"))
                .unwrap()
                .next()
                .is_none()
    );
    assert!(ec2_resources("broken").is_empty());
}

#[test]
fn an_ami_that_does_not_exist_is_named_and_nothing_is_created() {
    let name = "e2e-bad-ami";
    let user = User::new(name);
    let spec = user.spec(
        "bad-ami.yaml",
        &format!(
            "name: {name}\nimage:\n  id: ami-0123456789abcdef0\n{}",
            network(1)
        ),
    );
    assert_says(
        &up_fails(&user, &spec),
        &["the AMI ami-0123456789abcdef0 does not exist in us-east-1"],
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn nodes_whose_ssh_never_answers_fail_up_clearly_and_down_removes_everything() {
    // The wrong port.
    let name = "e2e-bad-port";
    let user = User::new(name);
    let spec = user.spec(
        "bad-port.yaml",
        &format!(
            "name: {name}\nnodes: 1\nssh:\n  user: root\n  key_file: ~/.ssh/id_ed25519\n  port: 2222\n  timeout_s: 3\n{}",
            network(2)
        ),
    );
    assert_says(
        &up_fails(&user, &spec),
        &[
            "bootstrap failed on 2 node(s)",
            "logging in: cannot log in as root on port 2222",
            "what exists of cluster 'e2e-bad-port' now: 2 instance(s)",
            "`starling down e2e-bad-port` removes it",
        ],
    );
    assert_eq!(ec2_resources(name).instances.len(), 2);
    down_leaves_nothing(&user, name);

    // The wrong key: one sshd accepts, but not this key.
    let name = "e2e-bad-key";
    let user = User::new(name);
    let other = user.path(".ssh/other");
    let keygen = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            other.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(keygen.success());
    let spec = user.spec(
        "bad-key.yaml",
        &format!(
            "name: {name}\nnodes: 0\nssh:\n  user: root\n  key_file: {}\n  timeout_s: 3\n{}",
            other.display(),
            network(6)
        ),
    );
    assert_says(
        &up_fails(&user, &spec),
        &[
            "Permission denied",
            "`starling down e2e-bad-key` removes it",
        ],
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn a_setup_command_that_fails_on_one_node_names_it() {
    let name = "e2e-setup";
    let user = User::new(name);
    let spec = user.spec(
        "setup.yaml",
        &format!(
            "name: {name}\nnodes: 2\nsetup:\n  - echo preparing $STARLING_NODE\n  - '[ \"$STARLING_NODE\" != node002 ] || {{ echo \"no GPU on this node\" >&2; exit 3; }}'\n{}",
            network(3)
        ),
    );
    let said = up_fails(&user, &spec);
    assert_says(
        &said,
        &[
            "bootstrap failed on 1 node(s)",
            "node002 (127.0.3.",
            "setup command 2 of 2",
            "exit status 3",
            "no GPU on this node",
            "`starling down e2e-setup` removes it",
        ],
    );
    assert!(
        !said.contains("node001 (127"),
        "only node002 failed:\n{said}"
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn ctrl_c_during_up_says_what_exists_and_down_removes_it() {
    let name = "e2e-ctrl-c";
    let user = User::new(name);
    let spec = user.spec(
        "slow.yaml",
        &format!(
            "name: {name}\nnodes: 1\nsetup:\n  - sleep 30\n{}",
            network(4)
        ),
    );
    let mut child = user
        .command(&["up", "-f", spec.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Interrupt while the nodes run their (slow) setup.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("up never started bootstrapping: {seen:?}"));
        let go = line.contains("bootstrapping");
        seen.push(line);
        if go {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    let text = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains("interrupted: what exists of cluster 'e2e-ctrl-c' now: 2 instance(s)"),
        "{text}"
    );
    assert!(text.contains("security group sg-"), "{text}");
    assert!(text.contains("key pair starling-e2e-ctrl-c"), "{text}");
    assert!(
        text.contains("`starling down e2e-ctrl-c` removes it"),
        "{text}"
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn stop_and_start_bring_the_same_cluster_back() {
    let name = "e2e-stop";
    let user = User::new(name);
    let spec = user.spec(
        "stop.yaml",
        &format!("name: {name}\nnodes: 1\n{}", network(5)),
    );
    user.run(&["up", "-f", spec.to_str().unwrap()]).ok();
    user.run(&["px", "--cluster", name, "x = 41"]).ok();
    user.run(&["stop", name]).ok();
    let list = user.run(&["list", "--output", "json"]).ok().json();
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone();
    assert_eq!(me["state"], "stopped", "{list}");
    eventually(
        Duration::from_secs(10),
        "no starlingd while stopped",
        || cluster_processes(name).is_empty(),
    );
    user.run(&["start", name]).ok();
    let ids = user.run(&["ids", "--cluster", name]).ok();
    assert_eq!(ids.stdout.trim(), "[0, 1, 2, 3]");
    // The controller took up its task store again: the job from before is in its history.
    let history = user
        .run(&["history", "--cluster", name, "--output", "json"])
        .ok()
        .json();
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job"] == 0 && j["status"] == "ok"),
        "{history}"
    );
    // Again: each time the cluster comes back whole and runs work at once.
    for round in 0..2 {
        user.run(&["stop", name]).ok();
        user.run(&["start", name]).ok();
        let px = user
            .run(&["px", "--cluster", name, "--output", "json", "6 * 7"])
            .ok()
            .json();
        assert_eq!(px.as_array().unwrap().len(), 4, "round {round}: {px}");
        assert!(
            px.as_array().unwrap().iter().all(|r| r["value"] == 42),
            "{px}"
        );
    }
    // Fresh kernels: the old namespace is gone, the cluster works.
    let px = user
        .run(&[
            "px",
            "--cluster",
            name,
            "--output",
            "json",
            "'x' in globals()",
        ])
        .ok()
        .json();
    assert!(
        px.as_array().unwrap().iter().all(|r| r["value"] == false),
        "{px}"
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn a_node_terminated_mid_map_loses_no_item_and_down_still_leaves_nothing() {
    let name = "e2e-spot";
    let user = User::new(name);
    let spec = user.spec(
        "spot.yaml",
        &format!("name: {name}\nnodes: 2\n{}", network(8)),
    );
    user.run(&["up", "-f", spec.to_str().unwrap()]).ok();
    assert_eq!(engine_hosts(&user, name).len(), 6);
    let submitted = user
        .run(&[
            "map",
            "--cluster",
            name,
            "f",
            "--def",
            "import time\ndef f(x):\n    time.sleep(0.02)\n    return x * x",
            "--range",
            "600",
            "--chunksize",
            "1",
            "--noblock",
            "--output",
            "json",
        ])
        .ok()
        .json();
    let job = submitted["job"].as_u64().unwrap().to_string();
    // Under way on every node, then node002 goes: its instance terminated, its processes
    // killed (on the rig every instance is this machine).
    eventually(
        Duration::from_secs(60),
        "node002's engines took work",
        || {
            status_engines(&user, name)
                .iter()
                .any(|e| e["node"] == "node002" && e["tasks_done"].as_u64() > Some(5))
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let api = Ec2::connect(REGION, Some(ENDPOINT)).await;
        let victim: Vec<String> = api
            .instances(Some(name))
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.node == "node002")
            .map(|i| i.id)
            .collect();
        assert_eq!(victim.len(), 1);
        api.terminate(&victim, Duration::from_secs(60))
            .await
            .unwrap();
    });
    let node002 = format!(
        "{}={}",
        starling::node::MARK_VAR,
        node_root(name).join("node002").display()
    );
    for pid in cluster_processes(name) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|kv| kv == node002.as_bytes()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // A terminated instance's disk goes with it; on the rig its files are this machine's.
    std::fs::remove_dir_all(node_root(name).join("node002")).unwrap();
    let result = user
        .run(&["result", "--cluster", name, &job, "--output", "json"])
        .ok()
        .json();
    let squares: Vec<i64> = (0..600).map(|x| x * x).collect();
    assert_eq!(
        result,
        serde_json::json!(squares),
        "no item lost, none twice"
    );
    let hosts = engine_hosts(&user, name);
    assert_eq!(hosts.len(), 4, "node002's engines are gone: {hosts:?}");
    let history = user
        .run(&["history", "--cluster", name, "--output", "json"])
        .ok()
        .json();
    assert_eq!(history[0]["status"], "ok", "{history}");
    down_leaves_nothing(&user, name);
}

#[test]
fn the_ssh_provider_bootstraps_listed_hosts() {
    let name = "e2e-ssh";
    let user = User::new(name);
    // The hosts' Python is a bare venv: no cloudpickle. The CLI works; `up` says what Python
    // clients will miss.
    let bare = user.path("bare");
    let made = Command::new("python3")
        .args(["-m", "venv", "--without-pip", bare.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    let spec = user.path("hosts.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: {name}\nprovider: ssh\nengines_per_node: 1\npython: {}/bin/python\nssh:\n  user: root\n  key_file: ~/.ssh/id_ed25519\nhosts:\n  - host: 127.0.100.2\n  - host: 127.0.100.3\n",
            bare.display()
        ),
    )
    .unwrap();
    // The master already has this very starlingd (as after an earlier `up`): its upload is
    // skipped, by checksum; node001 gets it uploaded.
    let bin = node_root(name).join("master/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(std::env::var("STARLINGD").unwrap(), bin.join("starlingd")).unwrap();
    let up = user
        .run(&["up", "-f", spec.to_str().unwrap(), "--output", "json"])
        .ok()
        .json();
    assert_eq!(up["engines"], serde_json::json!([0, 1]));
    let uploaded: Vec<(&str, bool)> = up["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap(),
                n["uploaded"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(uploaded, [("master", false), ("node001", true)]);
    assert!(
        up["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["cloudpickle"] == false),
        "{up}"
    );
    assert_says(
        &up["notes"].to_string(),
        &[
            "the engines' Python on master, node001 lacks cloudpickle",
            "pip install cloudpickle",
        ],
    );
    let px = user
        .run(&[
            "px",
            "--cluster",
            name,
            "--output",
            "json",
            "import os; os.environ['SSH_CONNECTION'].split()[2]",
        ])
        .ok()
        .json();
    let mut addrs: Vec<&str> = px
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    addrs.sort_unstable();
    assert_eq!(addrs, ["127.0.100.2", "127.0.100.3"]);
    let map = user
        .run(&[
            "map",
            "--cluster",
            name,
            "--output",
            "json",
            "lambda x: x + 1",
            "--range",
            "10",
        ])
        .ok()
        .json();
    assert_eq!(map, serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]));

    // The controller killed mid-map and restarted over SSH: the map completes with every item,
    // the engines (and their namespaces) are the same ones.
    user.run(&["px", "--cluster", name, "y = 7"]).ok();
    let job = user
        .run(&[
            "map",
            "--cluster",
            name,
            "--output",
            "json",
            "--noblock",
            "--chunksize",
            "1",
            "lambda x: __import__('time').sleep(0.01) or x * 3",
            "--range",
            "300",
        ])
        .ok()
        .json()["job"]
        .as_u64()
        .unwrap();
    eventually(Duration::from_secs(30), "the map gets going", || {
        status_engines(&user, name)
            .iter()
            .filter_map(|e| e["tasks_done"].as_u64())
            .sum::<u64>()
            >= 80
    });
    let pid_file = node_root(name).join("master/controller.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = user.run(&["restart", name]).ok().stdout.clone();
    assert_says(&restarted, &["restarted (pid ", "2 engines [0, 1] back in"]);
    let out = user
        .run(&[
            "result",
            "--cluster",
            name,
            "--output",
            "json",
            &job.to_string(),
        ])
        .ok()
        .json();
    assert_eq!(
        out,
        serde_json::json!((0..300).map(|x| x * 3).collect::<Vec<u64>>())
    );
    let y = user
        .run(&["px", "--cluster", name, "--output", "json", "y"])
        .ok()
        .json();
    assert!(y.as_array().unwrap().iter().all(|r| r["value"] == 7), "{y}");

    let exec = user
        .run(&["exec", name, "echo $SSH_CONNECTION | cut -d' ' -f3"])
        .ok();
    assert_eq!(exec.stdout, "master: 127.0.100.2\nnode001: 127.0.100.3\n");
    let list = user.run(&["list", "--output", "json"]).ok().json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == name && c["provider"] == "ssh" && c["engines"] == 2),
        "{list}"
    );
    user.run(&["down", name]).ok();
    eventually(
        Duration::from_secs(10),
        "no starlingd left on the hosts",
        || cluster_processes(name).is_empty(),
    );
    assert!(!node_root(name).exists());
}

#[test]
fn the_python_client_maps_over_an_ec2_cluster_with_a_teammates_connection_file() {
    // The Python package, built into a venv by scripts/python.sh before the rig starts; its
    // interpreter is also the engines' (same Python, same cloudpickle as the client).
    let python = std::env::var("STARLING_E2E_PYTHON").expect(
        "STARLING_E2E_PYTHON must name the Python with the starling package (tests/e2e/run.sh sets it after scripts/python.sh build)",
    );
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} does not exist: run scripts/python.sh build first"
    );
    let name = "e2e-python";
    let user = User::new(name);
    let teammate = User::new(name);
    let spec = user.spec(
        "python.yaml",
        &format!(
            "name: {name}\nnodes: 2\nengines_per_node: 1\npython: {python}\n{}",
            network(7)
        ),
    );
    let up = user
        .run(&["up", "-f", spec.to_str().unwrap(), "--output", "json"])
        .ok()
        .json();
    assert!(
        up["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["cloudpickle"] == true),
        "the venv has cloudpickle: {up}"
    );
    assert_eq!(up["notes"], serde_json::json!([]));
    teammate.connect(name);
    let code = format!(
        "import os\nfrom starling import Client\n\
         rc = Client(cluster={name:?})\n\
         def f(x):\n    return (x * x, os.environ['STARLING_ENGINE_ID'])\n\
         out = rc.load_balanced_view().map_sync(f, range(300), chunksize=7)\n\
         assert [v for v, _ in out] == [x * x for x in range(300)], out[:5]\n\
         print('engines', sorted(set(e for _, e in out)))\n\
         print('hosts', sorted(rc[:].apply_sync(lambda: os.environ['SSH_CONNECTION'].split()[2])))\n"
    );
    let out = Command::new(&python)
        .args(["-c", &code])
        .env("HOME", teammate.path(""))
        .env("STARLING_HOME", teammate.path(".starling"))
        .env_remove("STARLING_CLUSTER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("engines ['0', '1', '2']"), "{stdout}");
    // The engines run on the three instances, each at its own loopback address.
    assert!(
        stdout.contains("hosts ['127.0.7.4', '127.0.7.5', '127.0.7.6']"),
        "{stdout}"
    );
    down_leaves_nothing(&user, name);
}

#[test]
fn an_mpi_cluster_on_ec2_is_one_world_across_its_nodes() {
    // The engines' Python: the venv scripts/python.sh builds, which has mpi4py.
    let python = std::env::var("STARLING_E2E_PYTHON").expect(
        "STARLING_E2E_PYTHON must name the Python with mpi4py (tests/e2e/run.sh sets it after scripts/python.sh build)",
    );
    let name = "e2e-mpi";
    let user = User::new(name);
    // Every "node" of the rig is this one machine: Open MPI must not share memory between
    // them, and reaches the others over loopback (the only interface there is).
    let spec = user.spec(
        "mpi.yaml",
        &format!(
            "name: {name}\nnodes: 2\nengines_per_node: 2\npython: {python}\nmpi: true\n\
             mpi_mca:\n  btl: self,tcp\n  btl_tcp_if_include: lo\n  oob_tcp_if_include: lo\n{}",
            network(8)
        ),
    );
    let up = user
        .run(&["up", "-f", spec.to_str().unwrap(), "--output", "json"])
        .ok();
    assert_eq!(
        up.json()["engines"],
        serde_json::json!([0, 1, 2, 3, 4, 5]),
        "{}",
        up.stderr
    );
    // The cluster's own key is authorized on the nodes (this machine's root, in the rig).
    let authorized = || {
        std::fs::read_to_string("/root/.ssh/authorized_keys")
            .unwrap_or_default()
            .contains(&format!("starling-mpi:{name}"))
    };
    assert!(authorized(), "the cluster's key is in authorized_keys");

    // Engine N is rank N of one world of 6 across the 3 nodes' addresses, and a collective
    // spans them (the sum of the ranks by `allreduce`).
    let world = world_of(&user, name);
    assert_eq!(
        world.iter().map(|w| w.0).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "{world:?}"
    );
    let hosts = engine_hosts(&user, name);
    for (id, rank, size, sum, host) in &world {
        assert_eq!((rank, size, sum), (id, &6, &15), "engine {id}: {world:?}");
        assert!(host.starts_with("127.0.8."), "engine {id}: {host}");
        // Each engine runs where `status` says its node is.
        assert_eq!(&hosts.iter().find(|(e, _, _)| e == id).unwrap().2, host);
    }
    let addrs: std::collections::BTreeSet<&String> = world.iter().map(|w| &w.4).collect();
    assert_eq!(addrs.len(), 3, "three nodes, three addresses: {addrs:?}");
    let status = status_engines(&user, name);
    assert!(
        status.iter().all(|e| e["rank"] == e["id"]),
        "every engine's rank is its id: {status:?}"
    );

    // A plain MPI program over the hostfile: 6 ranks on the 3 nodes.
    let hello = user.path("hello_mpi.py");
    std::fs::write(
        &hello,
        // Rank 0 prints what every rank says (lines printed at once may interleave).
        "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n\
         said = c.gather(f\"rank {c.rank} of {c.size} on {os.environ['SSH_CONNECTION'].split()[2]}\")\n\
         if c.rank == 0:\n    print('\\n'.join(said), flush=True)\n",
    )
    .unwrap();
    user.run(&["put", name, hello.to_str().unwrap(), "hello_mpi.py"])
        .ok();
    let run = user
        .run(&["mpirun", name, "--", &python, "hello_mpi.py"])
        .ok();
    let mut lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("rank"))
        .collect();
    lines.sort_unstable();
    assert_eq!(lines.len(), 6, "{}{}", run.stdout, run.stderr);
    for (rank, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!("rank {rank} of 6 on 127.0.8.")),
            "{line}"
        );
    }
    let hosts: std::collections::BTreeSet<&str> = lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(hosts.len(), 3, "{lines:?}");
    // The world grows with the cluster: the new node's engines are the next ranks, and the
    // world starts again with them before add-node returns.
    let added = user.run(&["add-node", name, "-n", "1"]).ok();
    assert_eq!(ec2_resources(name).instances.len(), 4, "{}", added.stderr);
    let world = world_of(&user, name);
    assert_eq!(
        world.iter().map(|w| w.0).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>(),
        "{world:?}"
    );
    for (id, rank, size, sum, _) in &world {
        assert_eq!((rank, size, sum), (id, &8, &28), "engine {id}: {world:?}");
    }
    let hostfile = "/root/.starling/node/e2e-mpi/master/hostfile";
    let lines = |text: String| text.lines().map(str::to_string).collect::<Vec<_>>();
    let hosts4 = lines(std::fs::read_to_string(hostfile).unwrap());
    assert_eq!(hosts4.len(), 4, "{hosts4:?}");
    assert!(hosts4.iter().all(|l| l.ends_with(" slots=2")), "{hosts4:?}");
    assert!(status_engines(&user, name)
        .iter()
        .all(|e| e["rank"] == e["id"]));

    // And shrinks: node001's ranks leave; the later engines keep their ids and take the ranks
    // after the master's.
    let gone = engine_hosts(&user, name)
        .into_iter()
        .find(|(_, node, _)| node == "node001")
        .unwrap()
        .2;
    user.run(&["remove-node", name, "node001"]).ok();
    assert_eq!(ec2_resources(name).instances.len(), 4 - 1);
    let world = world_of(&user, name);
    assert_eq!(
        world.iter().map(|w| w.0).collect::<Vec<_>>(),
        [0, 1, 4, 5, 6, 7],
        "{world:?}"
    );
    for (i, (id, rank, size, sum, host)) in world.iter().enumerate() {
        assert_eq!(
            (*rank, *size, *sum),
            (i as u64, 6, 15),
            "engine {id}: {world:?}"
        );
        assert_ne!(host, &gone, "engine {id} is on the removed node");
    }
    let hosts3 = lines(std::fs::read_to_string(hostfile).unwrap());
    assert_eq!(hosts3.len(), 3, "{hosts3:?}");
    assert!(!hosts3.iter().any(|l| l.starts_with(&format!("{gone} "))));
    let status = user.run(&["status", name]).ok().stdout;
    assert_says(
        &status,
        &["one world of 6 ranks (engine:rank 0:0 1:1 4:2 5:3 6:4 7:5)"],
    );
    // A program that fails: its exit status comes back.
    let failed = user.run(&[
        "mpirun",
        name,
        "-n",
        "2",
        "--",
        &python,
        "-c",
        "raise SystemExit(7)",
    ]);
    assert_eq!(failed.code, 7, "{}{}", failed.stdout, failed.stderr);

    down_leaves_nothing(&user, name);
    assert!(!authorized(), "down removes the cluster's key");
}
