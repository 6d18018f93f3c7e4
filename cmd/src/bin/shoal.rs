//! `shoal`: the command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal",
    version = shoal_cmd::version::VERSION,
    about = "Shoal command-line client"
)]
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
    /// Print the version and the commit it was built from.
    Version,
    /// Make the running daemon read its config file again (SIGHUP) and print what changed,
    /// what needs a restart, or why the file was rejected.
    Reload,
    /// Show whether the daemon is running, what it holds and how much disk it uses.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image through containerd, letting the snapshotter mount layers lazily.
    Rpull(RpullArgs),
    /// Warm the cluster with an image before a rollout: the daemon fetches its blocks once
    /// and spreads them over the peers (through the daemon's `[preheat]` API).
    Preheat(PreheatArgs),
    /// Rebuild an image as eStargz or overlaybd and push it, so its layers can be mounted lazily.
    Convert(ConvertArgs),
    /// Cold starts of an image on this node: overlayfs against Shoal (and stargz-snapshotter
    /// with --stargz-socket or --stargz-bin), each run on a private containerd and daemon that are removed
    /// afterwards; prints a table, writes a CSV and a PNG chart.
    Bench(BenchArgs),
    /// What the Kubernetes DaemonSet runs on each node: containerd's config, readiness.
    #[command(subcommand, name = "node-setup")]
    NodeSetup(NodeSetupCommand),
}

#[derive(Subcommand)]
enum NodeSetupCommand {
    /// Merge Shoal's settings into containerd's config (kept otherwise, comments too), with a
    /// backup; prints `unchanged`, `created` or `changed` first, so a caller restarts
    /// containerd only when the file changed. A file that does not parse is left untouched.
    ContainerdConfig {
        /// containerd's config file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        file: PathBuf,
        /// A snippet of Shoal's settings; the one whose `version` matches the file's is used.
        #[arg(long = "snippet", required = true)]
        snippets: Vec<PathBuf>,
        /// The version to write when the file is missing or empty (2: containerd 1.x, 3: 2.x).
        #[arg(long)]
        default_version: Option<i64>,
    },
    /// Exit 0 only when containerd lists the snapshotter and the daemon answers at the socket
    /// containerd dials for it (the DaemonSet's readiness probe).
    Ready {
        /// containerd's gRPC socket.
        #[arg(long, default_value = shoal_cmd::pull::DEFAULT_ADDRESS)]
        address: PathBuf,
        /// The snapshotter's name in containerd.
        #[arg(long, default_value = shoal_cmd::pull::DEFAULT_SNAPSHOTTER)]
        snapshotter: String,
    },
}

