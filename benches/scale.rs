//! One controller, a thousand engines: registration, map throughput, memory and idle CPU.
//!
//! `cargo bench --bench scale [-- --engines 1000 --items 1000000 --tasks 100000 --queued 1000000]`
//!
//! Starts the real controller (`starlingd controller`, release build, with its SQLite task
//! store) on loopback, then `--engines` engines in this process, each on its own TLS
//! connection as every engine process has one, speaking the real protocol: register, heartbeat,
//! take `Run` frames, answer `Done`. They answer each map item with the item itself, in Rust,
//! so the figures are the controller's and the protocol's, not Python's (a Python kernel costs
//! ~25 MB and this machine has two cores). A client in this process then runs:
//!
//! - `register`: all engines connecting at once, until the controller lists them all;
//! - `idle`: the controller's CPU over 10 s with every engine heartbeating, as % of one core
//!   and per heartbeat period;
//! - `lb_default`: a load-balanced map of `--items` items, default (adaptive) chunking;
//! - `lb_chunk1`: a load-balanced map of `--tasks` items at chunksize 1 (one task each);
//! - `queued`: a map of `--queued` items at chunksize 1, submitted at once: the controller's
//!   peak RSS while they are queued and run.
//!
//! Each line is `name<TAB>count<TAB>seconds<TAB>per_second`, then the controller's RSS.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling::client::connection::{ConnectionInfo, CONNECTION_FORMAT};
use starling::client::Client;
use starling::controller::ControllerConfig;
use starling::proto::auth::{Key, Role};
use starling::proto::conn;
use starling::proto::tls::ClusterCert;
use starling::proto::{
    ControllerToEngine, EngineSlot, EngineToController, Outcome, TaskResult, Value, Work,
};

const STARLINGD: &str = env!("CARGO_BIN_EXE_starlingd");
const MAX_FRAME: usize = 64 << 20;
/// Engines per node name (what `status` groups them by).
const PER_NODE: u32 = 16;

struct Args {
    engines: u32,
    items: u64,
    tasks: u64,
    queued: u64,
}

