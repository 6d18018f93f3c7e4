//! `shoal-snapshotter`: the daemon containerd talks to as its `shoal` proxy snapshotter.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Shoal: a lazy-pulling containerd snapshotter with a peer-to-peer chunk cache"
)]
struct Args {
    /// Configuration file (default /etc/shoal/config.toml if it exists, else built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal-snapshotter: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = shoal_cmd::load_config(args.config.as_deref())?;
    shoal_cmd::logging::init(&config.log)?;
    let runtime = shoal_cmd::runtime::build()?;
    runtime.block_on(shoal_cmd::daemon::run(config))
}
