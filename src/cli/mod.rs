//! The `starling` command line: clap commands and formatting, nothing more. Every command calls
//! the library ([`crate::provider`], [`crate::client`]); `run` can be called from tests.

/// `println!` for the command's output: when stdout is gone (`starling px ... | head -1`), the
/// program ends quietly with status 141, as a pipeline expects, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            crate::cli::stdout_failed(&e);
        }
    }};
}

mod nodes;
mod output;

/// Ends the program after stdout failed: quietly if the reader went away.
pub(crate) fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        eprintln!("error: cannot write the output: {e}");
    }
    std::process::exit(141)
}

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::client::{connection, AsyncResult, Client, ClientError};
use crate::home;
use crate::proto::{Dependency, Func, JobId, JobKind, JobOptions, Mapper, Targets, Value};
use crate::provider;
use crate::spec;

#[derive(Debug, Parser)]
#[command(
    name = "starling",
    version,
    about = "A compute cluster and a way to use it, in one breath"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The cluster to use (default: STARLING_CLUSTER, or the only one there is).
    #[arg(long, global = true, env = "STARLING_CLUSTER")]
    pub cluster: Option<String>,
    /// A connection file to use instead of looking the cluster up by name.
    #[arg(long, global = true, value_name = "FILE")]
    pub connection: Option<PathBuf>,
    /// Output format: text for people, json or jsonl for scripts.
    #[arg(long, global = true, value_name = "text|json|jsonl", value_parser = parse_format, default_value = "text")]
    pub output: Format,
    /// Log more (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// EC2 region, for clusters this machine did not start (default: AWS_REGION).
    #[arg(
        long,
        global = true,
        value_name = "REGION",
        help_heading = "Options for clusters on EC2 and SSH hosts"
    )]
    pub region: Option<String>,
    /// EC2 endpoint, e.g. LocalStack's (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        help_heading = "Options for clusters on EC2 and SSH hosts"
    )]
    pub endpoint_url: Option<String>,
    /// The SSH key to log in to nodes with (default: the spec's `ssh.key_file`).
    #[arg(
        short = 'i',
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Options for clusters on EC2 and SSH hosts"
    )]
    pub key_file: Option<PathBuf>,
}

