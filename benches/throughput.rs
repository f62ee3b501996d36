//! Map throughput on a local cluster of 2 engines: the starling half of `bench/compare.sh`.
//!
//! `cargo bench --bench throughput` prints one line per workload, `name<TAB>count<TAB>seconds<TAB>per_second`:
//! - `lb_default`: a load-balanced map of 100,000 trivial items, default (adaptive) chunking;
//! - `lb_chunk1`: 10,000 trivial tasks load-balanced, chunksize 1;
//! - `lb_chunk100`: 10,000 trivial tasks load-balanced, chunksize 100;
//! - `direct_map`: a DirectView map of 100,000 items;
//! - `montecarlo`: π from 2·10⁷ samples in 200 load-balanced tasks (seconds; items/s is samples/s).

mod support;

use support::BenchCluster;

use std::time::Instant;

use starling::client::Client;
use starling::proto::{Func, Value};

/// Runs per workload; the best is reported (the machine is shared with the engines).
const RUNS: usize = 3;

fn report(name: &str, count: usize, seconds: f64) {
    println!(
        "{name}\t{count}\t{seconds:.4}\t{:.0}",
        count as f64 / seconds
    );
}

/// The Monte Carlo function of `examples/montecarlo_pi.rs`: 10⁵ samples per task.
const MONTECARLO: &str = include_str!("../examples/montecarlo.py");

async fn best<F, Fut>(mut run: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut best = f64::MAX;
    for _ in 0..RUNS {
        best = best.min(run().await);
    }
    best
}

fn main() {
    let home = tempfile::tempdir().expect("a temp dir");
    let cluster = BenchCluster::up(home.path(), 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::connect(cluster.connection_file())
            .await
            .expect("connects");
        let lb = client.load_balanced();
        let items = |n: i64| (0..n).map(Value::from).collect::<Vec<_>>();

        let s = best(|| async {
            let t = Instant::now();
            let out = lb
                .map("lambda x: x", items(100_000))
                .await
                .unwrap()
                .get()
                .await
                .unwrap();
            assert_eq!(out.len(), 100_000);
            t.elapsed().as_secs_f64()
        })
        .await;
        report("lb_default", 100_000, s);

        for chunk in [1u32, 100] {
            let view = client.load_balanced().chunksize(chunk);
            let s = best(|| async {
                let t = Instant::now();
                let out = view
                    .map("lambda x: x", items(10_000))
                    .await
                    .unwrap()
                    .get()
                    .await
                    .unwrap();
                assert_eq!(out.len(), 10_000);
                t.elapsed().as_secs_f64()
            })
            .await;
            report(&format!("lb_chunk{chunk}"), 10_000, s);
        }

        let s = best(|| async {
            let t = Instant::now();
            let out = client
                .all()
                .map("lambda x: x", items(100_000))
                .await
                .unwrap()
                .get()
                .await
                .unwrap();
            assert_eq!(out.len(), 100_000);
            t.elapsed().as_secs_f64()
        })
        .await;
        report("direct_map", 100_000, s);

        let tasks: Vec<Value> = (0..200).map(Value::from).collect();
        let t = Instant::now();
        let ar = lb
            .map(Func::from_source(MONTECARLO, "hits"), tasks)
            .await
            .unwrap();
        let hits: u64 = ar
            .get()
            .await
            .unwrap()
            .iter()
            .map(|v| v.as_json().and_then(serde_json::Value::as_u64).unwrap())
            .sum();
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "montecarlo: pi ~ {:.5}, serial time {:.2} s",
            4.0 * hits as f64 / 2e7,
            ar.serial_time().as_secs_f64()
        );
        report("montecarlo", 20_000_000, s);
    });
}
