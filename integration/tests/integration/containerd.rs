//! A private containerd (Debian's 1.6) per test: its own root, state and sockets in the
//! fixture, Shoal registered as the `shoal` snapshot proxy plugin, and a `ctr` helper.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{wait_until, Fixture};
use crate::process::{self, Process};

const CTR_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Registers this socket as the `shoal` snapshotter proxy plugin.
    pub shoal_socket: Option<PathBuf>,
    /// Keeps containerd's CRI plugin (disabled by default: it needs CNI and is slow to start).
    pub cri: bool,
    /// With `cri`: the snapshotter CRI pulls unpack into, with the layer annotations passed on
    /// to it (`disable_snapshot_annotations = false`), as a Kubernetes node using Shoal is set up.
    pub cri_snapshotter: Option<String>,
    /// With `cri`: registries (`host:port`) the CRI plugin reaches over plain HTTP.
    pub cri_plain_http: Vec<String>,
    /// With `cri_snapshotter`: keep containerd 1.6's default `disable_snapshot_annotations =
    /// true`, as a node set up without Shoal's CRI settings has it.
    pub cri_without_annotations: bool,
}

pub struct Containerd {
    address: PathBuf,
    /// `ctr` works in a namespace of this fixture's own: runc keeps container state under
    /// `/run/containerd/runc/<namespace>` whatever containerd's root, so tests running side by
    /// side must not share one.
    namespace: String,
    /// Where the output of `ctr run` goes (see [`Containerd::ctr_in`]), one file a run.
    run_logs: PathBuf,
    runs: AtomicUsize,
    _process: Process,
}

impl Containerd {
    pub fn start(fixture: &Fixture, options: &Options) -> Result<Containerd> {
        let base = fixture.mkdir("containerd")?;
        let address = base.join("c.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\n\
             [grpc]\n  address = \"{grpc}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n",
            root = base.join("root").display(),
            state = base.join("state").display(),
            disabled = if options.cri {
                "disabled_plugins = []".to_owned()
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".to_owned()
            },
            grpc = address.display(),
            ttrpc = base.join("t.sock").display(),
        );
        if let Some(socket) = &options.shoal_socket {
            config.push_str(&format!(
                "\n[proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        if options.cri {
            config.push_str(&cri_config(options));
        }
        let config_path = base.join("config.toml");
        fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let log = base.join("containerd.log");
        fixture.register_log("containerd", &log);
        let mut command = Command::new("containerd");
        command.arg("--config").arg(&config_path);
        let mut process = Process::spawn("containerd", &mut command, &log)?;
        let probe_address = address.clone();
        wait_until(
            "containerd to answer `ctr version`",
            Duration::from_secs(30),
            || {
                if let Some(status) = process.try_status()? {
                    anyhow::bail!(
                        "containerd exited during start-up ({status}):\n{}",
                        process.log()
                    );
                }
                let mut version = Command::new("ctr");
                version.arg("--address").arg(&probe_address).arg("version");
                Ok(process::run(&mut version, Duration::from_secs(5)).is_ok())
            },
        )?;
        let suffix: String = base
            .parent()
            .and_then(Path::file_name)
            .map(|name| {
                name.to_string_lossy()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Containerd {
            address,
            namespace: format!("shoal-test-{suffix}"),
            run_logs: fixture.mkdir("containerd/runs")?,
            runs: AtomicUsize::new(0),
            _process: process,
        })
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The namespace [`Containerd::ctr`] works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runs `ctr --address <sock> -n <namespace> <args>`; returns stdout, or an error carrying
    /// the command, status and stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.ctr_in(&self.namespace, args)
    }

    /// Waits (bounded) until containerd lists `snapshotter` again after a restart of the
    /// daemon. containerd answers a listing from its own metadata, so this does not prove its
    /// connection to the daemon is back (a Prepare/Remove probe would, but a removed snapshot
    /// stays in the daemon until containerd's garbage collection, which tests that list the
    /// daemon's snapshots would see).
    pub fn wait_for_snapshotter(&self, snapshotter: &str) -> Result<()> {
        wait_until(
            &format!("containerd to reach the {snapshotter} snapshotter"),
            Duration::from_secs(30),
            || {
                self.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
                Ok(true)
            },
        )
    }

    /// [`Containerd::ctr`] in another namespace (the CRI plugin works in `k8s.io`).
    ///
    /// A `ctr run` that waits for its container gets the container's output from a file the
    /// shim writes (`--log-uri file://`), stdout and stderr together: ctr's own copy from the
    /// shim's FIFOs can lose what a container printed just before it exited (seen on a loaded
    /// machine as a run that exits 0 having printed nothing), and the shim finishes writing
    /// the file before the task's deletion returns.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.address)
            .arg("-n")
            .arg(namespace);
        let waits_for_output = args.first() == Some(&"run")
            && !args
                .iter()
                .any(|arg| matches!(*arg, "-d" | "--detach" | "--log-uri"));
        if !waits_for_output {
            command.args(args);
            return process::run(&mut command, CTR_TIMEOUT);
        }
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let log = self.run_logs.join(format!("run-{run}.log"));
        command
            .arg("run")
            .arg("--log-uri")
            .arg(format!("file://{}", log.display()))
            .args(&args[1..]);
        let ran = process::run(&mut command, CTR_TIMEOUT);
        let output = fs::read_to_string(&log).unwrap_or_default();
        match ran {
            Ok(_) => Ok(output),
            Err(err) => Err(err.context(format!("the container printed:\n{output}"))),
        }
    }
}

/// The CRI plugin's section of containerd's (version 2) configuration.
fn cri_config(options: &Options) -> String {
    const CRI: &str = "plugins.\"io.containerd.grpc.v1.cri\"";
    let mut config = String::new();
    if let Some(snapshotter) = &options.cri_snapshotter {
        config.push_str(&format!(
            "\n[{CRI}.containerd]\n  snapshotter = \"{snapshotter}\"\n  \
             disable_snapshot_annotations = {}\n",
            options.cri_without_annotations
        ));
    }
    for host in &options.cri_plain_http {
        config.push_str(&format!(
            "\n[{CRI}.registry.mirrors.\"{host}\"]\n  endpoint = [\"http://{host}\"]\n"
        ));
    }
    config
}
