//! The user session of the README, line by line, through the real CLI.

use crate::common::{Cluster, STARLING};

#[test]
fn the_readme_session_works_line_by_line() {
    let c = Cluster::new("session");
    let up = c.starling(&["up", "--local", "-n", "4"]);
    up.ok();
    assert!(
        up.stdout
            .contains("cluster 'session' is up: 4 engines [0, 1, 2, 3] registered"),
        "{}",
        up.stdout
    );

    assert_eq!(c.starling(&["ids"]).ok().stdout.trim(), "[0, 1, 2, 3]");

    let px = c.starling(&["px", "sum(range(101))"]);
    assert_eq!(
        px.ok().lines(),
        vec![
            "Out[0:1]: 5050",
            "Out[1:1]: 5050",
            "Out[2:1]: 5050",
            "Out[3:1]: 5050"
        ]
    );

    // Slices pick engines by position, like ipyparallel's --targets.
    let pids = c.starling(&["px", "--targets", ":-1", "import os; print(os.getpid())"]);
    let lines = pids.ok().lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let pid = line
            .strip_prefix(&format!("[stdout:{i}] "))
            .unwrap_or_else(|| panic!("{line}"));
        assert!(pid.parse::<u32>().is_ok(), "{line}");
    }

    // State persists per engine.
    c.starling(&["px", "--targets", "1", "x = 10"]).ok();
    let x = c.starling(&["px", "--targets", "1", "x"]);
    assert!(
        x.ok().stdout.starts_with("Out[1:") && x.stdout.trim_end().ends_with("]: 10"),
        "{}",
        x.stdout
    );
    let missing = c.starling(&["px", "--targets", "2", "x"]);
    assert!(
        missing
            .fails()
            .stdout
            .contains("[2:error] NameError: name 'x' is not defined"),
        "{}",
        missing.stdout
    );

    // Non-blocking: returns at once with a job id; `result` waits and prints the outputs.
    let nb = c.starling(&[
        "px",
        "--noblock",
        "import time, os; time.sleep(1); os.getpid()",
    ]);
    let text = nb.ok().stdout.clone();
    assert!(
        text.starts_with("job ") && text.contains("submitted to engines [0, 1, 2, 3]"),
        "{text}"
    );
    let status = c.starling(&["status", "--output", "json"]).ok().json();
    assert_eq!(
        (&status["running"], &status["queued"]),
        (&serde_json::json!(4), &serde_json::json!(0)),
        "the sleeping job is running on every engine, nothing waits: {status}"
    );
    let res = c.starling(&["result"]);
    let outs: Vec<&str> = res
        .ok()
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("Out["))
        .collect();
    assert_eq!(outs.len(), 4, "{}", res.stdout);

    // Shell kernel.
    let sh = c.starling(&["px", "--sh", "hostname; echo engine=$STARLING_ENGINE_ID"]);
    for i in 0..4 {
        assert!(
            sh.ok().stdout.contains(&format!("engine={i}")),
            "{}",
            sh.stdout
        );
    }
    let sh_fail = c.starling(&["px", "--sh", "--targets", "0", "echo oops >&2; exit 3"]);
    assert!(
        sh_fail.fails().stdout.contains("[stderr:0] oops"),
        "{}",
        sh_fail.stdout
    );
    assert!(
        sh_fail
            .stdout
            .contains("[0:error] ShellError: the command exited with status 3"),
        "{}",
        sh_fail.stdout
    );

    // Status: one row per engine with id, host, pid, state and tasks done.
    let st = c.starling(&["status"]);
    let text = st.ok().stdout.clone();
    assert!(
        text.starts_with("cluster 'session': controller pid "),
        "{text}"
    );
    assert!(
        text.contains("4 engines, 0 tasks running, 0 queued"),
        "{text}"
    );
    let rows: Vec<&str> = text.lines().skip(2).collect();
    assert_eq!(rows.len(), 4, "{text}");
    assert!(
        rows.iter()
            .all(|r| r.contains("127.0.0.1") && r.contains("idle")),
        "{text}"
    );

    let json = c.starling(&["status", "--output", "json"]).ok().json();
    let engines = json["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 4);
    assert!(engines[1]["tasks_done"].as_u64().unwrap() >= 5, "{json}");

    // down: nothing of ours remains.
    assert!(!c.processes().is_empty());
    let down = c.starling(&["down"]);
    assert!(
        down.ok().stdout.contains("cluster 'session' is down"),
        "{}",
        down.stdout
    );
    assert!(
        c.processes().is_empty(),
        "processes left after down: {:?}",
        c.processes()
    );
    assert!(!c.connection_file().exists());
    let after = c.starling(&["ids"]);
    assert!(
        after
            .fails()
            .stderr
            .contains("there is no cluster 'session'"),
        "{}",
        after.stderr
    );
}

