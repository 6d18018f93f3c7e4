//! `shoal-snapshotter`: the daemon containerd talks to as its `shoal` proxy snapshotter.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "shoal-snapshotter",
    disable_version_flag = true,
    about = "Shoal: a lazy-pulling containerd snapshotter with a peer-to-peer chunk cache"
)]
struct Args {
    /// Configuration file (default /etc/shoal/config.toml if it exists, else built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate FILE (every field, the log filter included) and exit: 0 if it is valid, 1 with
    /// the error naming the field if not. Nothing is started.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Print the version and the commit it was built from.
    #[arg(long, short = 'V')]
    version: bool,
    /// Stop the running daemon and end every lazy mount (a plain SIGTERM, as a restart or an
    /// upgrade sends, leaves them serving for the next daemon). Running containers then see
    /// EIO on reads that are not in the page cache.
    #[arg(long)]
    shutdown: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.version {
        println!("{}", shoal_cmd::version::line());
        return ExitCode::SUCCESS;
    }
    if let Some(file) = args.check_config {
        return match check(&file) {
            Ok(()) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("shoal-snapshotter: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.shutdown {
        let done = shoal_cmd::load_config(args.config.as_deref())
            .and_then(|config| shoal_cmd::handover::shutdown(&config));
        return match done {
            Ok(what) => {
                println!("{what}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("shoal-snapshotter: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal-snapshotter: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let config = shoal_cmd::load_config(Some(file))?;
    shoal_cmd::logging::filter(&config.log)?;
    Ok(())
}

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = shoal_cmd::load_config(path.as_deref())?;
    let log = shoal_cmd::logging::init(&config.log)?;
    let runtime = shoal_cmd::runtime::build()?;
    runtime.block_on(shoal_cmd::daemon::run(shoal_cmd::daemon::Started {
        config,
        path,
        log,
    }))
}
