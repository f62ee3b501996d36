//! MPI engines on a local cluster (`up --mpi`): real Open MPI, real mpi4py, every kernel one
//! rank of a single world. They need `mpiexec` (scripts/test.sh installs Open MPI) and the
//! Python venv with mpi4py that scripts/python.sh builds; without them they fail, loudly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use starling::proto::Value;

use crate::common::Cluster;

/// The venv's Python, which has mpi4py and NumPy.
fn mpi_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-python/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: run scripts/python.sh build first (it installs mpi4py)",
        python.display()
    );
    python
}

/// A spec naming the kernels' Python, in the cluster's home.
fn spec(c: &Cluster, python: &Path) -> PathBuf {
    let path = c.home_path().join("mpi.yaml");
    std::fs::write(&path, format!("python: {}\n", python.display())).unwrap();
    path
}

/// `px CODE` until every engine answers without an error, within `limit`.
fn px_until_ok(c: &Cluster, code: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let r = c.starling(&["px", code]);
        if r.code == 0 {
            return r.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "px did not succeed within {limit:?}: {}{}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_is_the_rank_of_its_id_in_one_world() {
    let c = Cluster::new("mpi");
    let python = mpi_python();
    let up = c.starling_raw(&[
        "up",
        "-f",
        spec(&c, &python).to_str().unwrap(),
        "--name",
        "mpi",
        "-n",
        "4",
        "--mpi",
    ]);
    assert!(
        up.ok().stdout.contains("4 engines [0, 1, 2, 3]"),
        "{}",
        up.stdout
    );

    // Engine N is rank N of a world of 4.
    let px = c
        .starling(&[
            "px",
            "from mpi4py import MPI\nc = MPI.COMM_WORLD\n(c.rank, c.size)",
        ])
        .ok()
        .stdout
        .clone();
    for rank in 0..4 {
        assert!(px.contains(&format!("Out[{rank}:1]: ({rank}, 4)")), "{px}");
    }
    // A collective, and a NumPy array broadcast from rank 0.
    let sum = c
        .starling(&["px", "c.allreduce(c.rank)"])
        .ok()
        .stdout
        .clone();
    assert_eq!(sum.matches(": 6\n").count(), 4, "{sum}");
    let bcast = c
        .starling(&[
            "px",
            "import numpy as np\n\
             a = np.arange(1_000_000, dtype='f8') if c.rank == 0 else np.zeros(1_000_000)\n\
             c.Bcast(a, root=0)\nint(a.sum())",
        ])
        .ok()
        .stdout
        .clone();
    assert_eq!(bcast.matches(": 499999500000\n").count(), 4, "{bcast}");

    // The Rust client sees the same world and namespaces.
    let client = c.client().await;
    let ar = client
        .all()
        .execute("c.allreduce(c.rank * 2)")
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!(12)); 4]);
    // Everything else works as on any cluster: a load-balanced map, push and pull.
    let map = c
        .starling(&["map", "lambda x: x * x", "--range", "10"])
        .ok()
        .stdout
        .clone();
    assert_eq!(map.trim(), "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]");
    c.starling(&["push", r#"{"k": 7}"#]).ok();
    let pulled = c.starling(&["pull", "k"]).ok().stdout.clone();
    assert_eq!(pulled.matches("= 7").count(), 4, "{pulled}");
    // status says which rank each engine's kernel is.
    let status = c
        .starling(&["status", "--output", "json"])
        .ok()
        .stdout
        .clone();
    for id in 0..4 {
        assert!(
            status.contains(&format!("\"id\": {id},"))
                && status.contains(&format!("\"rank\": {id}")),
            "{status}"
        );
    }

    // A plain MPI program over the cluster's hostfile, with its exit status.
    let hello = c.home_path().join("hello.py");
    std::fs::write(
        &hello,
        // Rank 0 prints what every rank says: lines printed by several ranks at once may
        // interleave on mpiexec's output.
        "from mpi4py import MPI\nc = MPI.COMM_WORLD\nsaid = c.gather(f'rank {c.rank} of {c.size}')\n\
         if c.rank == 0:\n    print('\\n'.join(said), flush=True)\n",
    )
    .unwrap();
    let run = c.starling_raw(&[
        "mpirun",
        "mpi",
        "-n",
        "3",
        "--",
        python.to_str().unwrap(),
        hello.to_str().unwrap(),
    ]);
    let mut lines: Vec<&str> = run.ok().stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["rank 0 of 3", "rank 1 of 3", "rank 2 of 3"]);
    let failed = c.starling_raw(&[
        "mpirun",
        "mpi",
        "--",
        python.to_str().unwrap(),
        "-c",
        "raise SystemExit(5)",
    ]);
    assert_eq!(failed.code, 5, "{}{}", failed.stdout, failed.stderr);

    // A rank that dies takes its world with it: every engine reports it, the world starts
    // again, and every engine has a fresh rank of the same size.
    let died = c.starling(&["px", "--targets", "1", "import os; os._exit(3)"]);
    assert!(
        died.fails().stdout.contains("KernelDied") && died.stdout.contains("MPI world"),
        "{}",
        died.stdout
    );
    let again = px_until_ok(
        &c,
        "from mpi4py import MPI\nc = MPI.COMM_WORLD\n(c.rank, c.size, c.allreduce(1))",
        Duration::from_secs(60),
    );
    for rank in 0..4 {
        assert!(again.contains(&format!("Out[{rank}:")), "{again}");
        assert!(again.contains(&format!(": ({rank}, 4, 4)")), "{again}");
    }

    // down leaves no process: no rank, no mpiexec.
    let down = c.starling(&["down"]).ok().stdout.clone();
    assert!(down.contains("nothing of it remains"), "{down}");
    assert!(c.processes().is_empty(), "{:?}", c.processes());
}

#[test]
fn without_mpi4py_or_mpiexec_nothing_starts_and_the_error_says_what_to_install() {
    let c = Cluster::new("nompi");
    // A Python without site-packages: no mpi4py.
    let bare = c.home_path().join("bare-python");
    std::fs::write(
        &bare,
        format!("#!/bin/sh\nexec {} -S \"$@\"\n", mpi_python().display()),
    )
    .unwrap();
    std::fs::set_permissions(&bare, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let up = c.starling_raw(&[
        "up",
        "-f",
        spec(&c, &bare).to_str().unwrap(),
        "--mpi",
        "-n",
        "2",
    ]);
    let err = &up.fails().stderr;
    assert!(
        err.contains("MPI engines need mpi4py") && err.contains("-m pip install mpi4py"),
        "{err}"
    );
    assert!(!c.connection_file().exists());
    assert!(c.processes().is_empty());

    // No mpiexec on the PATH.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args([
            "up",
            "-f",
            spec(&c, &mpi_python()).to_str().unwrap(),
            "--mpi",
            "-n",
            "2",
        ])
        .env("STARLING_HOME", c.home_path())
        .env("PATH", c.home_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("`mpiexec`, and it is not on the PATH")
            && err.contains("apt-get install openmpi-bin"),
        "{err}"
    );
    assert!(c.processes().is_empty());

    // mpirun on a cluster that is not an MPI cluster says so.
    c.starling_raw(&["up", "--local", "-n", "1", "--name", "nompi"])
        .ok();
    let r = c.starling_raw(&["mpirun", "nompi", "--", "true"]);
    assert!(
        r.fails()
            .stderr
            .contains("was not started as an MPI cluster"),
        "{}",
        r.stderr
    );
}
