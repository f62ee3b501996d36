//! Keys, certificates and garbage: refused connections disturb nobody else.

use std::time::Duration;

use serde_json::json;
use starling::client::{Client, ClientError, ConnectionInfo};
use starling::proto::auth::{Key, Role};
use starling::proto::conn::{self, PeerStream};
use starling::proto::{ControllerToClient, ProtoError, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_key_is_refused_and_nothing_else_is_disturbed() {
    let c = Cluster::up("wrongkey", 1);
    let good = c.client().await;
    let ar = good
        .all()
        .execute("import time; time.sleep(0.3); 'survived'")
        .await
        .unwrap();

    let mut info = ConnectionInfo::load(&c.connection_file()).unwrap();
    info.client_key = Key::generate();
    let err = Client::connect_with(info.clone())
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            ClientError::Connect {
                reason: ProtoError::Refused(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains("the client key is wrong"), "{text}");
    assert!(
        !text.contains("Is the cluster up"),
        "the controller answered: {text}"
    );

    // The engine key does not open the client door either.
    let engine_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(c.node_root().join("master/config/engine.json")).unwrap(),
    )
    .unwrap();
    info.client_key = Key::from_hex(engine_cfg["engine_key"].as_str().unwrap()).unwrap();
    assert!(Client::connect_with(info.clone()).await.is_err());

    // Another cluster's certificate is not accepted by the client.
    let other = Cluster::up("othercert", 1);
    let mut forged = ConnectionInfo::load(&c.connection_file()).unwrap();
    forged.certificate = ConnectionInfo::load(&other.connection_file())
        .unwrap()
        .certificate;
    let err = Client::connect_with(forged).await.err().expect("refused");
    assert!(
        err.to_string()
            .contains("not the one pinned in the connection file"),
        "{err}"
    );

    assert_eq!(
        ar.get().await.unwrap(),
        vec![Value::Json(json!("survived"))]
    );
    assert_eq!(good.ids().await.unwrap().len(), 1);
    let log = std::fs::read_to_string(c.node_root().join("master/logs/controller.log")).unwrap();
    assert!(
        log.contains("the client key is wrong"),
        "refusals are logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_its_own_connection() {
    let c = Cluster::up("garbage", 1);
    let good = c.client().await;
    let info = ConnectionInfo::load(&c.connection_file()).unwrap();

    // Bytes that are not TLS at all.
    let mut raw = tokio::net::TcpStream::connect(&info.controller)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    assert!(
        closed.is_ok(),
        "the controller closes a connection that does not speak TLS"
    );
    assert!(
        !answer.starts_with(b"HTTP"),
        "and answers nothing but a TLS alert"
    );

    // An authenticated client that sends a frame of garbage is cut off...
    let mut bad: conn::Conn<PeerStream, ControllerToClient, String> = conn::connect(
        &info.controller,
        &info.certificate,
        Role::Client,
        &info.client_key,
        info.max_frame,
    )
    .await
    .unwrap();
    bad.send(&"this is not a request".to_string())
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), bad.recv())
        .await
        .expect("closed in time");
    assert!(matches!(next, Ok(None) | Err(_)), "{next:?}");

    // ...and so is one that announces a frame larger than the limit.
    let mut huge: conn::Conn<PeerStream, ControllerToClient, serde_json::Value> = conn::connect(
        &info.controller,
        &info.certificate,
        Role::Client,
        &info.client_key,
        usize::MAX >> 1,
    )
    .await
    .unwrap();
    huge.send(&json!("x".repeat(info.max_frame + 10)))
        .await
        .unwrap_or(());
    let next = tokio::time::timeout(Duration::from_secs(5), huge.recv())
        .await
        .expect("closed in time");
    assert!(matches!(next, Ok(None) | Err(_)), "{next:?}");

    // The good client never noticed.
    let ar = good.all().execute("'unbothered'").await.unwrap();
    assert_eq!(
        ar.get().await.unwrap(),
        vec![Value::Json(json!("unbothered"))]
    );
    let log = std::fs::read_to_string(c.node_root().join("master/logs/controller.log")).unwrap();
    assert!(log.contains("client connection closed"), "{log}");
}

