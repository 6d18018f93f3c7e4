//! The DaemonSet's node setup, `shoal-node-setup` in the image, run under containerd
//! against a copy of this machine's own containerd config: it merges Shoal's settings into a
//! file with other plugins (read back by containerd itself), does nothing on a second run,
//! refuses a file it cannot parse without touching it, and keeps a backup; containerd is
//! "restarted" (a command the test records) only when the file changed.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::containerd::{self, Containerd};
use crate::deploy_image::{import, IMAGE};
use crate::fixture::{privileged, Fixture};
use crate::process;

/// This machine's containerd config, or containerd's defaults where it has none.
fn machine_config() -> Result<String> {
    match fs::read_to_string("/etc/containerd/config.toml") {
        Ok(text) if text.contains("[plugins") => Ok(text),
        _ => process::run(
            Command::new("containerd").args(["config", "default"]),
            Duration::from_secs(30),
        ),
    }
}

/// What containerd itself makes of `file`: `containerd --config FILE config dump`.
fn dump(file: &Path) -> Result<toml::Value> {
    let text = process::run(
        Command::new("containerd")
            .arg("--config")
            .arg(file)
            .args(["config", "dump"]),
        Duration::from_secs(30),
    )?;
    toml::from_str(&text).with_context(|| format!("parse containerd's dump: {text}"))
}

/// The files named `config.toml.shoal-backup-*` in `dir`.
fn backups(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|name| {
            name.to_string_lossy()
                .starts_with("config.toml.shoal-backup-")
        }) {
            found.push(path);
        }
    }
    Ok(found)
}

