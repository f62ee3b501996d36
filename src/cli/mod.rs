//! The `starling` command line: clap commands and formatting, nothing more. Every command calls
//! the library ([`crate::provider`], [`crate::client`]); `run` can be called from tests.

mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::{connection, AsyncResult, Client, ClientError};
use crate::home;
use crate::proto::{JobId, Targets};
use crate::provider::{self, local::LocalProvider, Provider};
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
    /// Output format: text for people, json for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Log more (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a cluster and wait until every engine has registered.
    Up(UpArgs),
    /// Stop a cluster: controller, engines and kernels; nothing of it remains.
    Down,
    /// The ids of the registered engines.
    Ids,
    /// Run code on engines, like %px: Python by default, shell with --sh.
    Px(PxArgs),
    /// Wait for a job (the last non-blocking one by default) and print its outputs, like %pxresult.
    Result(ResultArgs),
    /// Engines (id, host, pid, state, tasks done) and the queue.
    Status,
    /// The clusters this machine knows.
    List,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A cluster on this machine (the default when no spec is given).
    #[arg(long)]
    pub local: bool,
    /// Number of engines (for a local cluster: engines on this machine).
    #[arg(short = 'n', long = "engines")]
    pub engines: Option<u32>,
    /// A YAML cluster spec.
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    pub file: Option<PathBuf>,
    /// The cluster's name (default: the spec's, or "local").
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct PxArgs {
    /// The code to run.
    pub code: String,
    /// Engines to run on: an id (3), a list (0,2), a slice (::2, :-1) or all.
    #[arg(short, long, default_value = "all", allow_hyphen_values = true)]
    pub targets: String,
    /// Return at once with the job id; `starling result` fetches the outputs.
    #[arg(long)]
    pub noblock: bool,
    /// Run the code with bash instead of Python.
    #[arg(long)]
    pub sh: bool,
}

#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The job id (default: the last job submitted with --noblock from this machine).
    pub job: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// Runs a parsed command line; the binary's `main` is a call to this.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(&cli).await {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg = format!("{msg}\n  caused by: {cause}");
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: &Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match &cli.command {
        Command::Up(args) => up(g, args).await,
        Command::Down => down(g).await,
        Command::Ids => {
            let client = connect(g).await?;
            let ids = client.ids().await?;
            output::ids(g.output, &ids);
            Ok(ExitCode::SUCCESS)
        }
        Command::Px(args) => px(g, args).await,
        Command::Result(args) => result(g, args).await,
        Command::Status => {
            let client = connect(g).await?;
            output::status(g.output, &client.status().await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::List => {
            let clusters = LocalProvider::new().list().await?;
            output::list(g.output, &clusters);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn connection_file(g: &Global) -> Result<PathBuf, ClientError> {
    connection::find(g.cluster.as_deref(), g.connection.as_deref())
}

async fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(connection_file(g)?).await?)
}

async fn up(g: &Global, args: &UpArgs) -> Result<ExitCode> {
    let mut spec = match &args.file {
        Some(path) => spec::load(path)?,
        None => spec::parse("templates/local.yaml (built in)", spec::LOCAL_TEMPLATE)?,
    };
    if args.local && spec.provider != spec::ProviderKind::Local {
        bail!(
            "--local conflicts with `provider: {}` in the spec; drop one of them",
            spec.provider
        );
    }
    if let Some(name) = args.name.as_ref().or(g.cluster.as_ref()) {
        home::check_name("cluster", name).map_err(anyhow::Error::msg)?;
        spec.name.clone_from(name);
    }
    if let Some(n) = args.engines {
        if n == 0 {
            bail!("-n must be at least 1");
        }
        spec.engines_per_node = spec::Count::N(n);
    }
    let launched = provider::up(&spec).await?;
    output::launched(g.output, &launched);
    Ok(ExitCode::SUCCESS)
}

async fn down(g: &Global) -> Result<ExitCode> {
    let path = connection_file(g)?;
    let name = match &g.cluster {
        Some(n) => n.clone(),
        None => connection::ConnectionInfo::load(&path)?.cluster,
    };
    let t = LocalProvider::new().terminate(&name).await?;
    output::terminated(g.output, &t);
    Ok(ExitCode::SUCCESS)
}

fn last_job_path(g: &Global) -> Result<PathBuf> {
    let path = connection_file(g)?;
    Ok(path.with_file_name("last_job"))
}

async fn px(g: &Global, args: &PxArgs) -> Result<ExitCode> {
    let targets = Targets::parse(&args.targets).map_err(anyhow::Error::msg)?;
    let client = connect(g).await?;
    let view = client.direct(targets);
    let ar = if args.sh {
        view.shell(&args.code).await?
    } else {
        view.execute(&args.code).await?
    };
    if args.noblock {
        let job = ar.job_id();
        std::fs::write(last_job_path(g)?, job.to_string()).context("cannot remember the job id")?;
        output::submitted(g.output, job, &ar.engines());
        return Ok(ExitCode::SUCCESS);
    }
    finish(g, &ar, None).await
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
    finish(g, &ar, args.timeout.map(Duration::from_secs_f64)).await
}

async fn finish(g: &Global, ar: &AsyncResult, timeout: Option<Duration>) -> Result<ExitCode> {
    if !ar.wait(timeout).await? {
        let (done, total) = ar.progress();
        bail!(
            "job {} is not done after {:.1} s ({done} of {total} tasks finished); `starling result {}` waits again",
            ar.job_id(),
            timeout.unwrap_or_default().as_secs_f64(),
            ar.job_id()
        );
    }
    let results: Vec<_> = ar.results().into_iter().flatten().collect();
    let failed = output::results(g.output, &results);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
