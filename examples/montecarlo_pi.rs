//! Estimates π with 2·10⁷ random samples, load-balanced across the engines of a running
//! cluster: `starling up --local -n 2`, then `cargo run --release --example montecarlo_pi`.
//!
//! Prints the estimate, the wall time and the serial time (the engine time summed over tasks).

use std::time::Instant;

use starling::client::{connection, Client, ClientError};
use starling::proto::{Func, Value};

/// The Python function, in its own file so the CLI one-liner in the README uses it too.
const SOURCE: &str = include_str!("montecarlo.py");
const TASKS: i64 = 200;
const SAMPLES_PER_TASK: i64 = 100_000;

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let client = Client::connect(connection::find(None, None)?).await?;
    let engines = client.ids().await?.len();
    let start = Instant::now();
    let seeds: Vec<Value> = (0..TASKS).map(Value::from).collect();
    let ar = client
        .load_balanced()
        .map(Func::from_source(SOURCE, "hits"), seeds)
        .await?;
    let hits: i64 = ar
        .get()
        .await?
        .iter()
        .filter_map(|v| v.as_json()?.as_i64())
        .sum();
    let samples = TASKS * SAMPLES_PER_TASK;
    println!(
        "pi ≈ {:.6} from {samples} samples on {engines} engines",
        4.0 * hits as f64 / samples as f64
    );
    println!(
        "wall time {:.2} s, serial time {:.2} s ({:.1}× speed-up)",
        start.elapsed().as_secs_f64(),
        ar.serial_time().as_secs_f64(),
        ar.serial_time().as_secs_f64() / start.elapsed().as_secs_f64()
    );
    Ok(())
}