/// `--output`'s value, with a pointer for those who meant a file.
fn parse_format(text: &str) -> Result<Format, String> {
    match text {
        "text" => Ok(Format::Text),
        "json" => Ok(Format::Json),
        "jsonl" => Ok(Format::Jsonl),
        other => Err(format!(
            "'{other}' is not an output format (text, json or jsonl); `init` writes its spec to the file named by -o FILE"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// One JSON document per line: per item for maps, per engine otherwise.
    Jsonl,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a starter cluster spec from a template (local, ec2, ec2-spot, localstack, ssh-hosts).
    Init(InitArgs),
    /// Start a cluster and wait until every engine has registered.
    Up(UpArgs),
    /// Take a cluster down: processes, and on EC2 its instances, security group and key pair.
    Down(NameArgs),
    /// Start the cluster's controller again (killed, hung or running): same address, same task
    /// store; unfinished jobs go on and engines reconnect by themselves.
    Restart(NameArgs),
    /// The ids of the registered engines.
    Ids,
    /// Run code on engines, like %px: Python by default, shell with --sh.
    Px(PxArgs),
    /// Wait for a job (the last non-blocking one by default) and print its outputs, like %pxresult.
    Result(ResultArgs),
    /// Map a function over items, load-balanced (or on fixed engines with --targets).
    Map(MapArgs),
    /// Drop a job's tasks that have not started; --interrupt stops its running ones too.
    Abort(AbortArgs),
    /// Send SIGINT to engines' kernels: what they run raises KeyboardInterrupt.
    Interrupt(InterruptArgs),
    /// Jobs in the task store: who ran what, when, and how it ended.
    History(HistoryArgs),
    /// Submit a job from the task store again, as a new job.
    Resubmit(ResubmitArgs),
    /// Delete finished jobs from the task store.
    Purge(PurgeArgs),
    /// Set names on engines from a JSON object: `push '{"a": 1}'`.
    Push(PushArgs),
    /// Read names from engines.
    Pull(PullArgs),
    /// Split items into one contiguous chunk per engine, set as NAME there.
    Scatter(ScatterArgs),
    /// Concatenate the lists named NAME on the engines, in engine order.
    Gather(GatherArgs),
    /// Nodes (instances or hosts), engines (id, host, pid, state, tasks done) and the queue.
    Status(NameArgs),
    /// Every cluster this machine knows, and every EC2 cluster in the region.
    List,
    /// Log in to a node (the master by default), or run a command there: `ssh NAME node001 -- uptime`.
    Ssh(SshArgs),
    /// Run a shell command on every node at once; output prefixed by node.
    Exec(ExecArgs),
    /// Run an MPI program over an MPI cluster's nodes, from its master and its hostfile:
    /// `mpirun NAME -n 6 -- python3 hello.py`.
    Mpirun(MpirunArgs),
    /// Copy a local file to every node (or those named with --node).
    Put(PutArgs),
    /// Copy a file from a node (the master by default) to this machine.
    Get(GetArgs),
    /// Launch K more nodes and bootstrap their engines into the running cluster (EC2).
    AddNode(AddNodeArgs),
    /// Stop a node's engines and terminate its instance (EC2).
    RemoveNode(RemoveNodeArgs),
    /// Stop the cluster's instances; their disks stay, `start` resumes them (EC2, EBS-backed).
    Stop(ClusterArg),
    /// Start a stopped cluster again: instances, controller and engines (EC2).
    Start(ClusterArg),
    /// Fetch a cluster's connection file from its master over SSH (for a teammate).
    Connect(ClusterArg),
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The cluster (default: --cluster, STARLING_CLUSTER, or the only one there is).
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct ClusterArg {
    /// The cluster.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    pub name: String,
    /// The node (default: master).
    pub node: Option<String>,
    /// A command to run instead of a login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct MpirunArgs {
    /// The cluster (default: --cluster, STARLING_CLUSTER, or the only one there is).
    pub name: Option<String>,
    /// Ranks to start (default: one per engine slot of every node).
    #[arg(short = 'n', long = "np", value_name = "N")]
    pub n: Option<u32>,
    /// The program and its arguments (after `--`), run in the login user's home (a local
    /// cluster: here). `starling put` gets a program to every node.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub name: String,
    /// The shell command.
    pub command: String,
    /// Only these nodes (repeatable).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    pub name: String,
    /// A local file.
    pub src: PathBuf,
    /// Where it goes on the nodes (relative to the login user's home, or on a local cluster to the directory starling runs in; a directory keeps the name).
    pub dest: String,
    /// Only these nodes (repeatable; default: every node).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub name: String,
    /// The file on the node (relative to the login user's home, or on a local cluster to the directory starling runs in).
    pub src: String,
    /// Where to write it here (a directory keeps the name).
    pub dest: PathBuf,
    /// The node (default: master).
    #[arg(long, default_value = "master")]
    pub node: String,
}

#[derive(Debug, Args)]
pub struct AddNodeArgs {
    pub name: String,
    /// How many nodes to add.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u32,
    /// The cluster's spec, when this machine did not start it.
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RemoveNodeArgs {
    pub name: String,
    /// The node, e.g. node002.
    pub node: String,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The template: local, ec2, ec2-spot, localstack or ssh-hosts.
    #[arg(long, default_value = "local")]
    pub template: String,
    /// Where to write the spec.
    #[arg(short, long, default_value = "cluster.yaml")]
    pub output_file: PathBuf,
    /// Overwrite the file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A cluster on this machine (the default when no spec is given).
    #[arg(long)]
    pub local: bool,
    /// Engines per node: a number, or "auto" for one per core (for a local cluster: engines
    /// on this machine).
    #[arg(short = 'n', long = "engines", value_name = "N|auto")]
    pub engines: Option<crate::spec::Count>,
    /// A YAML cluster spec.
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    pub file: Option<PathBuf>,
    /// The cluster's name (default: the spec's, or "local").
    #[arg(long)]
    pub name: Option<String>,
    /// Start the engines' kernels with `mpiexec`, as the ranks of one MPI world (engine id N
    /// is rank N); needs Open MPI and mpi4py (the spec's `mpi: true`).
    #[arg(long)]
    pub mpi: bool,
}

#[derive(Debug, Args)]
pub struct PxArgs {
    /// The code to run; `-` reads it from stdin.
    #[arg(allow_hyphen_values = true)]
    pub code: Option<String>,
    /// Run the code in FILE (`-` for stdin) instead.
    #[arg(long, value_name = "FILE", conflicts_with = "code")]
    pub file: Option<PathBuf>,
    /// Engines to run on: an id (3), a list (0,2), a slice (::2, :-1) or all.
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
    /// Return at once with the job id; `starling result` fetches the outputs.
    #[arg(long)]
    pub noblock: bool,
    /// Run the code with bash instead of Python.
    #[arg(long)]
    pub sh: bool,
    #[command(flatten)]
    pub sched: SchedArgs,
}

/// Job ids on the command line: `3` or `3,4,7`.
#[derive(Debug, Clone)]
pub struct JobList(pub Vec<JobId>);

impl std::str::FromStr for JobList {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(|j| j.trim().parse::<u64>().map(JobId))
            .collect::<Result<Vec<_>, _>>()
            .map(JobList)
            .map_err(|_| format!("'{text}' is not a job id or a list of them; write e.g. 3 or 3,4"))
    }
}

/// When a job may start, how long it may take, and what it is called.
#[derive(Debug, Args)]
pub struct SchedArgs {
    /// Start only once these jobs have ended (by default: succeeded); if that can no longer
    /// happen, fail at once with ImpossibleDependency.
    #[arg(long, value_name = "JOB[,JOB]")]
    pub after: Option<JobList>,
    /// With --after or --follow: enough when any one of the jobs has ended as --when says.
    #[arg(long)]
    pub any: bool,
    /// With --after or --follow: which ending counts: ok, failed, or done (either).
    #[arg(long, value_name = "ok|failed|done", default_value = "ok", value_parser = ["ok", "failed", "done"])]
    pub when: String,
    /// Fail each task that has not finished this many seconds after it could start; a running
    /// one is interrupted.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, allow_hyphen_values = true)]
    pub timeout: Option<f64>,
    /// A label to find the job by in `starling history`.
    #[arg(long)]
    pub label: Option<String>,
}

impl SchedArgs {
    fn dependency(&self, jobs: &JobList) -> Dependency {
        Dependency {
            jobs: jobs.0.clone(),
            all: !self.any,
            success: self.when != "failed",
            failure: self.when != "ok",
        }
    }

    fn options(&self, follow: Option<&JobList>, retries: u32) -> JobOptions {
        JobOptions {
            label: self.label.clone(),
            submitter: String::new(),
            after: self.after.as_ref().map(|j| self.dependency(j)),
            follow: follow.map(|j| self.dependency(j)),
            engines: None,
            retries,
            timeout_ms: self
                .timeout
                .map(|s| ((s * 1000.0).round() as u64).max(u64::from(s > 0.0))),
        }
    }
}

#[derive(Debug, Args)]
pub struct AbortArgs {
    /// The job.
    pub job: u64,
    /// Interrupt its running tasks too (SIGINT; a kernel that does not stop is replaced).
    #[arg(long)]
    pub interrupt: bool,
}

#[derive(Debug, Args)]
pub struct InterruptArgs {
    /// Engines to interrupt: an id (3), a list (0,2), a slice (::2) or all.
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only jobs that ended so: ok, failed, aborted, timeout, impossible, or pending.
    #[arg(long)]
    pub status: Option<String>,
    /// Only jobs with this label.
    #[arg(long)]
    pub label: Option<String>,
    /// Only jobs submitted in this past span: 30s, 10m, 2h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub since: Option<Duration>,
    /// At most this many jobs, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// A db_query dict (JSON), e.g. '{"kind": "map", "attempts": {"$gt": 1}}'.
    #[arg(long, value_name = "JSON")]
    pub query: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResubmitArgs {
    /// The job to submit again.
    pub job: u64,
    /// Return at once with the new job id.
    #[arg(long)]
    pub noblock: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Only jobs submitted longer ago than this: 30s, 10m, 2h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub before: Option<Duration>,
    /// Every finished job.
    #[arg(long, conflicts_with = "before")]
    pub all: bool,
}

/// Where a command's items come from.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ItemArgs {
    /// Integers: `N` for 0..N, or `START:STOP[:STEP]`.
    #[arg(long, value_name = "RANGE")]
    pub range: Option<String>,
    /// A JSON file holding an array of items (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// A text file, one item (a string) per line (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub lines: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    /// The function: an expression (`lambda x: x*x`), a name defined by --def, or FILE.py:NAME.
    #[arg(required_unless_present = "sh")]
    pub func: Option<String>,
    /// Python code defining the function named FUNC (it may import what it needs).
    #[arg(long = "def", value_name = "CODE")]
    pub def: Option<String>,
    /// A shell command line instead of a function; `{}` is replaced by the item, shell-quoted.
    #[arg(long, value_name = "COMMAND", conflicts_with_all = ["func", "def"])]
    pub sh: Option<String>,
    #[command(flatten)]
    pub items: ItemArgs,
    /// Items per task (default: adaptive, large chunks first and small ones at the end).
    #[arg(long)]
    pub chunksize: Option<u32>,
    /// Map on these engines, one contiguous chunk each, instead of load-balancing.
    #[arg(short, long, allow_hyphen_values = true)]
    pub targets: Option<String>,
    /// Return at once with the job id; `starling result` fetches the results.
    #[arg(long)]
    pub noblock: bool,
    /// Show progress while waiting (a bar on a terminal, lines otherwise).
    #[arg(long)]
    pub progress: bool,
    /// Run only on the engines where these jobs ran (load-balanced maps), once they ended.
    #[arg(long, value_name = "JOB[,JOB]")]
    pub follow: Option<JobList>,
    /// Run a task that raised again, up to N times, on another engine where there is one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
    #[command(flatten)]
    pub sched: SchedArgs,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// A JSON object: each key becomes a name on the engines.
    pub values: String,
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The names to read.
    #[arg(required = true)]
    pub names: Vec<String>,
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
}

#[derive(Debug, Args)]
pub struct ScatterArgs {
    /// The name each engine's chunk gets.
    pub name: String,
    #[command(flatten)]
    pub items: ItemArgs,
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
}

#[derive(Debug, Args)]
pub struct GatherArgs {
    /// The name of the list on each engine.
    pub name: String,
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
}

#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The job id (default: the last job submitted with --noblock from this machine).
    pub job: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, value_parser = parse_seconds)]
    pub timeout: Option<f64>,
    /// Show progress while waiting (a bar on a terminal, lines otherwise).
    #[arg(long)]
    pub progress: bool,
}

/// Runs a parsed command line; the binary's `main` is a call to this.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(&cli).await {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                // Most errors already name their cause; say it once.
                let cause = cause.to_string();
                if !msg.contains(&cause) {
                    msg = format!("{msg}\n  caused by: {cause}");
                }
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: &Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match &cli.command {
        Command::Init(args) => {
            let text = spec::template(&args.template).map_err(anyhow::Error::msg)?;
            if args.output_file.exists() && !args.force {
                bail!(
                    "{} exists; pass --force to overwrite it, or -o to write elsewhere",
                    args.output_file.display()
                );
            }
            std::fs::write(&args.output_file, text)
                .with_context(|| format!("cannot write {}", args.output_file.display()))?;
            outln!(
                "wrote {} from the {} template; edit it, then `starling up -f {}`",
                args.output_file.display(),
                args.template,
                args.output_file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => up(g, args).await,
        Command::Down(args) => down(g, args).await,
        Command::Restart(args) => {
            let name = cluster_name(g, args.name.as_ref())?;
            let progress = crate::bootstrap::Progress::new();
            let r = provider::restart(&name, &hints(g), &progress).await?;
            output::restarted(g.output, &r);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ids => {
            let client = connect(g).await?;
            let ids = client.ids().await?;
            output::ids(g.output, &ids);
            Ok(ExitCode::SUCCESS)
        }
        Command::Px(args) => px(g, args).await,
        Command::Map(args) => map(g, args).await,
        Command::Abort(args) => {
            let client = connect(g).await?;
            client.abort(JobId(args.job), args.interrupt).await?;
            output::message(
                g.output,
                &format!(
                    "job {} aborted: its tasks that had not started fail as TaskAborted{}",
                    args.job,
                    if args.interrupt {
                        ", its running ones were interrupted"
                    } else {
                        "; running ones finish (--interrupt stops them)"
                    }
                ),
                &serde_json::json!({"aborted": args.job, "interrupted": args.interrupt}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Interrupt(args) => {
            let client = connect(g).await?;
            let ids = client.interrupt(targets(&args.targets)?).await?;
            output::message(
                g.output,
                &format!("interrupted engines {}", crate::proto::format_ids(&ids)),
                &serde_json::json!({"interrupted": ids}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::History(args) => {
            let mut query = match &args.query {
                Some(q) => serde_json::from_str(q)
                    .context("--query takes a JSON dict, e.g. '{\"status\": \"failed\"}'")?,
                None => serde_json::json!({}),
            };
            let Some(fields) = query.as_object_mut() else {
                bail!("--query takes a JSON dict, e.g. '{{\"status\": \"failed\"}}'");
            };
            if let Some(s) = &args.status {
                fields.insert("status".into(), s.as_str().into());
            }
            if let Some(l) = &args.label {
                fields.insert("label".into(), l.as_str().into());
            }
            if let Some(age) = args.since {
                let since = crate::proto::now_micros().saturating_sub(age.as_micros() as u64);
                fields.insert("submitted".into(), serde_json::json!({"$gte": since}));
            }
            let client = connect(g).await?;
            let records = client.history(&query, args.limit).await?;
            output::history(g.output, &records);
            Ok(ExitCode::SUCCESS)
        }
        Command::Resubmit(args) => {
            let client = connect(g).await?;
            let ar = client.resubmit(JobId(args.job)).await?;
            if args.noblock {
                return submitted(g, &ar);
            }
            finish(g, &ar, None, false).await
        }
        Command::Purge(args) => {
            let query = match (args.before, args.all) {
                (Some(age), _) => {
                    let before = crate::proto::now_micros().saturating_sub(age.as_micros() as u64);
                    serde_json::json!({"submitted": {"$lt": before}})
                }
                (None, true) => serde_json::json!({}),
                (None, false) => bail!("say which finished jobs to delete: --before 7d (submitted more than 7 days ago), or --all"),
            };
            let client = connect(g).await?;
            let n = client.purge(&query).await?;
            output::message(
                g.output,
                &format!(
                    "deleted {} from the task store",
                    output::count(n as usize, "finished job")
                ),
                &serde_json::json!({"purged": n}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => {
            let values: serde_json::Value = serde_json::from_str(&args.values)
                .context("push takes a JSON object, e.g. '{\"a\": 1, \"b\": [1, 2]}'")?;
            let serde_json::Value::Object(map) = values else {
                bail!("push takes a JSON object, e.g. '{{\"a\": 1}}': its keys become names on the engines");
            };
            let names: Vec<String> = map.keys().cloned().collect();
            let values = map.into_iter().map(|(k, v)| (k, Value::Json(v))).collect();
            let client = connect(g).await?;
            let ar = client.direct(targets(&args.targets)?).push(values).await?;
            ar.get().await?;
            output::pushed(g.output, &names, &ar.engines());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull(args) => {
            let client = connect(g).await?;
            let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
            let ar = client.direct(targets(&args.targets)?).pull(&names).await?;
            ar.wait(None).await?;
            Ok(exit(output::pulled(g.output, &args.names, &ar)))
        }
        Command::Scatter(args) => {
            let client = connect(g).await?;
            let items = read_items(&args.items, client.request_limit())?;
            let n = items.len();
            let ar = client
                .direct(targets(&args.targets)?)
                .scatter(&args.name, items)
                .await?;
            ar.get().await?;
            output::scattered(g.output, &args.name, n, &ar.engines());
            Ok(ExitCode::SUCCESS)
        }
        Command::Gather(args) => {
            let client = connect(g).await?;
            let values = client
                .direct(targets(&args.targets)?)
                .gather(&args.name)
                .await?;
            output::list(g.output, &values);
            Ok(ExitCode::SUCCESS)
        }
        Command::Result(args) => result(g, args).await,
        Command::Status(args) => status(g, args).await,
        Command::List => {
            let clusters = provider::list(&hints(g)).await?;
            output::clusters(g.output, &clusters);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh(args) => nodes::ssh(g, args).await,
        Command::Exec(args) => nodes::exec(g, args).await,
        Command::Mpirun(args) => nodes::mpirun(g, args).await,
        Command::Put(args) => nodes::put(g, args).await,
        Command::Get(args) => nodes::get(g, args).await,
        Command::AddNode(args) => nodes::add_node(g, args).await,
        Command::RemoveNode(args) => nodes::remove_node(g, args).await,
        Command::Stop(args) => nodes::stop(g, args).await,
        Command::Start(args) => nodes::start(g, args).await,
        Command::Connect(args) => nodes::connect(g, args).await,
    }
}

fn hints(g: &Global) -> provider::Hints {
    provider::Hints {
        region: g.region.clone(),
        endpoint_url: g.endpoint_url.clone(),
        key_file: g.key_file.clone(),
    }
}

/// The cluster a command is about: its argument, --cluster, or the connection file's.
fn cluster_name(g: &Global, name: Option<&String>) -> Result<String> {
    if let Some(n) = name.or(g.cluster.as_ref()) {
        home::check_name("cluster", n).map_err(anyhow::Error::msg)?;
        return Ok(n.clone());
    }
    let path = connection_file(g)?;
    Ok(connection::ConnectionInfo::load(&path)?.cluster)
}

async fn status(g: &Global, args: &NameArgs) -> Result<ExitCode> {
    let name = match (&args.name, &g.connection) {
        (None, Some(_)) => None,
        _ => Some(cluster_name(g, args.name.as_ref())?),
    };
    // Nodes, for clusters on other machines (EC2 from the tags, so without a connection file too).
    if let Some(name) = &name {
        if provider::remote::Record::load(name).is_some() || g.region.is_some() {
            let cluster = provider::open(name, &hints(g)).await?;
            let nodes = match cluster.ec2_api() {
                Some(api) => output::NodeRows::Ec2(api.instances(Some(name)).await?),
                None => output::NodeRows::Hosts(cluster.nodes().await?),
            };
            output::nodes(g.output, &nodes);
        }
    }
    let path = match &name {
        Some(n) if g.connection.is_none() => connection::find(Some(n), None)?,
        _ => connection_file(g)?,
    };
    let client = Client::connect(path).await?;
    output::status(g.output, &client.status().await?);
    Ok(ExitCode::SUCCESS)
}

fn connection_file(g: &Global) -> Result<PathBuf, ClientError> {
    connection::find(g.cluster.as_deref(), g.connection.as_deref())
}

async fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(connection_file(g)?).await?)
}

async fn up(g: &Global, args: &UpArgs) -> Result<ExitCode> {
    let spec = spec::for_up(&spec::UpOptions {
        file: args.file.as_deref(),
        local: args.local,
        name: args.name.as_deref().or(g.cluster.as_deref()),
        engines: args.engines,
        python: None,
        mpi: args.mpi,
    })?;
    let progress = crate::bootstrap::Progress::new();
    let launched = tokio::select! {
        r = provider::up(&spec, &progress) => r?,
        _ = tokio::signal::ctrl_c() => {
            let name = &spec.name;
            match provider::after_interrupted_up(&spec).await {
                None => eprintln!("interrupted: everything `up` had started was stopped again"),
                Some(what) => eprintln!("interrupted: what exists of cluster '{name}' now: {what}\n`starling down {name}` removes it"),
            }
            return Ok(ExitCode::from(130));
        }
    };
    output::launched(g.output, &launched);
    Ok(ExitCode::SUCCESS)
}

async fn down(g: &Global, args: &NameArgs) -> Result<ExitCode> {
    let name = match (&args.name, &g.connection) {
        (None, Some(path)) => {
            let info = connection::ConnectionInfo::load(path)?;
            let name = g.cluster.clone().unwrap_or_else(|| info.cluster.clone());
            // A connection file from elsewhere (a teammate's cluster with the same name) must
            // not take down the cluster of that name this machine started.
            let ours = home::connection_path(&name);
            let same = connection::ConnectionInfo::load(&ours).is_ok_and(|o| {
                o.controller == info.controller && o.certificate == info.certificate
            });
            if !same {
                bail!(
                    "{} is not the connection file of a cluster started from this machine, so `down` will not stop it; name the cluster to take down (`starling down NAME`)",
                    path.display()
                );
            }
            name
        }
        (None, None) if g.cluster.is_none() && connection::known_clusters().is_empty() => {
            // Idempotent: `down` after `down` has nothing to do, and says so.
            output::message(
                g.output,
                "no clusters on this machine; nothing to take down",
                &serde_json::json!({"clusters": []}),
            );
            return Ok(ExitCode::SUCCESS);
        }
        _ => cluster_name(g, args.name.as_ref())?,
    };
    let t = provider::down(&name, &hints(g)).await?;
    output::terminated(g.output, &t);
    Ok(ExitCode::SUCCESS)
}

fn last_job_path(g: &Global) -> Result<PathBuf> {
    let path = connection_file(g)?;
    Ok(path.with_file_name("last_job"))
}

/// A positive, finite number of seconds.
/// A span of time back from now: `30s`, `10m`, `2h`, `7d`, or seconds.
fn parse_age(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| c.is_alphabetic()).unwrap_or(t.len()));
    let scale = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => f64::NAN,
    };
    match num.parse::<f64>() {
        Ok(n) if n >= 0.0 && scale.is_finite() && n * scale < 1e10 => {
            Ok(Duration::from_secs_f64(n * scale))
        }
        _ => Err(format!(
            "'{text}' is not a span of time; write e.g. 30s, 10m, 2h or 7d"
        )),
    }
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..1e9).contains(&s) => Ok(s),
        _ => Err(format!(
            "'{text}' is not a number of seconds; write e.g. 2.5"
        )),
    }
}

fn targets(text: &str) -> Result<Targets> {
    Targets::parse(text).map_err(anyhow::Error::msg)
}

fn exit(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn read_source(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// The items of `--range`, `--json` or `--lines`, for a cluster that takes requests of up to
/// `limit` bytes.
fn read_items(args: &ItemArgs, limit: usize) -> Result<Vec<Value>> {
    if let Some(r) = &args.range {
        return range_items(r, limit);
    }
    if let Some(path) = &args.json {
        let text = read_source(path)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let serde_json::Value::Array(items) = value else {
            bail!("{} must hold a JSON array of items", path.display());
        };
        return Ok(items.into_iter().map(Value::Json).collect());
    }
    if let Some(path) = &args.lines {
        return Ok(read_source(path)?.lines().map(Value::from).collect());
    }
    bail!("give the items with --range, --json or --lines")
}

/// `--range N` or `START:STOP[:STEP]`, as Python's `range`. The count is worked out first, and a
/// range that cannot fit in one request of `limit` bytes is refused before any item is made.
fn range_items(r: &str, limit: usize) -> Result<Vec<Value>> {
    let bad = || {
        anyhow::anyhow!(
            "bad --range '{r}': use N (for 0..N) or START:STOP[:STEP] with whole numbers, e.g. 10 or 0:100:5"
        )
    };
    let parts: Vec<i64> = r
        .split(':')
        .map(|p| p.trim().parse::<i64>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let (start, stop, step) = match parts.as_slice() {
        [n] => (0, *n, 1),
        [a, b] => (*a, *b, 1),
        [a, b, c] if *c != 0 => (*a, *b, *c),
        [_, _, _] => bail!("bad --range '{r}': the step cannot be 0"),
        _ => return Err(bad()),
    };
    // In i128, nothing here can overflow.
    let (start, stop, step) = (i128::from(start), i128::from(stop), i128::from(step));
    let n = if step > 0 {
        (stop - start + step - 1).div_euclid(step)
    } else {
        (start - stop - step - 1).div_euclid(-step)
    }
    .max(0);
    if n > 0 {
        let last = start + (n - 1) * step;
        let per_item = [start, last]
            .iter()
            .map(|v| crate::proto::conn::encode(&Value::from(*v as i64)).len())
            .max()
            .unwrap_or(1) as i128;
        let fit = limit as i128 / per_item;
        if n > fit {
            bail!(
                "--range {r} has {n} items, about {} MiB to send; one request to this cluster is limited to {} MiB (max_frame_mb in its spec), which holds about {fit} items like these. Map over fewer items at a time: several maps, or chunk numbers that your function expands into items",
                (n * per_item) >> 20,
                limit >> 20,
            );
        }
    }
    Ok((0..n)
        .map(|k| Value::from((start + k * step) as i64))
        .collect())
}

/// The mapper named on the command line.
fn mapper(args: &MapArgs) -> Result<Mapper> {
    if let Some(sh) = &args.sh {
        return Ok(Mapper::Shell(sh.clone()));
    }
    let func = args.func.as_deref().unwrap_or_default();
    if let Some(code) = &args.def {
        let name = func.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            bail!("with --def, FUNC is the name of the function the code defines, e.g. `map f --def 'def f(x): ...'`");
        }
        return Ok(Mapper::Python(Func::from_source(code, name)));
    }
    if let Some((file, name)) = func.rsplit_once(':') {
        let path = Path::new(file);
        if path.extension().is_some_and(|e| e == "py") {
            let f = Func::from_file(path, name)
                .with_context(|| format!("cannot read {}", path.display()))?;
            return Ok(Mapper::Python(f));
        }
    }
    Ok(Mapper::Python(Func::Expr(func.to_string())))
}

async fn map(g: &Global, args: &MapArgs) -> Result<ExitCode> {
    let mapper = mapper(args)?;
    let client = connect(g).await?;
    let items = read_items(&args.items, client.request_limit())?;
    let ar = match &args.targets {
        Some(t) => {
            if args.chunksize.is_some() {
                bail!("--chunksize is for load-balanced maps; with --targets each engine gets one contiguous chunk");
            }
            if args.follow.is_some() || args.retries > 0 {
                bail!("--follow and --retries are for load-balanced maps; with --targets the engines are fixed");
            }
            client
                .direct(targets(t)?)
                .options(args.sched.options(None, 0))
                .map_with(mapper, items)
                .await?
        }
        None => {
            let mut view = client
                .load_balanced()
                .options(args.sched.options(args.follow.as_ref(), args.retries));
            if let Some(c) = args.chunksize {
                if c == 0 {
                    bail!("--chunksize must be at least 1");
                }
                view = view.chunksize(c);
            }
            view.map_with(mapper, items).await?
        }
    };
    if args.noblock {
        return submitted(g, &ar);
    }
    finish(g, &ar, None, args.progress).await
}

async fn px(g: &Global, args: &PxArgs) -> Result<ExitCode> {
    let targets = targets(&args.targets)?;
    let code = match (&args.code, &args.file) {
        (Some(code), _) if code == "-" => read_source(Path::new("-"))?,
        (Some(code), _) => code.clone(),
        (None, Some(file)) => read_source(file)?,
        (None, None) => bail!("give the code to run, `-` to read it from stdin, or --file FILE"),
    };
    let client = connect(g).await?;
    let view = client.direct(targets).options(args.sched.options(None, 0));
    let ar = if args.sh {
        view.shell(&code).await?
    } else {
        view.execute(&code).await?
    };
    if args.noblock {
        return submitted(g, &ar);
    }
    finish(g, &ar, None, false).await
}

/// A job submitted with `--noblock`: remembered for `starling result`, and its id printed.
fn submitted(g: &Global, ar: &AsyncResult) -> Result<ExitCode> {
    let job = ar.job_id();
    std::fs::write(last_job_path(g)?, job.to_string()).context("cannot remember the job id")?;
    output::submitted(g.output, job, &ar.engines());
    Ok(ExitCode::SUCCESS)
}

async fn result(g: &Global, args: &ResultArgs) -> Result<ExitCode> {
    let job = match args.job {
        Some(j) => JobId(j),
        None => {
            let path = last_job_path(g)?;
            let text = std::fs::read_to_string(&path).with_context(|| {
                "no job to wait for: run `starling px --noblock ...` first, or name a job id"
            })?;
            JobId(
                text.trim()
                    .parse()
                    .context("the remembered job id is unreadable; name a job id")?,
            )
        }
    };
    let client = connect(g).await?;
    let ar = client.result(job).await?;
    finish(
        g,
        &ar,
        args.timeout.map(Duration::from_secs_f64),
        args.progress,
    )
    .await
}

async fn finish(
    g: &Global,
    ar: &AsyncResult,
    timeout: Option<Duration>,
    progress: bool,
) -> Result<ExitCode> {
    let (done, shown) = if progress {
        (output::progress(ar, timeout).await?, output::Shown::new())
    } else if matches!(g.output, Format::Text) {
        output::streaming(ar, timeout).await?
    } else {
        (ar.wait(timeout).await?, output::Shown::new())
    };
    if !done {
        let (done, total) = ar.progress();
        bail!(
            "job {} is not done after {:.1} s ({done} of {total} tasks finished); `starling result {}` waits again",
            ar.job_id(),
            timeout.unwrap_or_default().as_secs_f64(),
            ar.job_id()
        );
    }
    let failed = match ar.kind() {
        JobKind::Map => output::map_results(g.output, ar),
        JobKind::Pull => output::pulled(g.output, &[], ar),
        _ => {
            let mut results = ar.results();
            results.sort_by_key(|r| r.first);
            for r in &mut results {
                if let Some((out, err)) = shown.get(&r.task) {
                    r.stdout = output::unshown(&r.stdout, *out);
                    r.stderr = output::unshown(&r.stderr, *err);
                }
            }
            output::results(g.output, &results)
        }
    };
    Ok(exit(failed))
}
