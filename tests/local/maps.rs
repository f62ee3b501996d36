//! Maps, load balancing and moving data, against real engines and kernels.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use starling::client::{Client, ClientError};
use starling::proto::{Func, Mapper, Value};

use crate::common::Cluster;

/// `list(map(f, xs))` computed by Python itself on an engine.
async fn python_map(client: &Client, f: &str, xs: &str) -> Value {
    let code = format!("list(map({f}, {xs}))");
    let ar = client
        .direct(starling::proto::EngineId(0))
        .execute(&code)
        .await
        .unwrap();
    ar.get().await.unwrap().remove(0)
}

/// Compares map results with Python's list: JSON lists element by element, others by repr.
#[track_caller]
fn assert_same(ours: &[Value], python: &Value, what: &str) {
    match python {
        Value::Json(serde_json::Value::Array(items)) => {
            let want: Vec<Value> = items.iter().cloned().map(Value::Json).collect();
            assert_eq!(ours, want.as_slice(), "{what}");
        }
        other => {
            let shown: Vec<String> = ours.iter().map(Value::to_python_repr).collect();
            assert_eq!(
                format!("[{}]", shown.join(", ")),
                other.to_python_repr(),
                "{what}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_equal_pythons_own_map_for_many_functions_and_inputs() {
    let c = Cluster::up("mapeq", 2);
    let client = c.client().await;
    let cases: &[(&str, &str, Vec<Value>)] = &[
        (
            "lambda x: x * x",
            "range(50)",
            (0..50).map(Value::from).collect(),
        ),
        (
            "lambda x: x / 3",
            "[1.5, -2.25, 1e-7, 1e300]",
            vec![1.5.into(), (-2.25).into(), 1e-7.into(), 1e300.into()],
        ),
        (
            "str.upper",
            "['a', 'bé', '']",
            vec!["a".into(), "bé".into(), "".into()],
        ),
        (
            "lambda l: [l, len(l)]",
            "[[1, [2]], [], ['x']]",
            vec![
                json!([1, [2]]).into(),
                json!([]).into(),
                json!(["x"]).into(),
            ],
        ),
        (
            "lambda x: x is None",
            "[None, 0]",
            vec![json!(null).into(), 0.into()],
        ),
        (
            "lambda d: sorted(d.items())",
            "[{'a': 1}, {}]",
            vec![json!({"a": 1}).into(), json!({}).into()],
        ),
        // Results with no JSON form come back pickled, with their repr.
        (
            "lambda x: (x, x)",
            "range(5)",
            (0..5).map(Value::from).collect(),
        ),
        ("lambda x: {x}", "[1, 2]", vec![1.into(), 2.into()]),
        (
            "lambda x: 2 ** (x * 40)",
            "range(3)",
            (0..3).map(Value::from).collect(),
        ),
    ];
    for (f, xs, items) in cases {
        let want = python_map(&client, f, xs).await;
        for chunksize in [None, Some(1), Some(3)] {
            let mut view = client.load_balanced();
            if let Some(cs) = chunksize {
                view = view.chunksize(cs);
            }
            let got = view
                .map(*f, items.clone())
                .await
                .unwrap()
                .get()
                .await
                .unwrap();
            assert_same(
                &got,
                &want,
                &format!("load-balanced {f} chunksize {chunksize:?}"),
            );
        }
        let got = client
            .all()
            .map(*f, items.clone())
            .await
            .unwrap()
            .get()
            .await
            .unwrap();
        assert_same(&got, &want, &format!("direct {f}"));
    }

    // Pickled values go back in as they came out.
    let tuples = client
        .load_balanced()
        .map("lambda x: (x, -x)", (0..4).map(Value::from).collect())
        .await
        .unwrap();
    let tuples = tuples.get().await.unwrap();
    assert!(matches!(&tuples[1], Value::Pickle(p) if p.repr == "(1, -1)"));
    let back = client
        .load_balanced()
        .map("lambda t: t[0] - t[1]", tuples)
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(back, (0..4).map(|i| Value::from(2 * i)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_raises_leaves_the_other_results() {
    let c = Cluster::up("mapraise", 2);
    let client = c.client().await;
    for chunksize in [None, Some(1), Some(4)] {
        let mut view = client.load_balanced();
        if let Some(cs) = chunksize {
            view = view.chunksize(cs);
        }
        let ar = view
            .map("lambda x: 10 // (x - 3)", (0..8).map(Value::from).collect())
            .await
            .unwrap();
        let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
            panic!()
        };
        assert!(err.per_item);
        assert_eq!(err.errors.len(), 1);
        assert_eq!(err.errors[0].index, 3);
        assert_eq!(err.errors[0].error.ename, "ZeroDivisionError");
        assert!(
            err.errors[0]
                .error
                .traceback
                .contains("lambda x: 10 // (x - 3)"),
            "{}",
            err.errors[0].error.traceback
        );
        assert!(
            err.to_string()
                .starts_with("1 item raised an error:\n[item 3 on engine "),
            "{err}"
        );
        let values = ar.values();
        assert_eq!(values[0], Some(Ok(Value::from(-4))));
        assert_eq!(values[7], Some(Ok(Value::from(2))));
    }
    // A function that cannot even be made fails every item with the reason.
    let ar = client
        .load_balanced()
        .map("lambda x: x +", vec![1.into(), 2.into()])
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors.len(), 2);
    assert!(err.errors.iter().all(|e| e.error.ename == "SyntaxError"));
    let ar = client
        .all()
        .map(Func::from_source("def f(x): return x", "g"), vec![1.into()])
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(
        err.errors[0].error.evalue,
        "starling_def.py has no function 'g'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_large_inputs() {
    let c = Cluster::up("mapsize", 2);
    let client = c.client().await;
    let ar = client
        .load_balanced()
        .map("lambda x: x", Vec::new())
        .await
        .unwrap();
    assert!(ar.ready());
    assert_eq!(ar.get().await.unwrap(), Vec::<Value>::new());
    let ar = client.all().map("lambda x: x", Vec::new()).await.unwrap();
    assert_eq!(ar.get().await.unwrap(), Vec::<Value>::new());

    let n: i64 = 100_000;
    let items: Vec<Value> = (0..n).map(Value::from).collect();
    let want: Vec<Value> = (0..n).map(|i| Value::from(2 * i + 1)).collect();
    let lb = client
        .load_balanced()
        .map("lambda x: 2 * x + 1", items.clone())
        .await
        .unwrap();
    assert_eq!(lb.get().await.unwrap(), want);
    let tasks = lb.results();
    assert!(
        tasks.len() > 4 && tasks.len() < 200,
        "adaptive chunks: {} tasks",
        tasks.len()
    );
    assert!(
        tasks.iter().any(|t| t.engine.0 == 0) && tasks.iter().any(|t| t.engine.0 == 1),
        "both engines worked"
    );
    let direct = client
        .all()
        .map("lambda x: 2 * x + 1", items)
        .await
        .unwrap();
    assert_eq!(direct.get().await.unwrap(), want);
    assert_eq!(direct.results().len(), 2, "one contiguous chunk per engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_stream_in_order_or_as_they_complete() {
    let c = Cluster::up("mapstream", 2);
    let client = c.client().await;
    let slow_first = "lambda x: (__import__('time').sleep(0.4 if x == 0 else 0.01), x)[1]";
    let items: Vec<Value> = (0..6).map(Value::from).collect();
    let ar = client
        .load_balanced()
        .chunksize(1)
        .ordered(false)
        .map(slow_first, items.clone())
        .await
        .unwrap();
    let unordered: Vec<usize> = ar.stream().map(|r| r.unwrap().0).collect().await;
    assert_eq!(unordered.len(), 6);
    assert_ne!(
        unordered[0], 0,
        "item 0 is slow, others finish first: {unordered:?}"
    );
    let mut sorted = unordered.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..6).collect::<Vec<_>>());

    let ar = client
        .load_balanced()
        .chunksize(1)
        .map(slow_first, items)
        .await
        .unwrap();
    let ordered: Vec<(usize, Value)> = ar
        .stream()
        .map(|r| {
            let (i, v) = r.unwrap();
            (i, v.unwrap())
        })
        .collect()
        .await;
    assert_eq!(
        ordered,
        (0..6)
            .map(|i| (i, Value::from(i as i64)))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_map_on_two_engines_takes_about_half_its_serial_time() {
    let c = Cluster::up("mapsleep", 2);
    let client = c.client().await;
    let ar = client
        .load_balanced()
        .map(
            Func::from_source(
                "import time\ndef f(x):\n    time.sleep(0.25)\n    return x * x\n",
                "f",
            ),
            (0..8).map(Value::from).collect(),
        )
        .await
        .unwrap();
    let (_, total) = ar.progress();
    assert_eq!(total, 8);
    assert_eq!(
        ar.get().await.unwrap(),
        (0..8).map(|i| Value::from(i * i)).collect::<Vec<_>>()
    );
    let (elapsed, serial) = (ar.elapsed(), ar.serial_time());
    assert!(serial >= Duration::from_secs(2), "{serial:?}");
    assert!(
        elapsed < serial.mul_f64(0.7),
        "elapsed {elapsed:?} vs serial {serial:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_scatter_gather_round_trip() {
    let c = Cluster::up("data", 3);
    let client = c.client().await;
    let all = client.all();
    all.push(vec![
        ("a".into(), 1.into()),
        ("b".into(), json!([1, 2, 3]).into()),
    ])
    .await
    .unwrap()
    .get()
    .await
    .unwrap();
    let pulled = all.pull(&["a", "b"]).await.unwrap().get().await.unwrap();
    assert_eq!(pulled, vec![Value::Json(json!([1, [1, 2, 3]])); 3]);
    assert_eq!(
        all.pull(&["a"]).await.unwrap().get().await.unwrap(),
        vec![Value::from(1); 3]
    );
    let missing = all.pull(&["nope"]).await.unwrap().get().await.unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("NameError: name 'nope' is not defined on this engine"),
        "{missing}"
    );

    // A pickled value pushed back arrives as the same object.
    let set = client
        .direct(starling::proto::EngineId(0))
        .execute("frozenset({1, 2})")
        .await
        .unwrap()
        .get()
        .await
        .unwrap()
        .remove(0);
    all.push(vec![("s".into(), set)])
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let check = all
        .execute("type(s).__name__, sorted(s)")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(check[2].to_string(), "('frozenset', [1, 2])");

    let items: Vec<Value> = (0..100).map(Value::from).collect();
    all.scatter("x", items.clone())
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let lens = all.execute("len(x)").await.unwrap().get().await.unwrap();
    assert_eq!(
        lens,
        vec![Value::from(34), Value::from(33), Value::from(33)]
    );
    assert_eq!(all.gather("x").await.unwrap(), items);
    let odd = client.direct(starling::proto::Targets::parse("::2").unwrap());
    odd.scatter("y", (0..5).map(Value::from).collect())
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(
        odd.gather("y").await.unwrap(),
        (0..5).map(Value::from).collect::<Vec<_>>()
    );
    all.execute("z = (1, 2)")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let err = all.gather("z").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot gather 'z': on engine 0 it is (1, 2)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_dying_in_a_map_fails_only_its_chunk() {
    let c = Cluster::up("mapdeath", 2);
    let client = c.client().await;
    let f = "lambda x: __import__('os')._exit(3) if x == 5 else x";
    let ar = client
        .load_balanced()
        .chunksize(1)
        .map(f, (0..10).map(Value::from).collect())
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors.len(), 1);
    assert_eq!(err.errors[0].index, 5);
    assert_eq!(err.errors[0].error.ename, "KernelDied");
    let ok = ar
        .values()
        .iter()
        .filter(|v| matches!(v, Some(Ok(_))))
        .count();
    assert_eq!(ok, 9);
    // The engines carry on.
    let again = client
        .load_balanced()
        .map("lambda x: x", vec![1.into(); 4])
        .await
        .unwrap();
    assert_eq!(again.get().await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_maps_quote_each_item() {
    let c = Cluster::up("shmap", 2);
    let client = c.client().await;
    let items: Vec<Value> = vec![
        "plain".into(),
        "two words".into(),
        "it's $HOME".into(),
        "a;b".into(),
    ];
    let ar = client
        .load_balanced()
        .map_with(Mapper::Shell("printf '%s' {}".into()), items.clone())
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), items);
    let ar = client
        .all()
        .map_with(
            Mapper::Shell("test {} = ok".into()),
            vec!["ok".into(), "no".into()],
        )
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors[0].index, 1);
    assert_eq!(
        err.errors[0].error.evalue,
        "the command exited with status 1"
    );
}

#[test]
fn the_cli_maps_pushes_scatters_and_gathers() {
    let c = Cluster::up("climap", 2);
    assert_eq!(
        c.starling(&["map", "lambda x: x*x", "--range", "10"])
            .ok()
            .stdout
            .trim(),
        "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"
    );

    let def = "import time\ndef f(x):\n    time.sleep(0.2); return x*x";
    let nb = c.starling(&["map", "f", "--def", def, "--range", "10", "--noblock"]);
    assert!(
        nb.ok().stdout.starts_with("job ") && nb.stdout.contains("load-balanced"),
        "{}",
        nb.stdout
    );
    let res = c.starling(&["result", "--progress"]);
    assert_eq!(
        res.ok().stdout.trim(),
        "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"
    );
    assert!(
        res.stderr.contains("10/10 items done"),
        "plain progress lines off a terminal: {}",
        res.stderr
    );
    assert!(
        res.stderr.contains("10 items in ") && res.stderr.contains("serial time"),
        "{}",
        res.stderr
    );

    let dir = c.home_path();
    std::fs::write(
        dir.join("work.py"),
        "def simulate(p):\n    return {'id': p['id'], 'out': p['x'] * 2}\n",
    )
    .unwrap();
    let params: Vec<serde_json::Value> = (0..120).map(|i| json!({"id": i, "x": i})).collect();
    std::fs::write(
        dir.join("params.json"),
        serde_json::to_string(&params).unwrap(),
    )
    .unwrap();
    let work = dir.join("work.py");
    let func = format!("{}:simulate", work.display());
    let out = c.starling(&[
        "map",
        &func,
        "--json",
        dir.join("params.json").to_str().unwrap(),
        "--chunksize",
        "50",
        "--output",
        "jsonl",
    ]);
    let lines = out.ok().lines();
    assert_eq!(lines.len(), 120);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(lines[7]).unwrap(),
        json!({"id": 7, "out": 14})
    );

    std::fs::write(dir.join("files.txt"), "a.txt\nb c.txt\n").unwrap();
    let sh = c.starling(&[
        "map",
        "--sh",
        "echo -n {} | wc -c",
        "--lines",
        dir.join("files.txt").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(sh.ok().json(), json!(["5", "7"]));

    let bad = c.starling(&["map", "lambda x: 1/x", "--range", "3"]);
    assert!(
        bad.fails().stdout.contains("[item 0 on engine "),
        "{}",
        bad.stdout
    );
    assert!(bad.stderr.contains("1 of 3 items failed"), "{}", bad.stderr);
    let r = c.starling(&["map", "lambda x: x", "--range", "x"]);
    assert!(r.fails().stderr.contains("bad --range 'x'"), "{}", r.stderr);

    c.starling(&["push", "{\"a\": 1, \"b\": [1,2,3]}"]).ok();
    assert_eq!(
        c.starling(&["pull", "a", "b"]).ok().lines(),
        vec![
            "[0] a = 1",
            "[0] b = [1, 2, 3]",
            "[1] a = 1",
            "[1] b = [1, 2, 3]"
        ]
    );
    let r = c.starling(&["push", "[1, 2]"]);
    assert!(
        r.fails().stderr.contains("push takes a JSON object"),
        "{}",
        r.stderr
    );

    c.starling(&["scatter", "x", "--range", "100"]).ok();
    assert_eq!(
        c.starling(&["px", "len(x)"]).ok().lines(),
        vec!["Out[0:1]: 50", "Out[1:1]: 50"]
    );
    let gathered = c.starling(&["gather", "x", "--output", "json"]).ok().json();
    assert_eq!(gathered, json!((0..100).collect::<Vec<_>>()));
}
