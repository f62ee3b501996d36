//! The Rust client library against a real cluster.

use std::time::Duration;

use serde_json::json;
use starling::client::ClientError;
use starling::proto::{EngineId, Outcome, Targets, Value};

use crate::common::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_apply_and_async_result_behave_like_ipyparallel() {
    let c = Cluster::up("lib", 3);
    let client = c.client().await;
    assert_eq!(
        client.ids().await.unwrap(),
        vec![EngineId(0), EngineId(1), EngineId(2)]
    );

    let ar = client
        .all()
        .execute("import os\nprint('hi from', os.environ['STARLING_ENGINE_ID'])\n6 * 7")
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!(42)); 3]);
    assert!(ar.ready());
    let out = ar.stdout();
    assert_eq!(out.len(), 3);
    for (engine, text) in out {
        assert_eq!(text, format!("hi from {engine}\n"));
    }
    let results = ar.results();
    assert_eq!(results.len(), 3);
    for r in &results {
        assert!(
            r.started >= ar.submitted() && r.completed >= r.started,
            "{r:?}"
        );
        assert!(matches!(&r.outcome, Outcome::Ok { display: Some(d), .. } if d == "42"));
    }
    assert!(
        ar.elapsed()
            >= Duration::from_micros(
                results
                    .iter()
                    .map(|r| r.completed - r.started)
                    .max()
                    .unwrap()
            )
    );

    // apply: a lambda, and a function defined on the engines.
    let ar = client
        .direct(EngineId(1))
        .apply("lambda a, b: a + b", vec![json!(2).into(), json!(3).into()])
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!(5))]);
    client
        .all()
        .execute("def double(x):\n    return [x, x]")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let ar = client
        .all()
        .apply("double", vec![json!("ab").into()])
        .await
        .unwrap();
    assert_eq!(
        ar.get().await.unwrap(),
        vec![Value::Json(json!(["ab", "ab"])); 3]
    );

    // Values without a JSON form come back pickled with their repr, and go back in as they are.
    let ar = client
        .direct(EngineId(0))
        .execute("{1, 2, 3}")
        .await
        .unwrap();
    let set = ar.get().await.unwrap().remove(0);
    assert!(
        matches!(&set, Value::Pickle(p) if p.repr == "{1, 2, 3}"),
        "{set:?}"
    );
    let ar = client
        .direct(EngineId(0))
        .apply("lambda s: sorted(s)", vec![set])
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!([1, 2, 3]))]);
    let ar = client
        .direct(EngineId(0))
        .execute("float('nan'), 2**70, b'x', None")
        .await
        .unwrap();
    assert_eq!(
        ar.get().await.unwrap()[0].to_string(),
        "(nan, 1180591620717411303424, b'x', None)"
    );
    let ar = client
        .direct(EngineId(0))
        .execute("import sys; sys")
        .await
        .unwrap();
    assert!(
        matches!(&ar.get().await.unwrap()[0], Value::Pickle(p) if p.repr == "<module 'sys' (built-in)>"),
        "a module pickles by reference (cloudpickle)"
    );
    let ar = client
        .direct(EngineId(0))
        .execute("import threading; threading.Lock()")
        .await
        .unwrap();
    assert!(
        matches!(&ar.get().await.unwrap()[0], Value::Opaque { repr } if repr.starts_with("<unlocked _thread.lock object")),
        "what cannot be pickled comes back as its repr"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_on_some_engines_leave_the_others_results_intact() {
    let c = Cluster::up("errors", 3);
    let client = c.client().await;
    let ar = client
        .all()
        .execute("import os\nid = int(os.environ['STARLING_ENGINE_ID'])\nif id == 1:\n    raise ValueError('bad engine')\nid * 10")
        .await
        .unwrap();
    let err = ar.get().await.unwrap_err();
    let ClientError::Remote(composite) = err else {
        panic!("{err}")
    };
    assert_eq!(composite.errors.len(), 1);
    assert_eq!(composite.errors[0].engine, EngineId(1));
    assert_eq!(composite.errors[0].error.ename, "ValueError");
    assert!(
        composite.errors[0]
            .error
            .traceback
            .contains("raise ValueError('bad engine')"),
        "{:?}",
        composite.errors[0]
    );
    assert!(
        !composite.errors[0]
            .error
            .traceback
            .contains("starling-kernel"),
        "kernel frames are hidden"
    );
    assert_eq!(
        composite.to_string(),
        "1 task raised an error:\n[engine 1] ValueError: bad engine"
    );
    // The partial results stay, in engine order.
    let values = ar.values();
    assert_eq!(values[0], Some(Ok(Value::Json(json!(0)))));
    assert!(matches!(&values[1], Some(Err(e)) if e.ename == "ValueError"));
    assert_eq!(values[2], Some(Ok(Value::Json(json!(20)))));

    // A SyntaxError on every engine is one error per engine, each with its engine id.
    let ar = client.all().execute("def (").await.unwrap();
    let ClientError::Remote(composite) = ar.get().await.unwrap_err() else {
        panic!()
    };
    let engines: Vec<u32> = composite.errors.iter().map(|e| e.engine.0).collect();
    assert_eq!(engines, vec![0, 1, 2]);
    assert!(composite
        .errors
        .iter()
        .all(|e| e.error.ename == "SyntaxError"));

    // The engines are fine afterwards.
    assert_eq!(
        client
            .all()
            .execute("1")
            .await
            .unwrap()
            .get()
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_with_a_timeout_and_results_fetched_by_another_client() {
    let c = Cluster::up("waits", 2);
    let job = {
        let client = c.client().await;
        let ar = client
            .all()
            .execute("import time; time.sleep(0.5); 'done'")
            .await
            .unwrap();
        assert!(!ar.ready());
        assert!(!ar.wait(Some(Duration::from_millis(50))).await.unwrap());
        assert_eq!(ar.progress(), (0, 2));
        ar.job_id()
        // The submitting client goes away here, before the job finishes.
    };
    let other = c.client().await;
    let ar = other.result(job).await.unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::Json(json!("done")); 2]);
    assert!(
        ar.elapsed() >= Duration::from_millis(500),
        "{:?}",
        ar.elapsed()
    );
    assert!(
        ar.serial_time() >= Duration::from_secs(1),
        "{:?}",
        ar.serial_time()
    );

    // A submission that returns once the job is done: its results are in when it returns,
    // and one the controller refuses is refused as any other.
    let done = other
        .all()
        .returning_when_done()
        .execute("import time; time.sleep(0.3); 'slept'")
        .await
        .unwrap();
    assert!(done.ready());
    assert_eq!(done.progress(), (2, 2));
    assert_eq!(
        done.get().await.unwrap(),
        vec![Value::Json(json!("slept")); 2]
    );
    assert!(done.elapsed() >= Duration::from_millis(300));
    // A map over no items has ended as it is accepted.
    let nothing = tokio::time::timeout(
        Duration::from_secs(10),
        other
            .load_balanced()
            .returning_when_done()
            .map("lambda x: x", vec![]),
    )
    .await
    .expect("a map over no items returns at once")
    .unwrap();
    assert!(nothing.ready());
    assert_eq!(nothing.get().await.unwrap(), Vec::<Value>::new());
    let refused = other
        .direct(Targets::parse("7").unwrap())
        .returning_when_done()
        .execute("1")
        .await;
    assert!(
        matches!(&refused, Err(ClientError::Controller(e)) if e.contains("there is no engine 7")),
        "{:?}",
        refused.err()
    );

    let missing = other.result(starling::proto::JobId(999)).await;
    assert!(
        matches!(&missing, Err(ClientError::Controller(e)) if e.contains("there is no job 999")),
        "{:?}",
        missing.err()
    );
    let bad = other
        .direct(Targets::parse("5").unwrap())
        .execute("1")
        .await;
    assert!(
        matches!(&bad, Err(ClientError::Controller(e)) if e == "there is no engine 5; the engines are [0, 1]")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_store_records_every_job_and_result() {
    let c = Cluster::up("store", 2);
    let client = c.client().await;
    client
        .all()
        .execute("print('stored'); 5")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    client
        .direct(EngineId(0))
        .execute("1/0")
        .await
        .unwrap()
        .wait(None)
        .await
        .unwrap();
    let db = c.task_store();
    let counted = crate::common::eventually(Duration::from_secs(5), || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
            .unwrap_or(0);
        n == 3
    })
    .await;
    assert!(counted, "three task rows");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (ok, result, stdout): (bool, String, String) = conn
        .query_row(
            "SELECT ok, result, stdout FROM tasks WHERE engine = 1 ORDER BY task LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(ok);
    assert_eq!((result.as_str(), stdout.as_str()), ("5", "stored\n"));
    let failed: String = conn
        .query_row("SELECT result FROM tasks WHERE ok = 0", [], |r| r.get(0))
        .unwrap();
    assert!(
        failed.starts_with("ZeroDivisionError: division by zero"),
        "{failed}"
    );
    let jobs: i64 = conn
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(jobs, 2);
}
