//! A session with a node, over one of two transports: SSH (the `openssh` crate over the system
//! `ssh`, multiplexed; log in with retries until a deadline), or this machine's own `sh` for a
//! local cluster's node. Either way a script runs with `sh -c`, may be fed bytes on stdin
//! (uploads, secrets), and ends in its stdout or a typed [`CommandError`].

use std::path::PathBuf;
use std::time::Duration;

use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

/// How to reach a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    /// `master`, `node001`, …
    pub name: String,
    /// The address starling connects to (SSH and, on the master, the controller).
    pub ssh_host: String,
    /// The address other nodes reach this one at (the controller binds to it).
    pub private: String,
    pub port: u16,
    pub user: String,
}

impl std::fmt::Display for NodeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.ssh_host)
    }
}

/// How starling reaches a cluster's nodes.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Over SSH, logging in like this.
    Ssh(Login),
    /// The node is this machine (a local cluster): scripts run in [`local_shell`].
    Local,
}

impl Transport {
    pub fn is_local(&self) -> bool {
        matches!(self, Transport::Local)
    }
}

/// How starling logs in.
#[derive(Debug, Clone)]
pub struct Login {
    /// The private key; `None` uses the SSH agent and the user's ssh config.
    pub key_file: Option<PathBuf>,
    /// The cluster's own known_hosts file (new host keys are added, changed ones refused).
    pub known_hosts: PathBuf,
    /// How long to keep trying to log in to a node.
    pub timeout: Duration,
}

/// How long one login attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one of starling's own commands on a node may take (uploads included).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// The pause between login attempts.
const ATTEMPT_PAUSE: Duration = Duration::from_millis(500);

/// A session with a node: logged in over SSH, or on this machine.
pub struct Remote {
    session: Option<Session>,
    pub node: NodeTarget,
}

/// The text of an openssh error with its causes (ssh's own message is in the source).
fn describe(e: &openssh::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        let text = text.trim();
        if !text.is_empty() && !msg.contains(text) {
            msg = format!("{msg}: {text}");
        }
        source = s.source();
    }
    msg
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Why a command on a node did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// It ran and ended unsuccessfully: its exit status (`None`: killed by a signal) and what
    /// it wrote.
    Failed {
        status: Option<i32>,
        stdout: String,
        stderr: String,
    },
    /// It did not run to an end: no login, a broken session, or no answer in time.
    NotRun(String),
}

impl CommandError {
    /// The exit status, when the command ran and exited unsuccessfully.
    pub fn status(&self) -> Option<i32> {
        match self {
            CommandError::Failed { status, .. } => *status,
            CommandError::NotRun(_) => None,
        }
    }
}

impl std::fmt::Display for CommandError {
    /// `exit status N` (or `killed by a signal`) and the last lines the command wrote; or why
    /// it did not run.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Failed {
                status,
                stdout,
                stderr,
            } => {
                match status {
                    Some(code) => write!(f, "exit status {code}")?,
                    None => f.write_str("killed by a signal")?,
                }
                let sep = if stdout.is_empty() || stdout.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                let said = tail(&format!("{stdout}{sep}{stderr}"), 8);
                if said.is_empty() {
                    Ok(())
                } else {
                    write!(f, ":\n{said}")
                }
            }
            CommandError::NotRun(why) => f.write_str(why),
        }
    }
}

impl From<CommandError> for String {
    fn from(e: CommandError) -> Self {
        e.to_string()
    }
}

impl Remote {
    /// A session with `node` over `transport`.
    pub async fn open(node: &NodeTarget, transport: &Transport) -> Result<Self, String> {
        match transport {
            Transport::Ssh(login) => Self::connect(node, login).await,
            Transport::Local => Ok(Self {
                session: None,
                node: node.clone(),
            }),
        }
    }