#[test]
fn json_output_is_one_document_for_scripts() {
    let c = Cluster::up("jsonout", 2);
    assert_eq!(
        c.starling(&["ids", "--output", "json"]).ok().json(),
        serde_json::json!([0, 1])
    );
    let px = c
        .starling(&["px", "--output", "json", "[1, 'a', None]"])
        .ok()
        .json();
    assert_eq!(px[0]["value"], serde_json::json!([1, "a", null]));
    assert_eq!(px[1]["display"], "[1, 'a', None]");
    let nb = c
        .starling(&["px", "--noblock", "--output", "json", "(1, 2)"])
        .ok()
        .json();
    let job = nb["job"].as_u64().unwrap();
    let res = c
        .starling(&["result", &job.to_string(), "--output", "json"])
        .ok()
        .json();
    assert_eq!(
        res[0]["value"],
        serde_json::json!([1, 2]),
        "a tuple shows as a list: {res}"
    );
    assert_eq!(res[0]["display"], "(1, 2)");
    // Nested, and in maps; what has no JSON form at all still shows its repr.
    let px = c
        .starling(&[
            "px",
            "--targets",
            "0",
            "--output",
            "json",
            "{'a': (1, [2, (3,)])}",
        ])
        .ok()
        .json();
    assert_eq!(px[0]["value"], serde_json::json!({"a": [1, [2, [3]]]}));
    let map = c
        .starling(&[
            "map",
            "lambda x: (x, str(x))",
            "--range",
            "2",
            "--output",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(map, serde_json::json!([[0, "0"], [1, "1"]]));
    let set = c
        .starling(&["px", "--targets", "0", "--output", "json", "{1, 2}"])
        .ok()
        .json();
    assert_eq!(set[0]["value"], serde_json::json!({"repr": "{1, 2}"}));
    let list = c.starling_raw(&["list", "--output", "json"]).ok().json();
    assert_eq!(list[0]["name"], "jsonout");
    assert_eq!(list[0]["state"], "running");
}

#[test]
fn the_only_cluster_is_found_without_naming_it_and_two_need_a_name() {
    let a = Cluster::up("first", 1);
    assert_eq!(a.starling_raw(&["ids"]).ok().stdout.trim(), "[0]");
    // A second cluster in the same home.
    let b = a.starling_raw(&["up", "--local", "-n", "1", "--name", "second"]);
    b.ok();
    let either = a.starling_raw(&["ids"]);
    assert!(
        either
            .fails()
            .stderr
            .contains("there are 2 clusters (first, second); say which with --cluster NAME"),
        "{}",
        either.stderr
    );
    assert_eq!(
        a.starling_raw(&["ids", "--cluster", "second"])
            .ok()
            .stdout
            .trim(),
        "[0]"
    );
    let conn = a.home_path().join("clusters/second/connection.json");
    assert_eq!(
        a.starling_raw(&["ids", "--connection", conn.to_str().unwrap()])
            .ok()
            .stdout
            .trim(),
        "[0]"
    );
    a.starling_raw(&["down", "--cluster", "second"]).ok();
}

#[test]
fn result_with_a_timeout_says_how_far_the_job_got() {
    let c = Cluster::up("slowjob", 1);
    c.starling(&["px", "--noblock", "import time; time.sleep(3)"])
        .ok();
    let r = c.starling(&["result", "--timeout", "0.2"]);
    assert!(
        r.fails()
            .stderr
            .contains("is not done after 0.2 s (0 of 1 tasks finished)"),
        "{}",
        r.stderr
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = c.client().await;
        let st = client.status().await.unwrap();
        assert_eq!(st.engines[0].state, starling::proto::EngineState::Busy);
    });
}

#[test]
fn px_shows_what_a_task_prints_while_it_runs() {
    use std::io::BufRead as _;
    let c = Cluster::up("streams", 1);
    let flag = c.workdir().join("shown");
    // The task prints, then waits until `px` has shown that line: it ends (and px with it)
    // only if the line came out while the task ran.
    let code = format!(
        "import os, time\nprint('first')\ndeadline = time.monotonic() + 30\nwhile not os.path.exists({flag:?}):\n    assert time.monotonic() < deadline, 'px never showed the first line'\n    time.sleep(0.01)\nprint('second')\n'done'"
    );
    let mut child = std::process::Command::new(STARLING)
        .args(["px", &code, "--cluster", "streams"])
        .env("STARLING_HOME", c.home_path())
        .current_dir(c.workdir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(30));
    assert_eq!(first.as_deref(), Ok("[stdout:0] first"));
    std::fs::write(&flag, "").unwrap();
    let rest: Vec<String> = rx.iter().collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    // The rest once, after it, then the value; nothing shown twice.
    assert_eq!(rest, ["[stdout:0] second", "Out[0:1]: 'done'"]);

    // As JSON (for scripts), all of it at the end, as before (the flag is there already).
    let r = c.starling(&["px", &code, "--output", "json"]);
    assert_eq!(r.ok().json()[0]["stdout"], "first\nsecond\n");
}

#[test]
fn px_reads_code_from_stdin_or_a_file_and_a_closed_pipe_ends_it_quietly() {
    let c = Cluster::up("pipes", 2);
    let bin = std::path::Path::new(STARLING).parent().unwrap();
    let sh = |script: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("STARLING_HOME", c.home_path())
            .env("STARLING_CLUSTER", "pipes")
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap()
    };
    let out = sh("printf 'x = 20\\nx + 1\\n' | starling px -");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("]: 21"),
        "{out:?}"
    );
    let file = c.home_path().join("code.py");
    std::fs::write(&file, "import os\nx * 2\n").unwrap();
    let r = c.starling(&["px", "--file", file.to_str().unwrap(), "--targets", "0"]);
    assert!(r.ok().stdout.contains("]: 40"), "{}", r.stdout);
    let r = c.starling(&["px"]);
    assert!(r.fails().stderr.contains("--file"), "{}", r.stderr);

    // `| head -1`: the reader goes away; starling ends with 141 like any pipeline member.
    let out = sh(
        "starling map 'lambda x: x' --range 20000 --output jsonl | head -1; echo \"status ${PIPESTATUS[0]}\"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.lines().next(), Some("0"), "{stdout}");
    assert!(stdout.contains("status 141"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // `list` shows a local cluster's engines and age.
    let r = c.starling_raw(&["list", "--output", "json"]);
    let doc = r.ok().json();
    let me = doc
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "pipes")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(me["engines"], 2, "{doc}");
    assert!(me["age_s"].is_u64(), "{doc}");
}

#[test]
fn help_and_messages_speak_to_a_newcomer() {
    let c = Cluster::new("newcomer");
    // `--output` is the format; a file name there points to init's -o.
    let r = c.starling_raw(&["init", "--output", "spec.yaml"]);
    assert!(
        r.fails()
            .stderr
            .contains("'spec.yaml' is not an output format (text, json or jsonl); `init` writes its spec to the file named by -o FILE"),
        "{}",
        r.stderr
    );
    // A command's own options first; the EC2/SSH ones under their own heading.
    let help = c.starling_raw(&["px", "--help"]);
    let text = &help.ok().stdout;
    let heading = text
        .find("Options for clusters on EC2 and SSH hosts:")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(text.find("--noblock").unwrap() < heading, "{text}");
    assert!(text.find("--region").unwrap() > heading, "{text}");
    // One engine is one engine.
    let up = c.starling_raw(&["up", "--local", "-n", "1", "--name", "newcomer"]);
    assert!(
        up.ok().stdout.contains("is up: 1 engine [0] registered"),
        "{}",
        up.stdout
    );
}

#[test]
fn the_node_commands_reach_a_local_clusters_node_on_this_machine() {
    let c = Cluster::up("nodecmds", 1);
    let workdir = c.workdir().display().to_string();
    // The node's shell starts where its kernels work: the directory `up` ran in.
    let exec = c.starling_raw(&["exec", "nodecmds", "pwd; echo \"$STARLING_HOME\""]);
    assert_eq!(
        exec.ok().lines(),
        [
            format!("master: {workdir}"),
            format!("master: {}", c.home_path().display())
        ]
    );
    let failed = c.starling_raw(&["exec", "nodecmds", "echo half; exit 3"]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(
        failed
            .stderr
            .contains("master: exit status 3:\nmaster: half"),
        "{}",
        failed.stderr
    );

    let src = c.home_path().join("data.txt");
    std::fs::write(&src, "forty-two\n").unwrap();
    let put = c.starling_raw(&["put", "nodecmds", src.to_str().unwrap(), "inbox/data.txt"]);
    put.ok();
    assert_eq!(
        std::fs::read_to_string(c.workdir().join("inbox/data.txt")).unwrap(),
        "forty-two\n"
    );
    let back = c.home_path().join("back.txt");
    c.starling_raw(&["get", "nodecmds", "inbox/data.txt", back.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "forty-two\n");

    // What only clusters on other machines, or EC2 clusters, have: a typed refusal each.
    for (args, says) in [
        (
            vec!["ssh", "nodecmds"],
            "`ssh` is for clusters on other machines; 'nodecmds' is a local cluster",
        ),
        (
            vec!["connect", "nodecmds"],
            "`connect` is for clusters on other machines; 'nodecmds' is a local cluster",
        ),
        (
            vec!["add-node", "nodecmds"],
            "`add-node` is for EC2 clusters; 'nodecmds' is a local cluster",
        ),
        (
            vec!["stop", "nodecmds"],
            "`stop` is for EC2 clusters; 'nodecmds' is a local cluster",
        ),
    ] {
        let r = c.starling_raw(&args);
        assert!(r.fails().stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    assert_eq!(c.starling(&["ids"]).ok().stdout.trim(), "[0]");
}