#[test]
fn node_setup_merges_into_this_machines_containerd_config_once_and_refuses_a_broken_one() {
    privileged!();
    Fixture::run(|fixture| {
        let ctd = Containerd::start(fixture, &containerd::Options::default())?;
        import(&ctd)?;
        let host_etc = fixture.mkdir("host-etc-containerd")?;
        let template_dir = fixture.mkdir("template")?;
        let shoal_etc = fixture.mkdir("shoal-etc")?;
        let containerd_root = fixture.mkdir("host-var-lib-containerd")?;
        let host_bin = fixture.mkdir("host-opt-shoal-bin")?;
        let tls = fixture.mkdir("tls")?;
        // The cluster's peer CA, as the Job leaves it in its Secret.
        let ca = fixture.mkdir("ca")?;
        process::run(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
                .args(["-subj", "/CN=test peer CA", "-keyout"])
                .arg(ca.join("ca.key"))
                .arg("-out")
                .arg(ca.join("ca.pem")),
            Duration::from_secs(30),
        )?;
        let file = host_etc.join("config.toml");
        let original = machine_config()?;
        fs::write(&file, &original)?;
        let before = dump(&file)?;
        fs::write(
            template_dir.join("config.toml"),
            "[metrics]\naddress = \"@NODE_IP@:9464\"\n",
        )?;
        let restarts = host_etc.join("restarts");
        let runs = std::cell::Cell::new(0);
        // The scripts' output goes to a file of the test's: containerd 1.6's shim can lose
        // what a container that exits at once wrote (seen in CI: "error copying stderr", and
        // the refusal below read as empty).
        let out = fixture.mkdir("out")?;
        let setup = || {
            runs.set(runs.get() + 1);
            let _ = fs::remove_file(out.join("log"));
            let ran = ctd.ctr(&[
                "run",
                "--mount",
                &format!("type=bind,src={},dst=/out,options=rbind:rw", out.display()),
                "--rm",
                "--mount",
                &format!(
                    "type=bind,src={},dst=/host/etc/containerd,options=rbind:rw",
                    host_etc.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/etc/shoal-template,options=rbind:ro",
                    template_dir.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/etc/shoal,options=rbind:rw",
                    shoal_etc.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/host/var/lib/containerd,options=rbind:rw",
                    containerd_root.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/host/opt/shoal/bin,options=rbind:rw",
                    host_bin.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/etc/shoal-ca,options=rbind:ro",
                    ca.display()
                ),
                "--mount",
                &format!(
                    "type=bind,src={},dst=/etc/shoal-tls,options=rbind:rw",
                    tls.display()
                ),
                "--env",
                "SHOAL_HOST_BIN_DIR=/host/opt/shoal/bin",
                "--env",
                "NODE_IP=127.0.0.1",
                "--env",
                "RESTART_CONTAINERD=echo restarted >> /host/etc/containerd/restarts",
                // No daemon here to wait for.
                "--env",
                "SHOAL_SOCKET=",
                IMAGE,
                &format!("setup-{}", runs.get()),
                "sh",
                "-c",
                // The pod's `containerd-config` container, then its init container's steps.
                "{ shoal-node-setup containerd && shoal-node-setup; } >/out/log 2>&1",
            ]);
            let output = fs::read_to_string(out.join("log")).unwrap_or_default();
            ran.map(|_| output.clone())
                .with_context(|| format!("the scripts printed:\n{output}"))
        };
        let restart_count = || {
            fs::read_to_string(&restarts)
                .map(|text| text.lines().count())
                .unwrap_or(0)
        };

        let first = setup()?;
        anyhow::ensure!(first.contains("shoal-node-setup: changed: "), "{first}");
        assert_eq!(restart_count(), 1, "containerd restarted once: {first}");
        let kept = backups(&host_etc)?;
        assert_eq!(kept.len(), 1, "one backup: {kept:?}");
        assert_eq!(
            fs::read_to_string(&kept[0])?,
            original,
            "the backup is the original"
        );
        let merged_text = fs::read_to_string(&file)?;
        let after = dump(&file)?;
        let cri = &after["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("shoal"));
        assert_eq!(
            cri["containerd"]["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert_eq!(
            after["proxy_plugins"]["shoal"]["address"].as_str(),
            Some("/run/shoal/shoal.sock")
        );
        // Everything else containerd read from the file is as it was.
        let mut unchanged = after.clone();
        unchanged
            .as_table_mut()
            .context("dump is not a table")?
            .remove("proxy_plugins");
        let before_cri = &before["plugins"]["io.containerd.grpc.v1.cri"];
        let fields = unchanged["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
            .as_table_mut()
            .context("no cri containerd table")?;
        for key in ["snapshotter", "disable_snapshot_annotations"] {
            fields.insert(key.to_owned(), before_cri["containerd"][key].clone());
        }
        let mut before_without = before.clone();
        before_without
            .as_table_mut()
            .context("dump is not a table")?
            .remove("proxy_plugins");
        assert_eq!(unchanged, before_without, "only Shoal's keys changed");
        for line in original
            .lines()
            .filter(|line| line.trim_start().starts_with('#'))
        {
            anyhow::ensure!(merged_text.contains(line), "comment {line:?} lost");
        }
        let imagefs = containerd_root.join("io.containerd.snapshotter.v1.shoal");
        assert_eq!(
            fs::read_link(&imagefs).context("kubelet's image filesystem is not linked")?,
            Path::new("/var/lib/shoal")
        );
        // The node's peer certificate: from the CA, for the node's address, both usages.
        let verified = process::run(
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(ca.join("ca.pem"))
                .args(["-purpose", "sslserver"])
                .arg(tls.join("tls.crt")),
            Duration::from_secs(30),
        )?;
        anyhow::ensure!(verified.contains(": OK"), "{verified}");
        let text = process::run(
            Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(tls.join("tls.crt")),
            Duration::from_secs(30),
        )?;
        for wanted in ["IP Address:127.0.0.1", "TLS Web Client Authentication"] {
            anyhow::ensure!(
                text.contains(wanted),
                "no {wanted} in the certificate: {text}"
            );
        }
        assert_eq!(fs::read(tls.join("ca.pem"))?, fs::read(ca.join("ca.pem"))?);
        // The CLI on the host runs.
        let version = process::run(
            Command::new(host_bin.join("shoal")).arg("--version"),
            Duration::from_secs(30),
        )?;
        anyhow::ensure!(version.starts_with("shoal 0.1.0"), "{version}");
        let rendered = fs::read_to_string(shoal_etc.join("config.toml"))?;
        assert_eq!(rendered, "[metrics]\naddress = \"127.0.0.1:9464\"\n");

        let second = setup()?;
        anyhow::ensure!(second.contains("shoal-node-setup: unchanged: "), "{second}");
        assert_eq!(
            restart_count(),
            1,
            "no restart for an unchanged file: {second}"
        );
        assert_eq!(
            fs::read_to_string(&file)?,
            merged_text,
            "the file is as it was"
        );
        assert_eq!(backups(&host_etc)?.len(), 1, "no backup without a change");

        let broken = format!("{merged_text}\n[plugins.\"io.containerd.grpc.v1.cri\"\n");
        fs::write(&file, &broken)?;
        let refused = setup();
        let error = format!("{:#}", refused.err().context("a broken file was accepted")?);
        anyhow::ensure!(error.contains("left as it is"), "{error}");
        assert_eq!(
            fs::read_to_string(&file)?,
            broken,
            "the broken file is untouched"
        );
        assert_eq!(restart_count(), 1, "no restart for a refused file");
        assert_eq!(backups(&host_etc)?.len(), 1, "no backup of a refused file");
        Ok(())
    });
}

/// The calls the recording `systemctl` got, one line each.
fn calls(file: &Path) -> Vec<String> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn on_a_systemd_host_node_setup_installs_the_daemon_as_the_hosts_unit_and_restarts_it_only_on_change(
) {
    privileged!();
    Fixture::run(|fixture| {
        let ctd = Containerd::start(fixture, &containerd::Options::default())?;
        import(&ctd)?;
        let units = fixture.mkdir("host-etc-systemd-system")?;
        let host_bin = fixture.mkdir("host-opt-shoal-bin")?;
        let template_dir = fixture.mkdir("template")?;
        let shoal_etc = fixture.mkdir("host-etc-shoal")?;
        // The host's /run/systemd as a systemd host has it: `system` in it says systemd runs.
        let run_systemd = fixture.mkdir("host-run-systemd")?;
        fs::create_dir(run_systemd.join("system"))?;
        let record = fixture.mkdir("record")?;
        fs::write(record.join("systemctl"), "echo \"$*\" >> /record/calls\n")?;
        let template = template_dir.join("config.toml");
        fs::write(&template, "[metrics]\naddress = \"@NODE_IP@:9464\"\n")?;
        let bind = |src: &Path, dst: &str, options: &str| {
            format!(
                "type=bind,src={},dst={dst},options=rbind:{options}",
                src.display()
            )
        };
        let mounts = [
            bind(&units, "/host/etc/systemd/system", "rw"),
            bind(&host_bin, "/host/opt/shoal/bin", "rw"),
            bind(&template_dir, "/etc/shoal-template", "ro"),
            bind(&shoal_etc, "/etc/shoal", "rw"),
            bind(&run_systemd, "/host/run/systemd", "ro"),
            bind(&record, "/record", "rw"),
        ];
        let runs = std::cell::Cell::new(0);
        let run = |command: &str| {
            runs.set(runs.get() + 1);
            let name = format!("host-setup-{}", runs.get());
            // To a file of the test's, as above: the shim can lose a short run's output.
            let script = format!("{{ {command}; }} >/record/out 2>&1");
            let mut args: Vec<&str> = vec!["run", "--rm"];
            for mount in &mounts {
                args.extend(["--mount", mount]);
            }
            let _ = fs::remove_file(record.join("out"));
            args.extend([
                "--env",
                "SHOAL_HOST_BIN_DIR=/host/opt/shoal/bin",
                "--env",
                "HOST_ROOT=/host",
                "--env",
                "HOST_SYSTEMCTL=sh /record/systemctl",
                "--env",
                "NODE_IP=127.0.0.1",
                "--env",
                "CONTAINERD_ROOT=/nonexistent",
                IMAGE,
                &name,
                "sh",
                "-c",
                &script,
            ]);
            let ran = ctd.ctr(&args);
            let output = fs::read_to_string(record.join("out")).unwrap_or_default();
            ran.map(|_| output.clone())
                .with_context(|| format!("the scripts printed:\n{output}"))
        };
        let record_calls = record.join("calls");

        assert_eq!(run("shoal-node-setup mode")?.trim(), "host");
        let first = run("shoal-node-setup")?;
        anyhow::ensure!(
            first.contains("the host runs the daemon: shoal-snapshotter.service"),
            "{first}"
        );
        assert_eq!(
            calls(&record_calls),
            [
                "daemon-reload",
                "enable shoal-fdholder.service shoal-snapshotter.service",
                "start shoal-fdholder.service",
                "restart shoal-snapshotter.service",
            ],
            "{first}"
        );
        let unit = fs::read_to_string(units.join("shoal-snapshotter.service"))?;
        for wanted in [
            "ExecStart=/opt/shoal/bin/shoal-snapshotter --config /etc/shoal/config.toml",
            // After a reboot the daemon serves before containerd starts pulling through it.
            "Before=containerd.service",
            "WantedBy=multi-user.target",
            "Type=notify",
        ] {
            anyhow::ensure!(unit.contains(wanted), "no {wanted:?} in the unit:\n{unit}");
        }
        anyhow::ensure!(!unit.contains('@'), "a placeholder is left:\n{unit}");
        let holder = fs::read_to_string(units.join("shoal-fdholder.service"))?;
        anyhow::ensure!(
            holder.contains(
                "ExecStart=/opt/shoal/bin/shoal-fdholder --socket /run/shoal/fdholder.sock"
            ),
            "{holder}"
        );
        for binary in ["shoal", "shoal-snapshotter", "shoal-fdholder"] {
            let version = process::run(
                Command::new(host_bin.join(binary)).arg("--version"),
                Duration::from_secs(30),
            )?;
            anyhow::ensure!(version.contains("0.1.0"), "{binary}: {version}");
        }
        assert_eq!(
            fs::read_to_string(shoal_etc.join("config.toml"))?,
            "[metrics]\naddress = \"127.0.0.1:9464\"\n"
        );

        // Nothing changed: the units are started (a no-op when they run), not restarted.
        fs::remove_file(&record_calls)?;
        let second = run("shoal-node-setup")?;
        assert_eq!(
            calls(&record_calls),
            [
                "enable shoal-fdholder.service shoal-snapshotter.service",
                "start shoal-fdholder.service",
                "start shoal-snapshotter.service",
            ],
            "{second}"
        );

        // A changed config restarts the daemon (its mounts carried over), never the holder.
        fs::remove_file(&record_calls)?;
        fs::write(&template, "[metrics]\naddress = \"@NODE_IP@:9465\"\n")?;
        let third = run("shoal-node-setup")?;
        assert_eq!(
            calls(&record_calls),
            [
                "enable shoal-fdholder.service shoal-snapshotter.service",
                "start shoal-fdholder.service",
                "restart shoal-snapshotter.service",
            ],
            "{third}"
        );

        // The pods' containers follow the host's units instead of running their own: the
        // holder's container takes no socket, the daemon's starts no daemon.
        let followed = run(
            "timeout 3 shoal-run-holder; timeout 3 shoal-run-daemon; ls /run/shoal; echo listed",
        )?;
        anyhow::ensure!(
            followed.contains("the host runs the holder (shoal-fdholder.service)")
                && followed.contains("the host runs the daemon (shoal-snapshotter.service)")
                && followed.contains("listed")
                && !followed.contains("fdholder.sock")
                && !followed.contains("started shoal-snapshotter"),
            "{followed}"
        );

        // Without systemd on the host: the pod runs the daemon, no unit is touched.
        fs::remove_dir(run_systemd.join("system"))?;
        fs::remove_file(&record_calls)?;
        assert_eq!(run("shoal-node-setup mode")?.trim(), "pod");
        run("shoal-node-setup")?;
        assert!(calls(&record_calls).is_empty(), "systemctl was called");
        Ok(())
    });
}
