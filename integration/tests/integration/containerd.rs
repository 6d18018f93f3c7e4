//! A private containerd (Debian's 1.6) per test: its own root, state and sockets in the
//! fixture, Shoal registered as the `shoal` snapshot proxy plugin, and a `ctr` helper.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{wait_until, Fixture};
use crate::process::{self, Process};

/// Every `ctr` call works in this namespace.
pub const NAMESPACE: &str = "shoal-test";
const CTR_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Registers this socket as the `shoal` snapshotter proxy plugin.
    pub shoal_socket: Option<PathBuf>,
    /// Keeps containerd's CRI plugin (disabled by default: it needs CNI and is slow to start).
    pub cri: bool,
}

pub struct Containerd {
    address: PathBuf,
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
        Ok(Containerd {
            address,
            _process: process,
        })
    }

    /// Runs `ctr --address <sock> -n shoal-test <args>`; returns stdout, or an error carrying
    /// the command, status and stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.address)
            .arg("-n")
            .arg(NAMESPACE)
            .args(args);
        process::run(&mut command, CTR_TIMEOUT)
    }
}