    /// Logs in, retrying until `login.timeout` has passed (sshd may not be up yet, and on a
    /// fresh instance the key may not be installed yet). The error says what ssh said last.
    pub async fn connect(node: &NodeTarget, login: &Login) -> Result<Self, String> {
        let deadline = Instant::now() + login.timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut b = SessionBuilder::default();
            b.user(node.user.clone())
                .port(node.port)
                .known_hosts_check(KnownHosts::Add)
                .user_known_hosts_file(&login.known_hosts)
                .control_directory(std::env::temp_dir())
                .connect_timeout(left.clamp(Duration::from_secs(1), ATTEMPT_TIMEOUT))
                .server_alive_interval(Duration::from_secs(15))
                // Closed with the session; should starling be killed, it exits once idle.
                .control_persist(openssh::ControlPersist::IdleFor(
                    std::num::NonZeroUsize::new(60).expect("not zero"),
                ));
            if let Some(k) = &login.key_file {
                b.keyfile(k);
            }
            match b.connect_mux(&node.ssh_host).await {
                Ok(session) => {
                    return Ok(Self {
                        session: Some(session),
                        node: node.clone(),
                    })
                }
                Err(e) => {
                    let why = describe(&e);
                    if Instant::now() + ATTEMPT_PAUSE >= deadline {
                        let key = login.key_file.as_ref().map_or_else(
                            || "the SSH agent's keys".into(),
                            |k| k.display().to_string(),
                        );
                        return Err(format!(
                            "cannot log in as {} on port {} with {key} within {} s ({attempts} attempts); ssh said: {why}. Check `ssh.user`, `ssh.port` and `ssh.key_file`, and that the security group lets this machine reach the port",
                            node.user,
                            node.port,
                            login.timeout.as_secs()
                        ));
                    }
                    tracing::debug!("{node}: login attempt {attempts} failed: {why}");
                    tokio::time::sleep(ATTEMPT_PAUSE).await;
                }
            }
        }
    }

    /// Runs `script` with `sh -c`; its stdout, or an error with the exit status and the last
    /// lines it wrote. Gives up after [`COMMAND_LIMIT`].
    pub async fn run(&self, script: &str) -> Result<String, CommandError> {
        self.run_with_input(script, &[]).await
    }

    /// Runs `script` with the `input` parts, one after the other, on its stdin (uploads:
    /// `cat > FILE`, or `head -c LEN > FILE` for each of several); gives up after
    /// [`COMMAND_LIMIT`]. Secrets travel this way, never in the command line, which other
    /// users of a node could read.
    pub async fn run_with_input(
        &self,
        script: &str,
        input: &[&[u8]],
    ) -> Result<String, CommandError> {
        match tokio::time::timeout(COMMAND_LIMIT, self.run_unbounded(script, input)).await {
            Ok(r) => r,
            Err(_) => Err(CommandError::NotRun(format!(
                "no answer within {} s (the node or its network may be overloaded)",
                COMMAND_LIMIT.as_secs()
            ))),
        }
    }

    /// Runs `script` for as long as it takes (the spec's setup commands).
    pub async fn run_unbounded(
        &self,
        script: &str,
        input: &[&[u8]],
    ) -> Result<String, CommandError> {
        let not_run = |why: String| CommandError::NotRun(why);
        let piped = |piped: bool| {
            if piped {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            }
        };
        let Some(session) = &self.session else {
            let mut cmd = tokio::process::Command::from(local_shell());
            cmd.arg(script)
                .stdin(piped(!input.is_empty()))
                .stdout(piped(true))
                .stderr(piped(true))
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| not_run(format!("cannot run sh: {e}")))?;
            if let Some(stdin) = child.stdin.take() {
                feed(stdin, input).await?;
            }
            let out = child.wait_with_output().await;
            return ended(out.map_err(|e| not_run(e.to_string()))?);
        };
        let mut cmd = session.command("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(if input.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().await.map_err(|e| not_run(describe(&e)))?;
        if let Some(stdin) = child.stdin().take() {
            feed(stdin, input).await?;
        }
        let out = child.wait_with_output().await;
        ended(out.map_err(|e| not_run(describe(&e)))?)
    }

    /// Ends the session (and its ssh master process).
    pub async fn close(self) {
        if let Some(session) = self.session {
            let _ = session.close().await;
        }
    }
}

/// The shell a local cluster's node runs a command line in (the caller adds it): this
/// machine's `sh -c`, with `STARLING_HOME` set, so that the node's directory is where the rest
/// of starling here looks for it.
pub fn local_shell() -> std::process::Command {
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").env("STARLING_HOME", crate::home::home());
    sh
}

/// Writes the `input` parts, one after the other, to a command's stdin, and closes it.
async fn feed(
    mut stdin: impl tokio::io::AsyncWrite + Unpin,
    input: &[&[u8]],
) -> Result<(), CommandError> {
    for bytes in input {
        stdin.write_all(bytes).await.map_err(|e| {
            CommandError::NotRun(format!("sending {} bytes failed: {e}", bytes.len()))
        })?;
    }
    stdin
        .shutdown()
        .await
        .map_err(|e| CommandError::NotRun(e.to_string()))
}

/// A command's end as a result: its stdout, or how it failed.
fn ended(out: std::process::Output) -> Result<String, CommandError> {
    let text = |bytes: Vec<u8>| {
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    };
    let stdout = text(out.stdout);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(CommandError::Failed {
            status: out.status.code(),
            stdout,
            stderr: text(out.stderr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_says_its_status_and_the_last_lines_it_wrote() {
        let out = (1..=10)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let failed = CommandError::Failed {
            status: Some(97),
            stdout: out,
            stderr: "no python3 on the PATH\n".into(),
        };
        assert_eq!(failed.status(), Some(97));
        let text = failed.to_string();
        assert!(text.starts_with("exit status 97:\nline 4\n"), "{text}");
        assert!(text.ends_with("line 10\nno python3 on the PATH"), "{text}");
        let killed = CommandError::Failed {
            status: None,
            stdout: String::new(),
            stderr: String::new(),
        };
        assert_eq!(
            (killed.status(), killed.to_string().as_str()),
            (None, "killed by a signal")
        );
        let lost = CommandError::NotRun("no answer within 120 s".into());
        assert_eq!(lost.status(), None);
        assert_eq!(String::from(lost), "no answer within 120 s");
    }
}
