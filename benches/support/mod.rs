//! What the benchmarks share: running the `starling` binary against a private home, and a
//! guard that takes the benchmark's cluster down however the benchmark ends.

use std::path::Path;
use std::process::Command;

pub const STARLING: &str = env!("CARGO_BIN_EXE_starling");

/// The cluster name every benchmark uses.
pub const CLUSTER: &str = "bench";

/// Runs `starling ARGS` with `home` as STARLING_HOME; panics with its stderr if it fails.
pub fn starling(home: &Path, args: &[&str]) -> String {
    let out = Command::new(STARLING)
        .args(args)
        .env("STARLING_HOME", home)
        .output()
        .expect("starling runs");
    assert!(
        out.status.success(),
        "starling {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A local cluster of `engines` engines; taken down on drop, also when the benchmark panics.
pub struct BenchCluster<'a> {
    home: &'a Path,
}

impl<'a> BenchCluster<'a> {
    pub fn up(home: &'a Path, engines: u32) -> Self {
        starling(
            home,
            &[
                "up",
                "--local",
                "-n",
                &engines.to_string(),
                "--name",
                CLUSTER,
            ],
        );
        Self { home }
    }

    pub fn connection_file(&self) -> std::path::PathBuf {
        self.home
            .join("clusters")
            .join(CLUSTER)
            .join("connection.json")
    }
}

impl Drop for BenchCluster<'_> {
    fn drop(&mut self) {
        let _ = Command::new(STARLING)
            .args(["down", "--cluster", CLUSTER])
            .env("STARLING_HOME", self.home)
            .output();
    }
}