#[derive(clap::Args)]
struct RpullArgs {
    /// containerd's gRPC socket.
    #[arg(long, default_value = shoal_cmd::pull::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// containerd namespace.
    #[arg(long, short = 'n', default_value = shoal_cmd::pull::DEFAULT_NAMESPACE)]
    namespace: String,
    /// The snapshotter to unpack into, as containerd names it.
    #[arg(long, default_value = shoal_cmd::pull::DEFAULT_SNAPSHOTTER)]
    snapshotter: String,
    /// Use plain HTTP for the image's registry.
    #[arg(long)]
    plain_http: bool,
    /// `os/arch[/variant]` to pick from a multi-platform image (default: this host's).
    #[arg(long)]
    platform: Option<String>,
    /// Exit non-zero if any eStargz or overlaybd layer was downloaded instead of mounted.
    #[arg(long)]
    require_lazy: bool,
    /// Image reference, e.g. `registry.example.com/app:1.0`.
    reference: String,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Cold runs per scenario; the table shows their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// stargz-snapshotter's socket: adds its scenario (the daemon is yours, and its cache is
    /// not cleared between runs).
    #[arg(long, value_name = "PATH", conflicts_with = "stargz_bin")]
    stargz_socket: Option<PathBuf>,
    /// A stargz-snapshotter daemon binary (`--address`, `--root`): adds its scenario, run
    /// privately and cold like Shoal's.
    #[arg(long, value_name = "PATH")]
    stargz_bin: Option<PathBuf>,
    /// The registry speaks plain HTTP (its bytes and requests are then counted).
    #[arg(long)]
    plain_http: bool,
    /// Results folder (default `shoal-bench-<unix time>` here).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// One row per run (default `<out>/bench.csv`).
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// The chart (default `<out>/bench.png`).
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Where each run's private containerd and daemon live, removed afterwards.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    work: PathBuf,
    /// The longest one run may take, e.g. `10m`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Image reference, e.g. `registry.example.com/app:1.0` (eStargz for a lazy Shoal run).
    reference: String,
    /// The command to time instead of the image's entrypoint (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct PreheatArgs {
    /// Image reference (`registry/repository:tag` or `@sha256:...`).
    reference: String,
    /// How many peers take a share of the blocks from the preheating node; default: every
    /// live peer.
    #[arg(long)]
    nodes: Option<u64>,
    /// Give up after this long (e.g. `10m`).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Format to convert to (overlaybd needs root: it loop-mounts an ext4 work disk).
    #[arg(long, value_enum, default_value_t = shoal_cmd::convert::Format::Estargz)]
    format: shoal_cmd::convert::Format,
    /// Use plain HTTP for the source's and the destination's registries.
    #[arg(long)]
    plain_http: bool,
    /// A file to place first in each layer that has it (repeatable; order is kept).
    #[arg(long = "prioritize", value_name = "FILE")]
    prioritize: Vec<String>,
    /// A file listing more paths to prioritize, one a line.
    #[arg(long, value_name = "PATH")]
    prioritize_list: Option<PathBuf>,
    /// Largest uncompressed chunk of a file, in bytes.
    #[arg(long, default_value_t = shoal_formats::estargz::build::DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// `os/arch[/variant]` to pick from a multi-platform source.
    #[arg(long, default_value = shoal_cmd::convert::DEFAULT_PLATFORM)]
    platform: String,
    /// overlaybd: write no block digest table beside each layer, as other converters do
    /// (peers then serve its blocks only over mutual TLS, checked per blob).
    #[arg(long)]
    no_block_digests: bool,
    /// Run the image's Entrypoint and Cmd (or the command after `--`) once, as the image's
    /// User in a runc sandbox over the unpacked image, and place the files it reads first in
    /// each layer, before `.prefetch.landmark` (eStargz only; needs root).
    #[arg(long)]
    optimize: bool,
    /// How long the `--optimize` run may take; a command still running then is stopped and
    /// what it read until then is prioritized.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, requires = "optimize")]
    optimize_timeout: std::time::Duration,
    /// `oci:<layout dir>[:tag]` or a registry reference.
    source: String,
    /// Registry reference to push the converted image to.
    destination: String,
    /// With `--optimize`: the command to run instead of the image's Entrypoint and Cmd.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    // A reader that goes away (`shoal status | head`) ends this process quietly, as it ends
    // any other command-line tool, instead of making the next print panic.
    // SAFETY: at the start of main, before any other thread exists and before any signal
    // handler is installed; SIG_DFL is not a handler, so no code runs in signal context.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
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
            println!("{}", shoal_cmd::version::line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            // The daemon reads its own file; this one only names the socket, and a broken
            // one must not stop the daemon from being asked (it says what is wrong).
            let socket = match args.socket {
                Some(socket) => socket,
                None => match shoal_cmd::load_config(args.config.as_deref()) {
                    Ok(config) => config.socket,
                    Err(err) => {
                        let file = args
                            .config
                            .unwrap_or_else(|| shoal_cmd::DEFAULT_CONFIG.into());
                        let socket = shoal_config::Config::socket_named_in(&file)
                            .unwrap_or_else(|| shoal_config::Config::default().socket);
                        eprintln!(
                            "shoal: warning: {err:#}; asking the daemon at {}",
                            socket.display()
                        );
                        socket
                    }
                },
            };
            let outcome = shoal_cmd::reload::request::reload(&socket)?;
            if outcome.accepted {
                println!("{}", outcome.message);
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("shoal: {}", outcome.message);
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Status { json } => {
            // A config broken since the daemon started must not hide the running daemon.
            let config = shoal_cmd::load_config(args.config.as_deref()).unwrap_or_else(|err| {
                eprintln!("shoal: warning: {err:#}; showing the status with default settings");
                shoal_config::Config::default()
            });
            let socket = args.socket.unwrap_or(config.socket);
            let runtime = shoal_cmd::runtime::build()?;
            let status =
                runtime.block_on(shoal_cmd::status::gather(&socket, config.metrics.address));
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
        Command::Rpull(rpull) => {
            let config = shoal_cmd::load_config(args.config.as_deref())?;
            let options = shoal_cmd::pull::Options {
                address: rpull.address,
                namespace: rpull.namespace,
                snapshotter: rpull.snapshotter,
                plain_http: rpull.plain_http,
                platform: rpull.platform,
                reference: rpull.reference,
                config_path: args.config.clone(),
            };
            let runtime = shoal_cmd::runtime::build()?;
            let progress = shoal_cmd::pull::Progress::new();
            let summary = runtime.block_on(shoal_cmd::pull::rpull(config, &options, &progress))?;
            println!("{summary}");
            let downloaded: Vec<_> = summary
                .layers
                .iter()
                .filter(|layer| layer.downloaded_lazy_format())
                .collect();
            if rpull.require_lazy && !downloaded.is_empty() {
                for layer in &downloaded {
                    eprintln!("shoal: --require-lazy: {layer}");
                }
                eprintln!(
                    "shoal: --require-lazy: {} lazily mountable layers were downloaded",
                    downloaded.len()
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(bench) => {
            let options = shoal_cmd::bench::Options {
                reference: bench.reference,
                command: bench.command,
                runs: bench.runs,
                stargz_socket: bench.stargz_socket,
                stargz_bin: bench.stargz_bin,
                plain_http: bench.plain_http,
                out: bench.out,
                csv: bench.csv,
                png: bench.png,
                work: bench.work,
                timeout: bench.timeout,
            };
            let report = shoal_cmd::bench::run(&options)?;
            print!("{}", report.table);
            Ok(ExitCode::SUCCESS)
        }
        Command::NodeSetup(NodeSetupCommand::ContainerdConfig {
            file,
            snippets,
            default_version,
        }) => {
            use shoal_cmd::node::containerd_config::{merge, Outcome};
            match merge(&file, &snippets, default_version)? {
                Outcome::Unchanged => println!("unchanged: {}", file.display()),
                Outcome::Created => println!("created: {}", file.display()),
                Outcome::Changed { backup } => println!(
                    "changed: {} (the previous file is {})",
                    file.display(),
                    backup.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::NodeSetup(NodeSetupCommand::Ready {
            address,
            snapshotter,
        }) => {
            let runtime = shoal_cmd::runtime::build()?;
            let line = runtime.block_on(shoal_cmd::node::ready::check(&address, &snapshotter))?;
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Preheat(preheat) => {
            let config = shoal_cmd::load_config(args.config.as_deref())?;
            let runtime = shoal_cmd::runtime::build()?;
            let mut out = std::io::stdout();
            let job = runtime.block_on(shoal_cmd::preheat::cli::preheat(
                &config,
                &preheat.reference,
                preheat.nodes,
                preheat.timeout,
                &mut out,
            ))?;
            println!("preheat job {} succeeded: {}", job.id, job.image);
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert(convert) => {
            let config = shoal_cmd::load_config(args.config.as_deref())?;
            let options = shoal_cmd::convert::Options {
                source: convert.source,
                destination: convert.destination,
                plain_http: convert.plain_http,
                prioritize: convert.prioritize,
                prioritize_list: convert.prioritize_list,
                chunk_size: convert.chunk_size,
                platform: Some(convert.platform),
                block_digests: !convert.no_block_digests,
                optimize: convert
                    .optimize
                    .then(|| shoal_cmd::convert::optimize::Optimize {
                        command: convert.command.clone(),
                        timeout: convert.optimize_timeout,
                    }),
            };
            if !convert.optimize && !convert.command.is_empty() {
                anyhow::bail!("a command after `--` is only run with --optimize");
            }
            if convert.optimize && convert.format != shoal_cmd::convert::Format::Estargz {
                anyhow::bail!("--optimize lays out eStargz layers; use it with --format estargz");
            }
            let runtime = shoal_cmd::runtime::build()?;
            let progress = shoal_cmd::pull::Progress::new();
            use shoal_cmd::convert::{overlaybd, Format};
            use shoal_formats::overlaybd::zfile::Algorithm;
            let summary = match convert.format {
                Format::Estargz => runtime
                    .block_on(shoal_cmd::convert::convert(config, &options, &progress))?
                    .to_string(),
                Format::Overlaybd | Format::OverlaybdLz4 | Format::OverlaybdZstd => {
                    let algorithm = match convert.format {
                        Format::OverlaybdLz4 => Algorithm::Lz4,
                        _ => Algorithm::Zstd,
                    };
                    runtime
                        .block_on(overlaybd::convert(config, &options, algorithm, &progress))?
                        .to_string()
                }
            };
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
