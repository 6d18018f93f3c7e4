//! `shoal`: the command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Shoal command-line client")]
struct Args {
    /// Configuration file (default /etc/shoal/config.toml if it exists).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Daemon socket; overrides the configuration's `socket`.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Show whether the daemon is running, what it holds and how much disk it uses.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shoal: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Version => {
            println!("shoal {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let config = shoal_cmd::load_config(args.config.as_deref())?;
            let socket = args.socket.unwrap_or(config.socket);
            let runtime = shoal_cmd::runtime::build()?;
            let status = runtime.block_on(shoal_cmd::status::gather(&socket));
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(if status.reachable {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
