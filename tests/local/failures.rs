//! What goes wrong: dead kernels, lost engines, clusters that died, `up` twice.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use starling::client::ClientError;
use starling::proto::{EngineId, Outcome, Value};

use crate::common::{eventually, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_kernel_is_reported_and_replaced_and_the_engine_keeps_its_id() {
    let c = Cluster::up("deadkernel", 2);
    let client = c.client().await;
    let before = client.status().await.unwrap();
    client
        .all()
        .execute("x = 'kept'")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();

    let ar = client
        .direct(EngineId(1))
        .execute("import os; os._exit(1)")
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors[0].engine, EngineId(1));
    assert_eq!(err.errors[0].error.ename, "KernelDied");
    assert!(
        err.errors[0]
            .error
            .evalue
            .contains("the kernel of engine 1 exited with status 1 while running this task"),
        "{}",
        err.errors[0].error.evalue
    );

    // Engine 1 is back with a fresh kernel (and an empty namespace); engine 0 kept its state.
    let ar = client
        .all()
        .execute("globals().get('x', 'fresh')")
        .await
        .unwrap();
    assert_eq!(
        ar.get().await.unwrap(),
        vec![Value::Json(json!("kept")), Value::Json(json!("fresh"))]
    );
    assert_eq!(client.ids().await.unwrap(), vec![EngineId(0), EngineId(1)]);
    let after = client.status().await.unwrap();
    assert_eq!(after.engines[0].pid, before.engines[0].pid);
    assert_ne!(
        after.engines[1].pid, before.engines[1].pid,
        "status shows the new kernel's pid"
    );

    // A kernel killed by a signal, with tasks queued behind the fatal one: they run on the new kernel.
    let pid = after.engines[0].pid;
    let ar = client
        .direct(EngineId(0))
        .execute("import time; time.sleep(30)")
        .await
        .unwrap();
    let queued = client.direct(EngineId(0)).execute("'after'").await.unwrap();
    assert!(eventually(Duration::from_secs(5), || c.processes().contains(&pid)).await);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert!(
        err.errors[0]
            .error
            .evalue
            .contains("was killed by signal 9 (SIGKILL)"),
        "{}",
        err.errors[0].error.evalue
    );
    assert_eq!(
        queued.get().await.unwrap(),
        vec![Value::Json(json!("after"))]
    );
}

/// The `starlingd engine` process that hosts `engine`, from `status`.
async fn process_of(client: &starling::client::Client, engine: u32) -> Pid {
    let st = client.status().await.unwrap();
    let e = st
        .engines
        .iter()
        .find(|e| e.id == EngineId(engine))
        .expect("the engine is registered");
    Pid::from_raw(e.process_pid as i32)
}

/// A map of `n` items taking 10 ms each: its expected result, and the function.
const SLOW_SQUARE: &str = "lambda x: (__import__('time').sleep(0.01), x * x)[1]";

