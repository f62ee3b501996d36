//! The README's library example: `cargo run --example hello` with a cluster up
//! (`starling up --local -n 4`).

use starling::client::{connection, Client, ClientError};
use starling::proto::EngineId;

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let client = Client::connect(connection::find(None, None)?).await?;
    println!("engines: {:?}", client.ids().await?);

    // A DirectView on every engine: execute, apply, shell.
    let ar = client.all().execute("import os; os.getpid()").await?;
    for (engine, value) in ar.engines().iter().zip(ar.get().await?) {
        println!("engine {engine}: pid {value}");
    }
    println!(
        "elapsed {:?}, serial time {:?}",
        ar.elapsed(),
        ar.serial_time()
    );

    let sum = client
        .direct(EngineId(0))
        .apply("lambda a, b: a + b", vec![2.into(), 3.into()])
        .await?
        .get()
        .await?;
    assert_eq!(sum[0].to_string(), "5");
    println!("2 + 3 = {} on engine 0", sum[0]);
    Ok(())
}