fn args() -> Args {
    let mut a = Args {
        engines: 1000,
        items: 1_000_000,
        tasks: 100_000,
        queued: 1_000_000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--engines" => a.engines = u32::try_from(value()).expect("engines fit u32"),
            "--items" => a.items = value(),
            "--tasks" => a.tasks = value(),
            "--queued" => a.queued = value(),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// The controller process; killed on drop.
struct Controller {
    child: Child,
    addr: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_controller(dir: &Path, config: &ControllerConfig) -> Controller {
    let path = dir.join("controller.json");
    std::fs::write(&path, serde_json::to_vec(config).unwrap()).unwrap();
    let mut child = Command::new(STARLINGD)
        .args(["controller", "--config"])
        .arg(&path)
        .env("STARLING_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starlingd starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("the controller said {line:?}"))
        .trim()
        .to_string();
    Controller { child, addr }
}

/// The process's (user + system) CPU time, and its RSS and peak RSS in MiB.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    // utime and stime are fields 14 and 15; this slice starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// One engine on its own connection: registers, heartbeats, answers every task.
async fn engine(addr: String, cert: String, key: Key, slot: u32, answered: Arc<AtomicU64>) {
    let node = format!("bench{:03}", slot / PER_NODE);
    let mut pause = Duration::from_millis(50);
    // Connects like an engine does: a refused or dropped handshake is tried again.
    let mut c = loop {
        match conn::connect::<ControllerToEngine, EngineToController>(
            &addr,
            &cert,
            Role::Engine,
            &key,
            MAX_FRAME,
        )
        .await
        {
            Ok(c) => break c,
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    };
    c.send(&EngineToController::Register {
        node,
        host: "127.0.0.1".into(),
        pid: std::process::id(),
        engines: vec![EngineSlot {
            slot: slot % PER_NODE,
            kernel_pid: std::process::id(),
            rank: None,
        }],
    })
    .await
    .expect("registers");
    let heartbeat = match c.recv().await.expect("an answer") {
        Some(ControllerToEngine::Registered { heartbeat_ms, .. }) => {
            Duration::from_millis(heartbeat_ms)
        }
        other => panic!("registration answered with {other:?}"),
    };
    let (mut rx, mut tx) = c.split();
    let mut beat = tokio::time::interval(heartbeat);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if tx.feed(&EngineToController::Heartbeat).await.is_err() || tx.flush().await.is_err() {
                    return;
                }
            }
            msg = rx.recv() => match msg {
                Ok(Some(ControllerToEngine::Run { tasks, .. })) => {
                    let now = starling::proto::now_micros();
                    let results: Vec<TaskResult> = tasks
                        .into_iter()
                        .map(|a| {
                            let outcome = match a.work {
                                Work::MapChunk { items, .. } => {
                                    answered.fetch_add(items.len() as u64, Ordering::Relaxed);
                                    Outcome::Items(items.into_iter().map(Ok).collect())
                                }
                                _ => Outcome::Ok { value: Value::Json(serde_json::Value::Null), display: None },
                            };
                            TaskResult::bare(a.task, a.engine, a.first, outcome, now)
                        })
                        .collect();
                    if tx.feed(&EngineToController::Done(results)).await.is_err()
                        || tx.flush().await.is_err()
                    {
                        return;
                    }
                }
                Ok(Some(ControllerToEngine::Shutdown) | None) | Err(_) => return,
                Ok(Some(_)) => {}
            },
        }
    }
}

fn report(name: &str, count: u64, seconds: f64, pid: u32) {
    let (rss, peak) = memory_mib(pid);
    println!(
        "{name}\t{count}\t{seconds:.3}\t{:.0}\tcontroller RSS {rss:.0} MiB (peak {peak:.0} MiB)",
        count as f64 / seconds
    );
}

async fn map(client: &Client, chunksize: Option<u32>, n: u64) -> f64 {
    let mut view = client.load_balanced();
    if let Some(c) = chunksize {
        view = view.chunksize(c);
    }
    let items: Vec<Value> = (0..n).map(|i| Value::from(i as i64)).collect();
    let t = Instant::now();
    let out = view
        .map("lambda x: x", items)
        .await
        .expect("submitted")
        .get()
        .await
        .expect("every item");
    let s = t.elapsed().as_secs_f64();
    assert_eq!(out.len() as u64, n);
    assert_eq!(out[out.len() - 1], Value::from((n - 1) as i64));
    s
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let cert = ClusterCert::generate("scale").unwrap();
    let (client_key, engine_key) = (Key::generate(), Key::generate());
    let config = ControllerConfig {
        cluster: "scale".into(),
        listen: "127.0.0.1:0".into(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        client_key: client_key.clone(),
        engine_key: engine_key.clone(),
        db: Some(dir.path().join("tasks.db")),
        heartbeat_ms: 1000,
        task_attempts: 2,
        max_frame: MAX_FRAME,
    };
    let controller = start_controller(dir.path(), &config);
    let pid = controller.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::connect_with(ConnectionInfo {
            version: CONNECTION_FORMAT,
            cluster: "scale".into(),
            provider: "local".into(),
            controller: controller.addr.clone(),
            certificate: cert.cert_pem.clone(),
            client_key,
            ssh: None,
            max_frame: MAX_FRAME,
        })
        .await
        .expect("the client connects");

        let answered = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        for slot in 0..a.engines {
            tokio::spawn(engine(
                controller.addr.clone(),
                cert.cert_pem.clone(),
                engine_key.clone(),
                slot,
                answered.clone(),
            ));
        }
        let ids = client
            .wait_for_engines(a.engines, Duration::from_secs(300))
            .await
            .expect("every engine registers");
        assert_eq!(ids.len() as u32, a.engines);
        report(
            "register",
            u64::from(a.engines),
            t.elapsed().as_secs_f64(),
            pid,
        );

        // Idle: every engine heartbeating, nothing to do.
        let window = Duration::from_secs(10);
        let before = cpu_seconds(pid);
        tokio::time::sleep(window).await;
        let used = cpu_seconds(pid) - before;
        let share = 100.0 * used / window.as_secs_f64();
        println!(
            "idle\t{}\t{:.1}\t{share:.2}% of one core\t{:.1} ms CPU per heartbeat period",
            a.engines,
            window.as_secs_f64(),
            1000.0 * used / window.as_secs_f64()
        );

        let s = map(&client, None, a.items).await;
        report("lb_default", a.items, s, pid);
        let s = map(&client, Some(1), a.tasks).await;
        report("lb_chunk1", a.tasks, s, pid);
        // The controller's RSS through the big map, every half second.
        let series = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sampling = {
            let series = series.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    let rss = memory_mib(pid).0;
                    series
                        .lock()
                        .unwrap()
                        .push(format!("{:.1}s:{rss:.0}", t.elapsed().as_secs_f64()));
                }
            })
        };
        let s = map(&client, Some(1), a.queued).await;
        sampling.abort();
        eprintln!(
            "controller RSS (MiB) through `queued`: {}",
            series.lock().unwrap().join(" ")
        );
        report("queued", a.queued, s, pid);
        assert!(answered.load(Ordering::Relaxed) >= a.items + a.tasks + a.queued);
    });
    drop(controller);
}