/// The controller's resident memory, from /proc.
fn controller_rss_mib(c: &Cluster) -> u64 {
    let pid: u32 = std::fs::read_to_string(c.node_root().join("master/controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib >> 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_neither_shuts_clients_out_nor_grows_the_controller() {
    let c = Cluster::up("idleflood", 1);
    let info = ConnectionInfo::load(&c.connection_file()).unwrap();
    let before = controller_rss_mib(&c);
    // Twice as many sockets as may wait for a handshake, each silent.
    let n = 2 * starling::controller::MAX_HANDSHAKES + 100;
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(
            tokio::net::TcpStream::connect(&info.controller)
                .await
                .unwrap(),
        );
    }
    // A real client still gets in at once, and its work runs.
    let client = tokio::time::timeout(Duration::from_secs(5), Client::connect_with(info.clone()))
        .await
        .expect("a client gets in while idle sockets wait")
        .unwrap();
    let ar = client.all().execute("6 * 7").await.unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!(42))]);
    // The sockets that waited longest were dropped, not kept.
    let mut buf = [0u8; 16];
    let first = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
        .await
        .expect("the oldest idle socket is closed");
    assert!(matches!(first, Ok(0) | Err(_)), "{first:?}");
    let grown = controller_rss_mib(&c).saturating_sub(before);
    assert!(
        grown < 32,
        "the controller grew by {grown} MiB for {n} idle sockets"
    );
    let log = std::fs::read_to_string(c.node_root().join("master/logs/controller.log")).unwrap();
    assert!(log.contains("waited for their handshake at once"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_the_controller_does_not_hold_its_backlog() {
    let c = Cluster::new("noreader");
    let spec = c.home_path().join("small.yaml");
    std::fs::write(
        &spec,
        "name: noreader\nengines_per_node: 1\nmax_frame_mb: 4\n",
    )
    .unwrap();
    c.starling_raw(&["up", "-f", spec.to_str().unwrap()]).ok();
    let info = ConnectionInfo::load(&c.connection_file()).unwrap();
    let good = c.client().await;
    // A client that reads gets a finished job's results whole, however many frames they take
    // (12 MB here, three times the 4 MB frame).
    let items: Vec<Value> = (0..12).map(Value::from).collect();
    let map = good
        .load_balanced()
        .chunksize(1)
        .map("lambda i: b'x' * 1_000_000", items)
        .await
        .unwrap();
    assert_eq!(map.get().await.unwrap().len(), 12);
    let again = good.result(map.job_id()).await.unwrap();
    assert_eq!(again.get().await.unwrap().len(), 12);
    // A job with a 3 MB result.
    let big = good.all().execute("b'x' * 3_000_000").await.unwrap();
    big.get().await.unwrap();
    let before = controller_rss_mib(&c);

    // A client that asks for that result 60 times (180 MB) and never reads an answer.
    let mut greedy: conn::Conn<
        PeerStream,
        ControllerToClient,
        starling::proto::ClientToController,
    > = conn::connect(
        &info.controller,
        &info.certificate,
        Role::Client,
        &info.client_key,
        info.max_frame,
    )
    .await
    .unwrap();
    for id in 0..60 {
        let ask = starling::proto::ClientToController {
            id,
            body: starling::proto::ClientRequest::Subscribe { job: big.job_id() },
        };
        if greedy.send(&ask).await.is_err() {
            break; // cut off already
        }
    }
    let log_path = c.node_root().join("master/logs/controller.log");
    assert!(
        crate::common::eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("a client does not read what it asked for")
        })
        .await,
        "the controller cut the client off"
    );
    let grown = controller_rss_mib(&c).saturating_sub(before);
    assert!(
        grown < 64,
        "the controller grew by {grown} MiB for a client that never reads"
    );
    // Others keep working.
    let ar = good.all().execute("'unbothered'").await.unwrap();
    assert_eq!(
        ar.get().await.unwrap(),
        vec![Value::Json(json!("unbothered"))]
    );
}
