//! Dependencies, retries, timeouts, abort, interrupt and the task store's history, on real local
//! clusters, from the Rust client and the CLI.

use std::time::{Duration, Instant};

use starling::client::{AsyncResult, ClientError};
use starling::proto::{Dependency, EngineId, JobId, RemoteError, Value};

use crate::common::{eventually, Cluster};

/// A task that returns when it started and ended (seconds), after a short sleep.
const STAMP: &str =
    "lambda: (lambda t0: (__import__('time').sleep(0.2), [t0, __import__('time').time()])[1])(__import__('time').time())";

fn span(v: &Value) -> (f64, f64) {
    let j = v.as_json().expect("a JSON pair");
    (j[0].as_f64().unwrap(), j[1].as_f64().unwrap())
}

/// When a job's one task started and ended.
async fn ends(ar: &AsyncResult) -> (f64, f64) {
    span(&ar.get().await.unwrap()[0])
}

/// The one error of a failed job.
async fn the_error(ar: &AsyncResult) -> RemoteError {
    match tokio::time::timeout(Duration::from_secs(30), ar.get())
        .await
        .expect("the job ends")
    {
        Err(ClientError::Remote(e)) => e.errors[0].error.clone(),
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_of_dependencies_runs_in_order_follow_stays_put_and_impossible_work_fails_at_once(
) {
    let c = Cluster::up("deps", 3);
    let client = c.client().await;
    let lb = client.load_balanced();
    // a → (b, c) → d
    let a = lb.apply(STAMP, vec![]).await.unwrap();
    let b = lb.clone().after(&a).apply(STAMP, vec![]).await.unwrap();
    let c2 = lb.clone().after(&a).apply(STAMP, vec![]).await.unwrap();
    let d = lb
        .clone()
        .after(vec![b.job_id(), c2.job_id()])
        .apply(STAMP, vec![])
        .await
        .unwrap();
    let (ta, tb, tc, td) = (
        ends(&a).await,
        ends(&b).await,
        ends(&c2).await,
        ends(&d).await,
    );
    assert!(tb.0 >= ta.1 && tc.0 >= ta.1, "b and c start after a ended");
    assert!(td.0 >= tb.1 && td.0 >= tc.1, "d starts after b and c ended");
    assert!(
        tb.0 < tc.1 && tc.0 < tb.1,
        "b and c, both waiting on a only, run at the same time"
    );

    // follow: every item runs where `a` ran.
    let where_a = a.results()[0].engine;
    let followers = lb
        .clone()
        .chunksize(1)
        .follow(&a)
        .map("lambda x: x", (0..12).map(Value::from).collect())
        .await
        .unwrap();
    followers.get().await.unwrap();
    assert!(
        followers.results().iter().all(|r| r.engine == where_a),
        "all on engine {where_a}"
    );

    // A failed dependency: what depends on it fails at once, and what depends on that too.
    let fails = lb.apply("lambda: 1/0", vec![]).await.unwrap();
    let t0 = Instant::now();
    let next = lb.clone().after(&fails).apply(STAMP, vec![]).await.unwrap();
    let last = lb.clone().after(&next).apply(STAMP, vec![]).await.unwrap();
    for ar in [&next, &last] {
        let e = the_error(ar).await;
        assert_eq!(e.ename, "ImpossibleDependency");
        assert!(
            e.evalue
                .contains(&format!("job {} cannot run", ar.job_id()))
                && e.evalue.contains("ZeroDivisionError"),
            "{}",
            e.evalue
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "at once");
    // …unless failure is what it waits for.
    let on_failure = Dependency {
        jobs: vec![fails.job_id()],
        all: true,
        success: false,
        failure: true,
    };
    let cleanup = lb
        .clone()
        .after(on_failure)
        .apply("lambda: 'cleaned'", vec![])
        .await
        .unwrap();
    assert_eq!(cleanup.get().await.unwrap(), vec![Value::from("cleaned")]);

    // Dependencies point to work that exists.
    let Err(ClientError::Controller(e)) = lb.clone().after(JobId(999)).apply(STAMP, vec![]).await
    else {
        panic!("a dependency on no job is refused");
    };
    assert!(e.contains("there is no job 999"), "{e}");
    // Direct work can wait too.
    let px = client.all().after(&d).execute("'after d'").await.unwrap();
    assert_eq!(px.get().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_a_task_that_raised_again_and_count_the_attempts() {
    let c = Cluster::up("retries", 2);
    let client = c.client().await;
    let counter = c.home_path().join("tries");
    // Fails the first two times it runs, anywhere; then returns how many tries it took.
    let flaky = format!(
        "lambda: (lambda p: (open(p, 'a').write('x'), (len(open(p).read()) > 2 or 1/0) and len(open(p).read()))[1])({:?})",
        counter.to_str().unwrap()
    );
    let ar = client
        .load_balanced()
        .retries(2)
        .apply(flaky.as_str(), vec![])
        .await
        .unwrap();
    assert_eq!(ar.get().await.unwrap(), vec![Value::from(3)]);
    assert_eq!(ar.results()[0].attempts, 3);

    std::fs::remove_file(&counter).unwrap();
    let ar = client
        .load_balanced()
        .retries(1)
        .apply(flaky.as_str(), vec![])
        .await
        .unwrap();
    let e = the_error(&ar).await;
    assert_eq!(e.ename, "ZeroDivisionError");
    assert_eq!(ar.results()[0].attempts, 2, "one retry, then the error");

    // The store records the attempts too.
    let records = client
        .history(&serde_json::json!({"attempts": {"$gt": 1}}), 10)
        .await
        .unwrap();
    let attempts: Vec<(u64, u32, &str)> = records
        .iter()
        .map(|r| (r.job.0, r.attempts, r.status.as_str()))
        .collect();
    assert_eq!(attempts, vec![(1, 2, "failed"), (0, 3, "ok")]);

    // Retries are for load-balanced work.
    let Err(ClientError::Controller(e)) = client
        .all()
        .options(starling::proto::JobOptions {
            retries: 1,
            ..Default::default()
        })
        .execute("1")
        .await
    else {
        panic!()
    };
    assert!(e.contains("retries apply to load-balanced work"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_interrupts_a_running_task_and_a_kernel_that_ignores_it_is_replaced() {
    let c = Cluster::up("timeout", 1);
    let client = c.client().await;
    client
        .all()
        .execute("kept = 41")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let t0 = Instant::now();
    let ar = client
        .load_balanced()
        .timeout(Duration::from_millis(800))
        .map(
            "lambda x: __import__('time').sleep(60)",
            (0..3).map(Value::from).collect(),
        )
        .await
        .unwrap();
    let e = the_error(&ar).await;
    assert_eq!(e.ename, "TaskTimeout");
    assert!(e.evalue.contains("0.8 s"), "{}", e.evalue);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        ar.values().iter().filter(|v| v.is_some()).count(),
        3,
        "every item failed"
    );
    // SIGINT stopped the sleep: the kernel and its namespace live on.
    let kept = client.all().execute("kept + 1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), kept.get())
        .await
        .expect("the engine is free again")
        .unwrap();
    assert_eq!(got, vec![Value::from(42)]);

    // A task that swallows KeyboardInterrupt: its kernel is killed and replaced.
    let stubborn = "def stubborn():\n    import time\n    while True:\n        try:\n            time.sleep(60)\n        except KeyboardInterrupt:\n            pass\n";
    client
        .all()
        .execute(stubborn)
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let ar = client
        .all()
        .timeout(Duration::from_millis(500))
        .execute("stubborn()")
        .await
        .unwrap();
    assert_eq!(the_error(&ar).await.ename, "TaskTimeout");
    let after = client.all().execute("'kept' in globals()").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), after.get())
        .await
        .expect("the engine works again")
        .unwrap();
    assert_eq!(
        got,
        vec![Value::from(false)],
        "a new kernel, an empty namespace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_queued_tasks_and_interrupt_stops_running_ones() {
    let c = Cluster::up("abort", 1);
    let client = c.client().await;
    let ar = client
        .load_balanced()
        .chunksize(1)
        .map(
            "lambda x: (__import__('time').sleep(0.5), x)[1]",
            (0..20).map(Value::from).collect(),
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || ar.progress().0 >= 1).await);
    ar.abort(false).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), ar.wait(None))
        .await
        .expect("the job ends soon after the abort")
        .unwrap();
    assert!(done);
    let values = ar.values();
    let aborted = values
        .iter()
        .filter(|v| matches!(v, Some(Err(e)) if e.ename == "TaskAborted"))
        .count();
    let ran = values.iter().filter(|v| matches!(v, Some(Ok(_)))).count();
    assert_eq!(aborted + ran, 20);
    assert!(aborted >= 15 && ran >= 1, "{ran} ran, {aborted} aborted");
    // A finished job: nothing to abort.
    let Err(ClientError::Controller(e)) = ar.abort(false).await else {
        panic!()
    };
    assert!(e.contains("already finished"), "{e}");

    // interrupt: what runs raises KeyboardInterrupt; the engine goes on.
    let long = client
        .all()
        .execute("import time; time.sleep(60)")
        .await
        .unwrap();
    // An interrupt is for what runs: until the task has started, it changes nothing.
    let started = Instant::now();
    let mut interrupted = false;
    while started.elapsed() < Duration::from_secs(10) && !interrupted {
        assert_eq!(
            client.interrupt(EngineId(0)).await.unwrap(),
            vec![EngineId(0)]
        );
        interrupted = tokio::time::timeout(Duration::from_millis(500), long.wait(None))
            .await
            .is_ok();
    }
    assert!(interrupted, "the sleep was interrupted");
    assert_eq!(the_error(&long).await.ename, "KeyboardInterrupt");
    let r = client
        .all()
        .execute("2 + 2")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(r, vec![Value::from(4)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_answers_queries_resubmits_and_purges() {
    let c = Cluster::up("history", 2);
    let client = c.client().await;
    let lb = client.load_balanced();
    let squares = lb
        .clone()
        .label("squares")
        .map("lambda x: x * x", (0..10).map(Value::from).collect())
        .await
        .unwrap();
    squares.get().await.unwrap();
    let bad = client.direct(EngineId(1)).execute("1/0").await.unwrap();
    bad.wait(None).await.unwrap();
    let all = client.history(&serde_json::json!({}), 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].job, bad.job_id(), "newest first");
    assert_eq!(all[0].status, "failed");
    assert!(all[0]
        .error
        .as_deref()
        .unwrap()
        .contains("ZeroDivisionError"));
    assert_eq!(all[1].label.as_deref(), Some("squares"));
    assert_eq!((all[1].kind.as_str(), all[1].items), ("map", 10));
    assert!(all[1].submitter.contains('@'), "{}", all[1].submitter);
    let on_1 = client
        .history(&serde_json::json!({"engine": 1, "status": "failed"}), 10)
        .await
        .unwrap();
    assert_eq!(on_1.len(), 1);
    let labelled = client
        .history(&serde_json::json!({"label": {"$in": ["squares", "x"]}}), 10)
        .await
        .unwrap();
    assert_eq!(labelled.len(), 1);
    let Err(ClientError::Controller(e)) = client
        .history(&serde_json::json!({"colour": "red"}), 10)
        .await
    else {
        panic!()
    };
    assert!(e.contains("unknown key 'colour'"), "{e}");

    // Again, as a new job with the same answer.
    let again = client.resubmit(squares.job_id()).await.unwrap();
    assert_ne!(again.job_id(), squares.job_id());
    assert_eq!(again.get().await.unwrap(), squares.get().await.unwrap());

    // Purge: the store forgets, and says so when asked for a purged job.
    assert_eq!(client.purge(&serde_json::json!({})).await.unwrap(), 3);
    assert!(client
        .history(&serde_json::json!({}), 10)
        .await
        .unwrap()
        .is_empty());
    let Err(ClientError::Controller(e)) = client.result(squares.job_id()).await else {
        panic!()
    };
    assert!(e.contains("not in the task store"), "{e}");
}

#[test]
fn the_cli_waits_after_jobs_lists_the_history_and_refuses_bad_input_clearly() {
    let c = Cluster::up("schedcli", 2);
    let first = c.starling(&[
        "map",
        "lambda x: x + 1",
        "--range",
        "4",
        "--noblock",
        "--label",
        "first",
    ]);
    first.ok();
    let second = c.starling(&["map", "lambda x: x * 2", "--range", "3", "--after", "0"]);
    assert_eq!(second.ok().stdout.trim(), "[0, 2, 4]");
    c.starling(&["px", "1/0", "--targets", "0"]).fails();
    let later = c.starling(&["px", "1", "--after", "2"]);
    assert!(
        later
            .fails()
            .stdout
            .contains("ImpossibleDependency: job 3 cannot run: job 2 failed"),
        "{}",
        later.stdout
    );

    let table = c.starling(&["history"]);
    let lines = table.ok().lines();
    assert!(lines[0].starts_with("  job  submitted"), "{}", table.stdout);
    assert_eq!(lines.len(), 5, "{}", table.stdout);
    assert!(lines[4].contains("first"), "{}", table.stdout);
    let json = c.starling(&["history", "--status", "impossible", "--output", "json"]);
    let records = json.ok().json();
    assert_eq!(records.as_array().unwrap().len(), 1);
    assert_eq!(records[0]["job"], 3);

    for (args, says) in [
        (
            vec!["map", "lambda x: x", "--range", "2", "--after", "77"],
            "there is no job 77",
        ),
        (
            vec!["map", "lambda x: x", "--range", "2", "--timeout", "-1"],
            "not a number of seconds",
        ),
        (
            vec!["map", "lambda x: x", "--range", "2", "--after", "x"],
            "not a job id",
        ),
        (vec!["abort", "0"], "already finished"),
        (
            vec!["history", "--query", "{\"when\": 1}"],
            "unknown key 'when'",
        ),
        (
            vec!["history", "--since", "yesterday"],
            "not a span of time",
        ),
        (vec!["purge"], "--before 7d"),
    ] {
        let run = c.starling(&args);
        assert!(
            run.fails().stderr.contains(says),
            "{args:?}: {}",
            run.stderr
        );
    }
    let purged = c.starling(&["purge", "--all"]);
    assert!(
        purged.ok().stdout.contains("deleted 4 finished jobs"),
        "{}",
        purged.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_tasks_queued_behind_a_stubborn_one_never_run_on_its_replacement_kernel() {
    let c = Cluster::up("stubborn", 1);
    let client = c.client().await;
    let dir = c.home_path().join("marks");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();
    // Item 0 marks that it started, then swallows every interrupt; the others mark that
    // they ran.
    let f = format!(
        "def f(x):\n    import time\n    open(f'{d}/ran-{{x}}', 'w').close()\n    while x == 0:\n        try:\n            time.sleep(60)\n        except KeyboardInterrupt:\n            pass\n    return x\n"
    );
    let ar = client
        .load_balanced()
        .chunksize(1)
        .map_with(
            starling::proto::Mapper::Python(starling::proto::Func::from_source(&f, "f")),
            (0..4).map(Value::from).collect(),
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || dir.join("ran-0").exists()).await);
    ar.abort(true).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), ar.wait(None))
        .await
        .is_ok());
    // The kernel is killed after the grace and replaced; what came after item 0 in its batch
    // was aborted too, and does not run on the new kernel.
    let after = client.all().execute("'f' in globals()").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), after.get())
        .await
        .expect("the engine works again")
        .unwrap();
    assert_eq!(got, vec![Value::from(false)], "a new kernel");
    let ran: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ran, vec!["ran-0".to_string()], "nothing aborted ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_map_is_restarted_and_the_map_completes_with_every_result() {
    let c = Cluster::up("phoenix", 2);
    c.starling(&["px", "x = 41"]).ok();
    let ids = c.starling(&["ids"]).ok().stdout.clone();
    let store = c.task_store();

    // A restart of a healthy controller: same engines, same namespaces, same store.
    let r = c.starling(&["restart"]);
    r.ok();
    assert!(
        r.stdout
            .starts_with("controller of cluster 'phoenix' restarted (pid ")
            && r.stdout.contains("2 engines [0, 1] back in"),
        "{}",
        r.stdout
    );
    assert_eq!(c.starling(&["ids"]).ok().stdout, ids);
    assert!(c.starling(&["px", "x + 1"]).ok().stdout.contains("42"));

    // A map of 600 items of ~10 ms, one per task: the controller is killed while it runs, and
    // while a client waits for it.
    let job = c
        .starling(&[
            "map",
            "lambda x: __import__('time').sleep(0.01) or x * x",
            "--range",
            "600",
            "--chunksize",
            "1",
            "--noblock",
            "--output",
            "json",
        ])
        .ok()
        .json()["job"]
        .as_u64()
        .expect("a job id");
    let controller = c.starling(&["status", "--output", "json"]).ok().json()["controller_pid"]
        .as_u64()
        .expect("the controller's pid") as u32;
    let mut waiter = std::process::Command::new(crate::common::STARLING)
        .args([
            "result",
            &job.to_string(),
            "--progress",
            "--cluster",
            "phoenix",
        ])
        .env("STARLING_HOME", c.home_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(waiter.stderr.take().unwrap());
    let mut line = String::new();
    // Its first progress line: it is attached, and the map is well under way.
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert!(line.starts_with(&format!("job {job}: ")), "{line}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut said, &mut rest).unwrap();
    assert!(!waiter.wait().unwrap().success());
    assert!(
        rest.contains(&format!("while waiting for job {job}"))
            && rest.contains(&format!(
                "`starling result {job}` (in Python `rc.get_result({job})`) waits for it"
            )),
        "{rest}"
    );
    assert!(
        eventually(Duration::from_secs(10), || !c
            .processes()
            .contains(&controller))
        .await
    );
    let down = c.starling(&["ids"]);
    down.fails();
    assert!(
        down.stderr.contains("cannot reach the controller"),
        "{}",
        down.stderr
    );

    let r = c.starling(&["restart"]);
    r.ok();
    assert!(
        r.stdout.contains("2 engines [0, 1] back in"),
        "{}",
        r.stdout
    );

    // Every item, in order, and the job is recorded as done.
    let out = c
        .starling(&[
            "result",
            &job.to_string(),
            "--timeout",
            "60",
            "--output",
            "json",
        ])
        .ok()
        .json();
    let want: Vec<u64> = (0..600).map(|x| x * x).collect();
    assert_eq!(out, serde_json::json!(want));
    let history = c.starling(&["history", "--output", "json"]).ok().json();
    let row = history
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == job)
        .expect("the map is in the history")
        .clone();
    assert_eq!(row["status"], "ok", "{row}");
    assert_eq!(row["items"], 600, "{row}");

    // Engines kept their namespaces; jobs from before are readable; new ids are new; one store.
    assert!(c.starling(&["px", "x"]).ok().stdout.contains("41"));
    assert!(c.starling(&["result", "0"]).ok().stdout.is_empty());
    let next = c
        .starling(&["px", "--noblock", "1", "--output", "json"])
        .ok()
        .json()["job"]
        .as_u64()
        .unwrap();
    assert!(next > job, "job {next} after job {job}");
    assert_eq!(c.task_store(), store);
}
