//! The harness: a private STARLING_HOME per test, the real `starling` binary, and a guard that
//! takes the cluster down — and prints its logs if the test failed — whatever happens.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use starling::client::Client;

pub const STARLING: &str = env!("CARGO_BIN_EXE_starling");

/// The outcome of one CLI run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails(&self) -> &Self {
        assert_ne!(
            self.code, 0,
            "expected failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// A cluster under test: its own home, its own name; taken down on drop.
pub struct Cluster {
    pub home: tempfile::TempDir,
    pub name: String,
    workdir: tempfile::TempDir,
}

impl Cluster {
    /// A home with no cluster yet.
    pub fn new(name: &str) -> Self {
        Self {
            home: tempfile::Builder::new()
                .prefix("starling-test-")
                .tempdir()
                .expect("a temp dir"),
            name: name.to_string(),
            workdir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    /// `starling up --local -n N` and checks it worked.
    pub fn up(name: &str, engines: u32) -> Self {
        let c = Self::new(name);
        c.starling(&["up", "--local", "-n", &engines.to_string()])
            .ok();
        c
    }

    pub fn home_path(&self) -> &Path {
        self.home.path()
    }

    /// The directory starling runs in (and the cluster's kernels work in).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// Runs `starling ARGS --cluster NAME` with this cluster's home.
    pub fn starling(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--cluster", &self.name]);
        self.starling_raw(&all)
    }

    /// Runs `starling ARGS` exactly as given.
    pub fn starling_raw(&self, args: &[&str]) -> Run {
        let out: Output = Command::new(STARLING)
            .args(args)
            .env("STARLING_HOME", self.home.path())
            .env_remove("STARLING_CLUSTER")
            // This suite reaches loopback only: no EC2 region for `list` to look into.
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .current_dir(self.workdir.path())
            .output()
            .expect("starling runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn connection_file(&self) -> PathBuf {
        self.home
            .path()
            .join("clusters")
            .join(&self.name)
            .join("connection.json")
    }

    pub fn node_root(&self) -> PathBuf {
        self.home.path().join("node").join(&self.name)
    }

    /// The cluster's task store (under `history/`, where it outlives the cluster).
    pub fn task_store(&self) -> PathBuf {
        let dir = self.home.path().join("history").join(&self.name);
        let mut stores: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "db"))
            .collect();
        stores.sort();
        stores.pop().expect("a task store")
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.connection_file())
            .await
            .expect("the client connects")
    }

    /// Live processes of this cluster (daemons, kernels), found by the mark in their
    /// environment.
    /// The processes of the cluster's node.
    pub fn processes(&self) -> Vec<u32> {
        starling::node::our_processes(&self.node_root().join("master"))
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in std::fs::read_dir(self.node_root())
            .into_iter()
            .flatten()
            .flatten()
        {
            for log in std::fs::read_dir(node.path().join("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let _ = writeln!(out, "--- {} ---\n{text}", log.path().display());
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs of cluster '{}':\n{}", self.name, self.logs());
        }
        if self.connection_file().exists() {
            let _ = self.starling(&["down"]);
        }
        // Whatever `down` missed (it should miss nothing) is killed by pid, never by name.
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `check` until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
