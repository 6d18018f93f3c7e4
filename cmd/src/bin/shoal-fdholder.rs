//! `shoal-fdholder`: keeps the FUSE connections of lazy mounts while `shoal-snapshotter`
//! restarts, crashes or is upgraded. It does nothing else, so it never needs upgrading with the
//! daemon; the daemon starts one when none answers at its `handover.holder_socket`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shoal_fuse::handover::{Holder, HolderPolicy};

#[derive(Parser)]
#[command(
    name = "shoal-fdholder",
    version = shoal_cmd::version::VERSION,
    about = "Keeps Shoal's FUSE connections alive between daemons"
)]
struct Args {
    /// The unix socket to serve (root's alone).
    #[arg(long)]
    socket: PathBuf,
    /// With no daemon attached for this many seconds, let every connection go.
    #[arg(long, default_value_t = 3600)]
    orphan_after_secs: u64,
    /// Exit once nothing is kept and no daemon is attached for this many seconds; 0: never
    /// (a holder run as a service of its own).
    #[arg(long, default_value_t = 10)]
    idle_exit_secs: u64,
    /// Bind, then go on in a new session of its own and return at once.
    #[arg(long)]
    detach: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let policy = HolderPolicy {
        orphan_after: Duration::from_secs(args.orphan_after_secs),
        idle_exit: (args.idle_exit_secs > 0).then(|| Duration::from_secs(args.idle_exit_secs)),
    };
    let holder = match Holder::bind(&args.socket, policy) {
        Ok(holder) => holder,
        Err(err) => {
            eprintln!("shoal-fdholder: {}", shoal_fetcher::with_causes(&err));
            return ExitCode::FAILURE;
        }
    };
    if args.detach {
        // SAFETY: no other thread exists yet (the subscriber starts none), so the child is a
        // faithful copy; the parent only exits.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Parent { .. }) => return ExitCode::SUCCESS,
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = nix::unistd::setsid();
            }
            Err(err) => {
                eprintln!("shoal-fdholder: fork: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    match holder.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal-fdholder: {}", shoal_fetcher::with_causes(&err));
            ExitCode::FAILURE
        }
    }
}
