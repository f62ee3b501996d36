//! Start-up and round-trip latency of a local cluster.
//!
//! `cargo bench --bench latency` prints:
//! - the wall time of `starling up --local -n 2` until both engines are registered;
//! - the median and p99 latency of `execute("a = sum(range(101))")` on all engines, over 200
//!   calls through the client library.

mod support;

use support::BenchCluster;

use std::time::{Duration, Instant};

use starling::client::Client;

const CALLS: usize = 200;
const WARMUP: usize = 20;
const UP_RUNS: usize = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let home = tempfile::tempdir().expect("a temp dir");
    let mut ups = Vec::new();
    for _ in 0..UP_RUNS {
        let t = Instant::now();
        let cluster = BenchCluster::up(home.path(), 2);
        ups.push(t.elapsed());
        drop(cluster);
    }
    ups.sort();
    println!(
        "up --local -n 2, until both engines registered: median {:.0} ms, best {:.0} ms ({UP_RUNS} runs)",
        percentile(&ups, 0.5).as_secs_f64() * 1e3,
        ups[0].as_secs_f64() * 1e3
    );

    let cluster = BenchCluster::up(home.path(), 2);
    let conn = cluster.connection_file();
    for (flavor, rt) in [
        (
            "current-thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        ),
        (
            "multi-thread (2 workers)",
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ),
    ] {
        let lat = rt.block_on(execute_latency(&conn));
        let mut sorted = lat.clone();
        sorted.sort();
        println!(
            "execute('a = sum(range(101))') on 2 engines, {CALLS} calls, {flavor} client runtime: median {:.3} ms, p99 {:.3} ms, min {:.3} ms",
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            sorted[0].as_secs_f64() * 1e3
        );
    }
}

async fn execute_latency(conn: &std::path::Path) -> Vec<Duration> {
    let client = Client::connect(conn).await.expect("connects");
    let view = client.all();
    let mut lat = Vec::with_capacity(CALLS);
    for i in 0..WARMUP + CALLS {
        let t = Instant::now();
        let values = view
            .execute("a = sum(range(101))")
            .await
            .unwrap()
            .get()
            .await
            .unwrap();
        assert_eq!(values.len(), 2);
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    lat
}