fn squares(n: u64) -> Vec<Value> {
    (0..n).map(|x| Value::from(x * x)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_engine_is_lost_then_comes_back_with_its_id_namespace_and_no_work_lost() {
    let c = Cluster::new("lostengine");
    let spec = c.home_path().join("fast.yaml");
    std::fs::write(
        &spec,
        "name: lostengine\nengines_per_node: 2\nheartbeat_ms: 200\n",
    )
    .unwrap();
    c.starling_raw(&["up", "-f", spec.to_str().unwrap()]).ok();
    let client = c.client().await;
    client
        .all()
        .execute("kept = 'mine'")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    let stalled = process_of(&client, 0).await;

    // Direct work on the stalled engine cannot move: it fails, naming the engine and why.
    let direct = client
        .direct(vec![EngineId(0)])
        .execute("import time; time.sleep(20)")
        .await
        .unwrap();
    let map = client
        .load_balanced()
        .chunksize(1)
        .map(SLOW_SQUARE, (0..300u64).map(Value::from).collect())
        .await
        .unwrap();
    kill(stalled, Signal::SIGSTOP).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), direct.get()).await;
    let ClientError::Remote(err) = outcome.expect("the loss is noticed in time").unwrap_err()
    else {
        panic!()
    };
    assert_eq!(err.errors[0].error.ename, "EngineLost");
    assert!(
        err.errors[0]
            .error
            .evalue
            .contains("engine 0 (node master, host 127.0.0.1) was lost: no heartbeat for"),
        "{}",
        err.errors[0].error.evalue
    );
    let st = c.starling(&["status"]);
    assert!(
        st.ok().stdout.contains("1 engine (1 lost)") && st.stdout.contains("lost    0"),
        "{}",
        st.stdout
    );

    // Back: the same id, the same kernel and namespace; the map lost nothing.
    let cont = std::time::Instant::now();
    kill(stalled, Signal::SIGCONT).unwrap();
    let mut back = false;
    while cont.elapsed() < Duration::from_secs(20) {
        if client.ids().await.unwrap() == vec![EngineId(0), EngineId(1)] {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "engine 0 is back: {:?}", client.ids().await);
    eprintln!(
        "a stalled engine was back {:.2} s after SIGCONT",
        cont.elapsed().as_secs_f64()
    );
    let got = tokio::time::timeout(Duration::from_secs(60), map.get())
        .await
        .expect("the map completes")
        .expect("no item failed");
    assert_eq!(got, squares(300));
    let kept = client
        .direct(vec![EngineId(0)])
        .execute("kept")
        .await
        .unwrap();
    assert_eq!(kept.get().await.unwrap(), vec![Value::from("mine")]);
    let st = client.status().await.unwrap();
    assert!(st.lost.is_empty(), "{:?}", st.lost);
    let e0 = &st.engines[0];
    assert_eq!(e0.returns, 1);
    assert!(
        e0.last_lost
            .as_deref()
            .unwrap_or("")
            .contains("no heartbeat"),
        "{e0:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_process_killed_mid_map_is_restarted_under_its_id_and_the_map_completes() {
    let c = Cluster::up("killed", 2);
    let client = c.client().await;
    for chunksize in [Some(1), None] {
        let victim = process_of(&client, 1).await;
        let mut view = client.load_balanced();
        if let Some(cs) = chunksize {
            view = view.chunksize(cs);
        }
        let n = 10_000;
        let map = view
            .map(
                "lambda x: (__import__('time').sleep(0.001), x * x)[1]",
                (0..n).map(Value::from).collect(),
            )
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || map.progress().0 >= 500).await,
            "the map is under way"
        );
        kill(victim, Signal::SIGKILL).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(90), map.get())
            .await
            .expect("the map completes")
            .unwrap_or_else(|e| panic!("chunksize {chunksize:?}: {e}"));
        assert_eq!(got, squares(n), "chunksize {chunksize:?}");
        // What the killed engine held ran again, and says so.
        let again = map.results().iter().filter(|r| r.attempts == 2).count();
        assert!(again >= 1, "chunksize {chunksize:?}: attempts recorded");
        // A new engine process, the same id.
        let mut restarted = false;
        for _ in 0..500 {
            let ids = client.ids().await.unwrap();
            if ids == vec![EngineId(0), EngineId(1)] && process_of(&client, 1).await != victim {
                restarted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(restarted, "engine 1 runs in a new process");
    }
    let st = client.status().await.unwrap();
    assert_eq!(st.engines[1].returns, 2);
    let r = client
        .all()
        .execute("1 + 1")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(r, vec![Value::from(2), Value::from(2)]);
}

#[test]
fn up_twice_is_a_clear_error_and_down_of_a_dead_cluster_cleans_up() {
    let c = Cluster::up("twice", 1);
    let again = c.starling(&["up", "--local", "-n", "1"]);
    assert!(
        again
            .fails()
            .stderr
            .contains("error: cluster 'twice' is already running (controller pid "),
        "{}",
        again.stderr
    );
    assert!(
        again.stderr.contains(
            "use `starling down --cluster twice` first, or pick another name with --name"
        ),
        "{}",
        again.stderr
    );
    assert_eq!(
        c.starling(&["ids"]).ok().stdout.trim(),
        "[0]",
        "the running cluster is untouched"
    );

    // Every process dies behind starling's back.
    for pid in c.processes() {
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(eventually(Duration::from_secs(5), || c
        .processes()
        .is_empty())));
    let ids = c.starling(&["ids"]);
    assert!(
        ids.fails()
            .stderr
            .contains("cannot reach the controller of cluster 'twice'"),
        "{}",
        ids.stderr
    );
    let down = c.starling(&["down"]);
    assert!(
        down.ok().stdout.contains(
            "cluster 'twice' was not running (its processes had already exited); removed its files"
        ),
        "{}",
        down.stdout
    );
    assert!(!c.connection_file().exists());

    // And it can come up again under the same name.
    c.starling(&["up", "--local", "-n", "1"]).ok();
    assert_eq!(c.starling(&["ids"]).ok().stdout.trim(), "[0]");
}

#[test]
fn up_refuses_bad_specs_with_file_line_and_column() {
    let c = Cluster::new("badspec");
    let spec = c.home_path().join("bad.yaml");
    std::fs::write(&spec, "name: badspec\nengines: 4\n").unwrap();
    let r = c.starling_raw(&["up", "-f", spec.to_str().unwrap()]);
    assert!(
        r.fails().stderr.contains(&format!(
            "error: {}:2:1: unknown field `engines`",
            spec.display()
        )),
        "{}",
        r.stderr
    );
    let r = c.starling_raw(&["up", "--local", "--name", "Bad Name"]);
    assert!(
        r.fails()
            .stderr
            .contains("'Bad Name' is not a valid cluster name"),
        "{}",
        r.stderr
    );
    let r = c.starling_raw(&["up", "-f", "/nonexistent/spec.yaml"]);
    assert!(
        r.fails()
            .stderr
            .contains("cannot read the cluster spec /nonexistent/spec.yaml"),
        "{}",
        r.stderr
    );
    assert!(c.processes().is_empty());
}

#[test]
fn a_missing_python_fails_up_with_the_reason_and_leaves_nothing() {
    let c = Cluster::new("nopython");
    let spec = c.home_path().join("nopy.yaml");
    std::fs::write(
        &spec,
        "name: nopython\nengines_per_node: 2\npython: /nonexistent/python3\n",
    )
    .unwrap();
    // Bootstrap's Python check says why the engines cannot start: `up` fails at once, not
    // after its 60 s wait.
    let started = std::time::Instant::now();
    let r = c.starling_raw(&["up", "-f", spec.to_str().unwrap()]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "up failed after {:?}",
        started.elapsed()
    );
    assert!(
        r.fails().stderr.contains(
            "master (127.0.0.1): checking python: exit status 97:\nno /nonexistent/python3 on the PATH; install Python 3.8 or newer, or name the one to use with `python:` in the spec"
        ),
        "{}",
        r.stderr
    );
    assert!(c.processes().is_empty(), "{:?}", c.processes());
    assert!(!c.connection_file().exists());
}

#[test]
fn user_output_cannot_corrupt_the_protocol() {
    let c = Cluster::up("noisy", 1);
    let code = "import os, sys\nos.write(1, b'{\"ok\": true}\\n')\nos.write(2, b'garbage\\n')\nsys.__stdout__.write('more\\n')\nprint('x' * 100000)\n'fine'";
    let r = c.starling(&["px", "--output", "json", code]).ok().json();
    assert_eq!(r[0]["value"], "fine");
    // What the task wrote to fds 1 and 2 is its output, like what it printed; never a result.
    let stdout = r[0]["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("{\"ok\": true}\n"), "{}", &stdout[..40]);
    assert!(stdout.contains("more\n"));
    assert!(stdout.ends_with(&format!("{}\n", "x".repeat(100_000))));
    assert_eq!(r[0]["stderr"], "garbage\n");
    let again = c
        .starling(&["px", "input() if False else 'still fine'"])
        .ok()
        .stdout
        .clone();
    assert!(again.contains("'still fine'"), "{again}");
    let r = c.starling(&["px", "input()"]);
    assert!(
        r.fails().stdout.contains("EOFError"),
        "stdin is closed for kernels: {}",
        r.stdout
    );
    let _ = Outcome::Ok {
        value: Value::Json(json!(null)),
        display: None,
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_limit_fails_what_is_too_large_and_nothing_else() {
    let c = Cluster::new("bigframes");
    let spec = c.home_path().join("small.yaml");
    std::fs::write(
        &spec,
        "name: bigframes\nengines_per_node: 1\nmax_frame_mb: 1\n",
    )
    .unwrap();
    c.starling_raw(&["up", "-f", spec.to_str().unwrap()]).ok();
    let client = c.client().await;

    // A submission larger than the limit is refused before it leaves, with the fix.
    let items: Vec<Value> = (0..300_000).map(Value::from).collect();
    let err = client
        .load_balanced()
        .map("lambda x: x", items)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("above the cluster's frame limit of 1 MiB"),
        "{err}"
    );

    // A result larger than the limit fails its own task; the engine and the connection live on.
    let ar = client.all().execute("'x' * 3_000_000").await.unwrap();
    let ClientError::Remote(e) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(
        e.errors[0].error.ename, "ResultTooLarge",
        "{}",
        e.errors[0].error
    );
    let ok = client
        .all()
        .execute("'still here'")
        .await
        .unwrap()
        .get()
        .await
        .unwrap();
    assert_eq!(ok, vec![Value::Json(json!("still here"))]);
    assert_eq!(client.ids().await.unwrap(), vec![EngineId(0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernels_survive_odd_text_forks_and_extreme_targets() {
    let c = Cluster::up("oddities", 2);
    let client = c.client().await;
    // A string with a lone surrogate (a file name that is not UTF-8) has no JSON form.
    let v = client
        .direct(EngineId(0))
        .execute("print('bad \\udcff name'); 'x\\udcff'")
        .await
        .unwrap();
    let got = v.get().await.unwrap().remove(0);
    assert_eq!(got.to_string(), "'x\\udcff'");
    assert_eq!(v.stdout()[0].1, "bad ? name\n");

    // A kernel that dies while a process it forked still holds its pipe is noticed.
    let ar = client
        .direct(EngineId(1))
        .execute(
            "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\nos._exit(7)",
        )
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(15), ar.get())
        .await
        .expect("noticed in time");
    let ClientError::Remote(err) = outcome.unwrap_err() else {
        panic!()
    };
    assert!(
        err.errors[0].error.evalue.contains("exited with status 7"),
        "{}",
        err.errors[0].error.evalue
    );
    assert_eq!(
        client
            .direct(EngineId(1))
            .execute("1")
            .await
            .unwrap()
            .get()
            .await
            .unwrap(),
        vec![Value::from(1)]
    );

    // Slices with absurd steps select what Python would.
    let r = c.starling(&["px", "--targets", "1::9223372036854775807", "1"]);
    assert_eq!(r.ok().lines(), vec!["Out[1:2]: 1"]);
    let r = c.starling(&["result", "--timeout=-1"]);
    assert!(
        r.fails().stderr.contains("'-1' is not a number of seconds"),
        "{}",
        r.stderr
    );
}

#[test]
fn down_with_someone_elses_connection_file_stops_nothing() {
    let mine = Cluster::up("local", 1);
    let theirs = Cluster::up("local", 1);
    let r = mine.starling_raw(&[
        "down",
        "--connection",
        theirs.connection_file().to_str().unwrap(),
    ]);
    assert!(
        r.fails()
            .stderr
            .contains("is not the connection file of a cluster started from this machine"),
        "{}",
        r.stderr
    );
    assert_eq!(mine.starling(&["ids"]).ok().stdout.trim(), "[0]");
    assert_eq!(theirs.starling(&["ids"]).ok().stdout.trim(), "[0]");
}

/// Runs `code` on one engine and returns the value of its final expression, or its error.
async fn px_one(
    client: &starling::client::Client,
    engine: u32,
    code: &str,
) -> Result<Value, String> {
    let ar = client.direct(EngineId(engine)).execute(code).await.unwrap();
    match ar.get().await {
        Ok(mut v) => Ok(v.remove(0)),
        Err(ClientError::Remote(e)) => Err(format!("{}", e.errors[0].error)),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_task_writes_into_the_kernel_protocol_never_become_results() {
    let c = Cluster::up("fdwrite", 1);
    let client = c.client().await;
    // The protocol's pipes are not on fds 3 and 4 any more, and close on exec: writing there
    // reaches nothing of the kernel's.
    let r = px_one(&client, 0, "import os\ntry:\n    os.write(4, b'{\"id\": 99}\\n')\nexcept OSError as e:\n    print(e)\n'after'").await;
    assert_eq!(r, Ok(Value::Json(json!("after"))));
    assert_eq!(px_one(&client, 0, "1 + 1").await, Ok(Value::Json(json!(2))));
    // A task that finds the real pipe and writes garbage into it kills its kernel, and is told
    // so; it is never read as a result, and the next task runs on a fresh kernel.
    let code = "import os\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n        if os.readlink('/proc/self/fd/' + fd).startswith('pipe:') and int(fd) > 4:\n            os.write(int(fd), b'\\x10\\0\\0\\0\\0\\0\\0\\0garbage garbage!')\n    except OSError:\n        pass\n'call3'";
    let r = px_one(&client, 0, code).await;
    match r {
        Err(e) => assert!(e.starts_with("KernelDied: "), "{e}"),
        // The write went to the request pipe, which only the kernel reads: harmless.
        Ok(v) => assert_eq!(v, Value::Json(json!("call3"))),
    }
    assert_eq!(
        px_one(&client, 0, "'next'").await,
        Ok(Value::Json(json!("next")))
    );
    assert_eq!(
        px_one(&client, 0, "'and next'").await,
        Ok(Value::Json(json!("and next")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_forks_and_exits_in_the_child_leaves_the_kernel_working() {
    let c = Cluster::up("forkexit", 1);
    let client = c.client().await;
    let code =
        "import os, sys\npid = os.fork()\nif pid == 0:\n    sys.exit(0)\nos.waitpid(pid, 0)[1]";
    assert_eq!(px_one(&client, 0, code).await, Ok(Value::Json(json!(0))));
    assert_eq!(
        px_one(&client, 0, "'still here'").await,
        Ok(Value::Json(json!("still here")))
    );
    // multiprocessing's fork children run their work and return as usual.
    let code = "import multiprocessing as mp\nwith mp.get_context('fork').Pool(2) as p:\n    r = p.map(abs, [-1, -2, -3])\nr";
    assert_eq!(
        px_one(&client, 0, code).await,
        Ok(Value::Json(json!([1, 2, 3])))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_of_a_name_that_does_not_exist_says_nameerror_for_every_item() {
    let c = Cluster::up("nosuchfunc", 2);
    let client = c.client().await;
    let items: Vec<Value> = (0..40).map(Value::from).collect();
    let ar = client
        .load_balanced()
        .chunksize(3)
        .map("nosuchfunc", items)
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors.len(), 40);
    for e in &err.errors {
        assert_eq!(e.error.ename, "NameError", "{}", e.error);
    }
}

#[test]
fn ranges_are_counted_before_any_item_is_made() {
    let c = Cluster::up("ranges", 1);
    // At the end of i64: one item, no overflow.
    let r = c.starling(&[
        "map",
        "lambda x: x",
        "--range",
        "9223372036854775806:9223372036854775807:5",
        "--output",
        "json",
    ]);
    assert_eq!(r.ok().json(), json!([i64::MAX - 1]));
    let r = c.starling(&[
        "map",
        "lambda x: x",
        "--range",
        "5:0:-2",
        "--output",
        "json",
    ]);
    assert_eq!(r.ok().json(), json!([5, 3, 1]));
    let r = c.starling(&["map", "lambda x: x", "--range", "3:3", "--output", "json"]);
    assert_eq!(r.ok().json(), json!([]));
    // Far more than one request holds: refused at once, saying how much would fit.
    let started = std::time::Instant::now();
    let r = c.starling(&["map", "lambda x: x", "--range", "10000000000"]);
    assert!(
        r.fails()
            .stderr
            .contains("--range 10000000000 has 10000000000 items"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("max_frame_mb"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = c.starling(&["map", "lambda x: x", "--range", "1:2:0"]);
    assert!(
        r.fails().stderr.contains("the step cannot be 0"),
        "{}",
        r.stderr
    );
    // The cluster did not notice any of it.
    let r = c.starling(&["px", "1 + 1"]);
    assert!(r.ok().stdout.contains("Out[0:"), "{}", r.stdout);
}

#[test]
fn down_stops_what_tasks_left_behind_removes_only_its_own_files_keeps_the_store_and_can_repeat() {
    let c = Cluster::up("cleanup", 1);
    // A task leaves a process behind that sheds everything a search by environment or
    // process group would find: a double fork, a new session, an empty environment.
    let escaped = c.starling(&[
        "px",
        "import subprocess; p = subprocess.run(['bash', '-c', 'setsid env -i sleep 300 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True); int(p.stdout)",
        "--output",
        "json",
    ]);
    let doc = escaped.ok().json();
    let pid = doc[0]["value"]
        .as_i64()
        .unwrap_or_else(|| panic!("a pid: {doc}")) as i32;
    // Once `setsid` and `env -i` have exec'd `sleep`, it has no environment at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the escaped process sheds its environment"
        );
        std::thread::yield_now();
    }

    // Someone edits the cluster's state to point at a directory that is not the cluster's.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), "keep me").unwrap();
    let state_path = c.home_path().join("clusters/cleanup/local.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["node_root"] = json!(outside.path());
    state["db"] = json!(outside.path().join("precious"));
    std::fs::write(&state_path, state.to_string()).unwrap();

    let down = c.starling(&["down"]);
    assert!(
        down.ok().stdout.contains("nothing of it remains"),
        "{}",
        down.stdout
    );
    // Gone, or a zombie its new parent (this machine's init) has not reaped yet.
    assert!(
        !starling::node::is_live(pid as u32),
        "the escaped process is gone"
    );
    assert!(c.processes().is_empty(), "{:?}", c.processes());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("precious")).unwrap(),
        "keep me"
    );
    // The task store outlives the cluster.
    let db = rusqlite::Connection::open(c.task_store()).unwrap();
    let jobs: i64 = db
        .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(jobs, 1, "the px job is recorded");

    // Again, by name and bare: nothing to do, and no error.
    let again = c.starling(&["down"]);
    assert!(
        again.ok().stdout.contains("nothing to take down"),
        "{}",
        again.stdout
    );
    let bare = c.starling_raw(&["down"]);
    assert!(
        bare.ok().stdout.contains("nothing to take down"),
        "{}",
        bare.stdout
    );
}

#[test]
fn up_refuses_more_engines_than_a_node_holds_and_takes_n_auto() {
    let c = Cluster::new("auto");
    let r = c.starling_raw(&["up", "--local", "-n", "100000", "--name", "auto"]);
    assert!(
        r.fails()
            .stderr
            .contains("-n 100000 is more engines than one node may host (1024)"),
        "{}",
        r.stderr
    );
    assert!(c.processes().is_empty());
    let r = c.starling_raw(&["up", "--local", "-n", "lots", "--name", "auto"]);
    assert!(
        r.fails()
            .stderr
            .contains("'lots' is not a whole number or \"auto\""),
        "{}",
        r.stderr
    );
    c.starling_raw(&["up", "--local", "-n", "auto", "--name", "auto"])
        .ok();
    let cores = std::thread::available_parallelism().unwrap().get();
    let ids = c.starling(&["ids", "--output", "json"]);
    assert_eq!(ids.ok().json().as_array().unwrap().len(), cores);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_at_the_fd_level_reaches_the_user_in_order_and_nothing_grows_unbounded() {
    let c = Cluster::up("fdout", 2);
    let r = c.starling(&[
        "px",
        "--targets",
        "0",
        "import os, subprocess; print('a'); os.system('echo b; echo e >&2'); subprocess.run(['echo', 'c']); print('d')",
    ]);
    assert_eq!(
        r.ok().stdout,
        "[stdout:0] a\nb\nc\nd\n[stderr:0] e\n",
        "{}",
        r.stdout
    );
    // C code's printf, buffered by libc, arrives with its task.
    let r = c.starling(&[
        "px",
        "--targets",
        "0",
        "import ctypes; ctypes.CDLL(None).printf(b'from C\\n'); 1",
    ]);
    assert!(r.ok().stdout.contains("[stdout:0] from C"), "{}", r.stdout);
    // A tuple that holds itself has no JSON form; it still comes back as its repr.
    let r = c.starling(&[
        "px",
        "--targets",
        "0",
        "--output",
        "json",
        "t = ([],); t[0].append(t); t",
    ]);
    assert_eq!(r.ok().json()[0]["value"]["repr"], "([(...)],)");
    // A task that writes far more than anyone reads: the first MiB, and how much was cut.
    let r = c.starling(&[
        "px",
        "--targets",
        "0",
        "import os; os.system('head -c 3000000 /dev/zero | tr \"\\\\0\" x')",
    ]);
    assert!(
        r.ok()
            .stdout
            .contains("[starling: 1951424 more bytes of this output were cut]"),
        "{}",
        &r.stdout[r.stdout.len().saturating_sub(300)..]
    );
    // Output between tasks (a thread that never stops) goes to the log, which stays bounded.
    c.starling(&[
        "px",
        "--targets",
        "1",
        "import threading, os\ndef spam():\n    while True:\n        os.write(1, b'y' * 65536)\nthreading.Thread(target=spam, daemon=True).start()",
    ])
    .ok();
    let logs = c.node_root().join("master/logs");
    assert!(
        eventually(Duration::from_secs(30), || logs
            .join("kernels.log.1")
            .exists())
        .await,
        "the log was rotated"
    );
    for _ in 0..3 {
        for f in ["kernels.log", "kernels.log.1"] {
            let len = std::fs::metadata(logs.join(f)).map_or(0, |m| m.len());
            assert!(
                len <= starling::engine::kernel::LOG_LIMIT,
                "{f}: {len} bytes"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The engine next to it works as before.
    let r = c.starling(&["px", "--targets", "0", "6 * 7"]);
    assert!(r.ok().stdout.contains("42"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_task_whose_kernel_dies_runs_again_and_fails_only_when_it_always_does() {
    let c = Cluster::up("kerneldies", 2);
    let client = c.client().await;
    let marker = c.home_path().join("died-once");
    // Item 3 kills its kernel the first time it runs, and only then.
    let once = format!(
        "lambda x: (open({m:?}, 'x').close(), __import__('os')._exit(1)) if x == 3 and not __import__('os').path.exists({m:?}) else x * x",
        m = marker.to_str().unwrap()
    );
    let got = client
        .load_balanced()
        .chunksize(1)
        .map(once.as_str(), (0..20u64).map(Value::from).collect())
        .await
        .unwrap()
        .get()
        .await
        .expect("the item ran again on a fresh kernel");
    assert_eq!(got, squares(20));
    assert!(marker.exists());

    // Item 5 kills every kernel it meets: it runs twice (task_attempts), then fails alone.
    let always = "lambda x: __import__('os')._exit(1) if x == 5 else x * x";
    let ar = client
        .load_balanced()
        .chunksize(1)
        .map(always, (0..20u64).map(Value::from).collect())
        .await
        .unwrap();
    let ClientError::Remote(err) = ar.get().await.unwrap_err() else {
        panic!()
    };
    assert_eq!(err.errors.len(), 1, "{err}");
    assert_eq!(err.errors[0].error.ename, "KernelDied");
    let values = ar.values();
    assert_eq!(values.iter().filter(|v| v.is_some()).count(), 20);
    // One kernel died for the first map, two for the second: item 5 ran twice, no more.
    let log = c.node_root().join("master/logs/engine.log");
    let replaced = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("kernel replaced")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || replaced() == 3).await,
        "{} kernels replaced",
        replaced()
    );
    let st = client.status().await.unwrap();
    assert_eq!(st.engines.len(), 2, "both engines are still there");
}

#[test]
fn a_node_keeps_the_starlingd_the_master_hands_it_only_if_its_checksum_is_right() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("starlingd");
    // 3 MB standing in for the binary (the debug build's is far larger).
    let bytes: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&shared, &bytes).unwrap();
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ));
    let mut server = Command::new(env!("CARGO_BIN_EXE_starlingd"))
        .args([
            "share",
            "--file",
            shared.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut words = line
        .strip_prefix("sharing ")
        .expect("its address and token")
        .split_whitespace();
    let (addr, token) = (words.next().unwrap(), words.next().unwrap());
    let fetch = |dest: &std::path::Path, token: &str, sha: &str| {
        let cmd = starling::bootstrap::share::fetch_command(
            "python3",
            addr,
            token,
            &starling::engine::shell_quote(dest.to_str().unwrap()),
            bytes.len(),
            sha,
        );
        Command::new("sh").args(["-c", &cmd]).output().unwrap()
    };

    // The right file arrives whole.
    let good = dir.path().join("good");
    let out = fetch(&good, token, &sha);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&good).unwrap(), bytes);

    // What does not match the checksum computed on the user's machine is refused, saying so.
    let corrupt = fetch(&dir.path().join("bad"), token, &"0".repeat(64));
    assert_eq!(
        corrupt.status.code(),
        Some(i32::from(starling::bootstrap::share::EXIT_CORRUPT))
    );
    let said = String::from_utf8_lossy(&corrupt.stderr);
    assert!(
        said.contains("has SHA-256") && said.contains(&sha) && said.contains("refused"),
        "{said}"
    );
    assert!(!dir.path().join("bad").exists(), "nothing refused is left");

    // Without the token, nothing is sent: a transfer cut short, which the caller answers by
    // uploading the file itself.
    let stranger = fetch(&dir.path().join("stranger"), "guess", &sha);
    assert_eq!(
        stranger.status.code(),
        Some(i32::from(starling::bootstrap::share::EXIT_UNREACHABLE))
    );
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        said.contains(&format!("sent 0 of the {} bytes", bytes.len())),
        "{said}"
    );
    let _ = server.kill();
    let _ = server.wait();

    // A master out of reach is told apart, so that the file is uploaded from here instead.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cmd = starling::bootstrap::share::fetch_command(
        "python3",
        &closed.to_string(),
        "t",
        &starling::engine::shell_quote(dir.path().join("none").to_str().unwrap()),
        bytes.len(),
        &sha,
    );
    let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(starling::bootstrap::share::EXIT_UNREACHABLE))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot fetch starlingd from the master"));
}
