//! `scripts/install.sh` staged into a temporary directory (`--destdir`), from the binaries
//! this test run built: stripped binaries that still run, their debug info split off and
//! linked, the README the unit's `Documentation=` names, a valid config; `--uninstall`
//! removes all of it but the config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::fixture::Fixture;
use crate::process;

const PREFIX: &str = "/opt/shoal-test";
/// Stripping two debug binaries of a few hundred MB each.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

fn install_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh")
}

fn install(destdir: &Path, extra: &[&str]) -> Result<String> {
    let built = binary::cli()?;
    let from = built.parent().context("the CLI has no directory")?;
    let mut command = Command::new("bash");
    command
        .arg(install_script())
        .args(["--prefix", PREFIX, "--destdir"])
        .arg(destdir)
        .arg("--from")
        .arg(from)
        .args(extra);
    process::run(&mut command, INSTALL_TIMEOUT)
}

/// The section names of ELF file `path`, from `readelf`.
fn sections(path: &Path) -> Result<String> {
    process::run(
        Command::new("readelf")
            .arg("--section-headers")
            .arg("--wide")
            .arg(path),
        Duration::from_secs(60),
    )
}

#[test]
fn a_staged_install_ships_stripped_binaries_and_uninstalls_cleanly() {
    Fixture::run(|fixture| {
        let root = fixture.mkdir("staged")?;
        let out = install(&root, &[])?;
        let bin = root.join(PREFIX.trim_start_matches('/')).join("bin");
        for name in ["shoal", "shoal-snapshotter"] {
            let installed = bin.join(name);
            let headers = sections(&installed)?;
            anyhow::ensure!(
                !headers.contains(".debug_info"),
                "{name} still carries debug info"
            );
            anyhow::ensure!(
                headers.contains(".gnu_debuglink"),
                "{name} has no debug link"
            );
            let debug = bin.join(".debug").join(format!("{name}.debug"));
            anyhow::ensure!(
                sections(&debug)?.contains(".debug_info"),
                "{} holds no debug info",
                debug.display()
            );
            let built = if name == "shoal" {
                binary::cli()?
            } else {
                binary::daemon()?
            };
            let version = |path: &Path| {
                process::run(Command::new(path).arg("--version"), Duration::from_secs(30))
            };
            assert_eq!(version(&installed)?, version(&built)?, "{name} --version");
            let (small, large) = (fs_len(&installed)?, fs_len(&built)?);
            anyhow::ensure!(
                small * 2 < large,
                "{name}: {small} bytes stripped of {large}"
            );
        }
        anyhow::ensure!(out.contains("shoal 0.1.0"), "{out}");
        let holder = bin.join("shoal-fdholder");
        anyhow::ensure!(
            !sections(&holder)?.contains(".debug_info"),
            "shoal-fdholder still carries debug info"
        );
        let holder_unit =
            std::fs::read_to_string(root.join("etc/systemd/system/shoal-fdholder.service"))
                .context("read the staged holder unit")?;
        anyhow::ensure!(
            holder_unit.contains(&format!("ExecStart={PREFIX}/bin/shoal-fdholder ")),
            "{holder_unit}"
        );

        let unit =
            std::fs::read_to_string(root.join("etc/systemd/system/shoal-snapshotter.service"))
                .context("read the staged unit")?;
        anyhow::ensure!(
            unit.contains(&format!("ExecStart={PREFIX}/bin/shoal-snapshotter ")),
            "{unit}"
        );
        // systemd waits for READY=1 and keeps the lazy mounts' connections in its fd store.
        for setting in [
            "Type=notify",
            "FileDescriptorStoreMax=",
            "FileDescriptorStorePreserve=yes",
        ] {
            anyhow::ensure!(unit.contains(setting), "the unit lacks {setting}: {unit}");
        }
        let documentation = unit
            .lines()
            .find_map(|line| line.strip_prefix("Documentation=file://"))
            .context("the unit's Documentation= is not a local file")?;
        let readme = root.join(documentation.trim_start_matches('/'));
        anyhow::ensure!(readme.is_file(), "{} is missing", readme.display());
        let config = root.join("etc/shoal/config.toml");
        let checked = process::run(
            Command::new(binary::daemon()?)
                .arg("--check-config")
                .arg(&config),
            Duration::from_secs(30),
        )?;
        anyhow::ensure!(checked.contains("valid"), "{checked}");

        // A second install over the first keeps an edited config.
        std::fs::write(&config, "# edited\n")?;
        install(&root, &[])?;
        assert_eq!(std::fs::read_to_string(&config)?, "# edited\n");

        let out = install(&root, &["--uninstall"])?;
        anyhow::ensure!(out.contains("kept the config"), "{out}");
        for gone in [
            bin.join("shoal"),
            bin.join("shoal-snapshotter"),
            bin.join("shoal-fdholder"),
            bin.join(".debug"),
            readme,
            root.join("etc/systemd/system/shoal-snapshotter.service"),
            root.join("etc/systemd/system/shoal-fdholder.service"),
        ] {
            anyhow::ensure!(!gone.exists(), "{} survived --uninstall", gone.display());
        }
        anyhow::ensure!(config.is_file(), "--uninstall removed the config");
        Ok(())
    });
}

#[test]
fn a_bad_argument_is_refused_with_its_name() {
    Fixture::run(|_| {
        let output = Command::new("bash")
            .arg(install_script())
            .arg("--prefx")
            .arg("/opt")
            .output()
            .context("run install.sh")?;
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(stderr.contains("unknown argument --prefx"), "{stderr}");
        Ok(())
    });
}

fn fs_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len())
}
