use std::process::ExitCode;

use clap::Parser;

/// Large blocks (frames) on huge pages: see `starling::proto::huge`.
#[global_allocator]
static ALLOC: starling::proto::huge::HugePages = starling::proto::huge::HugePages;

fn main() -> ExitCode {
    let cli = starling::cli::Cli::parse();
    let level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(starling::cli::run(cli))
}
