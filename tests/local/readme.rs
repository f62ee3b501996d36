//! The README's console sessions, run as written, so README and program cannot drift apart.
//!
//! Every ```console block that follows a `<!-- tested -->` line is run, in README order, on one
//! fresh `STARLING_HOME`: each `$ ` line runs with bash from the repository's root, and what it
//! prints (stdout and stderr) must match the lines below it. Numbers may differ (pids, times,
//! job ids), as may the width of the spaces between table columns; a `...` line stands for any
//! number of lines; `/home/me/.starling` stands for the test's home.

use std::path::Path;
use std::process::Command;

use crate::common::{Cluster, STARLING};

/// A command of a session and the output the README shows for it.
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The tested sessions of `text`, each as its steps.
fn sessions(text: &str) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- tested -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```console"),
            "<!-- tested --> goes right before a ```console block"
        );
        let mut steps: Vec<Step> = Vec::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            match line.strip_prefix("$ ") {
                Some(command) => steps.push(Step {
                    command: command.to_string(),
                    expected: Vec::new(),
                }),
                None => steps
                    .last_mut()
                    .expect("a tested block starts with a `$ ` command")
                    .expected
                    .push(line.to_string()),
            }
        }
        out.push(steps);
    }
    out
}

/// Digits become `#`, runs of spaces one space.
fn normalize(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.trim_end().chars() {
        let c = if c.is_ascii_digit() { '#' } else { c };
        if (c == '#' && out.ends_with('#')) || (c == ' ' && out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether `actual` matches `expected`, where a `...` line matches any number of lines.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "..." => (0..=actual.len()).any(|i| matches(rest, &actual[i..])),
        Some((e, rest)) => actual
            .split_first()
            .is_some_and(|(a, more)| a == e && matches(rest, more)),
    }
}

#[test]
fn the_readme_sessions_print_what_the_readme_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let sessions = sessions(&readme);
    assert!(sessions.len() >= 3, "the README has tested sessions");
    // The README's cluster is called `local`; the guard takes it down whatever happens.
    let c = Cluster::new("local");
    let bin = Path::new(STARLING).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let home = c.home_path().to_str().unwrap().to_string();
    let mut failures = Vec::new();
    for step in sessions.iter().flatten() {
        let out = Command::new("bash")
            .arg("-c")
            // A newline ends a trailing `# comment` before the redirection.
            .arg(format!("{{ {}\n}} 2>&1", step.command))
            .current_dir(root)
            .env("PATH", &path)
            .env("STARLING_HOME", &home)
            .env_remove("STARLING_CLUSTER")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .output()
            .expect("bash runs");
        let text = String::from_utf8_lossy(&out.stdout).replace(&home, "/home/me/.starling");
        let actual: Vec<String> = text.lines().map(normalize).collect();
        let expected: Vec<String> = step.expected.iter().map(|l| normalize(l)).collect();
        if !matches(&expected, &actual) {
            failures.push(format!(
                "$ {}\n--- the README shows ---\n{}\n--- it printed ---\n{}",
                step.command,
                step.expected.join("\n"),
                text.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_readme_shows_the_library_example_as_it_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/hello.rs")).unwrap();
    assert!(
        readme.contains(&format!("```rust\n{example}```")),
        "README's listing of examples/hello.rs differs from the file"
    );
}

#[test]
fn wildcards_and_numbers_match_as_documented() {
    let e = |v: &[&str]| v.iter().map(|l| normalize(l)).collect::<Vec<_>>();
    assert!(matches(
        &e(&["Out[0:1]: 5050", "...", "done in 0.12 s"]),
        &e(&["Out[0:7]: 5050", "Out[1:7]: 5050", "x", "done in 13.5 s"])
    ));
    assert!(matches(&e(&["a", "..."]), &e(&["a"])));
    assert!(!matches(&e(&["a"]), &e(&["a", "b"])));
    assert!(!matches(&e(&["pid 1 idle"]), &e(&["pid 1 busy"])));
    assert_eq!(normalize("   0  127.0.0.1      11368"), " # #.#.#.# #");
}
