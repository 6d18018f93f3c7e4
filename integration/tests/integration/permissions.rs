//! What a second local user can see of the daemon's root: nothing. The cache holds layer
//! bytes as the registry sent them (a file that is 0600 inside the image is plain gzip
//! there), the metadata names every image; `nobody` must be refused both, while containers,
//! non-root ones included, still run from the lazily mounted layers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{privileged, Fixture};
use crate::lazy::{data_image, Stack};
use crate::process;
use crate::tree;

const SECRET: &str = "the image's private key\n";

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The cache's data files.
fn data_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(root.join("cache"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "data") {
            files.push(path);
        }
    }
    anyhow::ensure!(
        !files.is_empty(),
        "nothing in the cache: the test proves nothing"
    );
    Ok(files)
}

/// `cat path` as user `nobody`: its stderr when refused, an error when it read the file.
fn cat_as_nobody(path: &Path) -> Result<String> {
    let mut cat = Command::new("runuser");
    cat.args(["-u", "nobody", "--", "cat"]).arg(path);
    match process::run(&mut cat, Duration::from_secs(20)) {
        Ok(out) => anyhow::bail!("nobody read {} ({} bytes)", path.display(), out.len()),
        Err(refused) => Ok(format!("{refused:#}")),
    }
}

/// Every mode the daemon must keep: root and its directories 0700, cache files and the
/// metadata 0600; and `nobody` gets "Permission denied" from each data file.
fn ensure_private(root: &Path) -> Result<()> {
    for dir in [root.to_owned(), root.join("cache"), root.join("snapshots")] {
        let mode = mode(&dir)?;
        anyhow::ensure!(mode == 0o700, "{} is {mode:o}, not 700", dir.display());
    }
    let mut files = data_files(root)?;
    files.push(root.join("metadata.db"));
    for file in &files {
        let mode = mode(file)?;
        anyhow::ensure!(mode == 0o600, "{} is {mode:o}, not 600", file.display());
        let refused = cat_as_nobody(file)?;
        anyhow::ensure!(
            refused.contains("Permission denied"),
            "nobody was refused {} otherwise: {refused}",
            file.display()
        );
    }
    Ok(())
}

#[test]
fn a_local_user_cannot_read_cached_layers_and_old_wide_modes_are_narrowed_at_start() {
    privileged!();
    Fixture::run(|fixture| {
        // The fixture directory is the test's own (0700): open it, so that only the daemon's
        // modes stand between `nobody` and its root.
        chmod(fixture.dir(), 0o755)?;
        let mut stack = Stack::start(fixture, "")?;
        let (mut layers, _) = data_image(&[("blob", 1 << 20)])?;
        layers[1].extend([
            tree::file("/data/secret", SECRET, 0o600),
            tree::file(
                "/etc/passwd",
                "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
                0o644,
            ),
            tree::symlink("busybox", "/bin/su"),
        ]);
        let image = stack.publish(fixture, "private", &layers)?;
        let pulled = stack.rpull(&image.estargz)?;
        anyhow::ensure!(pulled.contains("2 lazy"), "not mounted lazily: {pulled}");
        let root = stack.daemon.root().to_owned();

        // Containers still run from the lazy layers under a 0700 root, as root and as nobody.
        let read = stack.run(&image.estargz, "as-root", "cat /data/secret")?;
        anyhow::ensure!(read == SECRET, "root in the container read {read:?}");
        let unprivileged = stack.run(
            &image.estargz,
            "as-nobody",
            // The refusal on stdout too: the shim copies stdout and stderr into the log file
            // from two pipes, in no order between them.
            "su -s /bin/sh nobody -c 'id -u; cat /etc/greeting; cat /data/secret 2>&1 || true'",
        )?;
        anyhow::ensure!(
            unprivileged.starts_with("65534\nhello from shoal\n") && !unprivileged.contains(SECRET),
            "nobody in the container saw {unprivileged:?}"
        );
        ensure_private(&root)?;

        // A root an earlier version left open to everyone is narrowed when the daemon starts.
        stack.daemon.stop()?;
        for dir in [root.clone(), root.join("cache"), root.join("snapshots")] {
            chmod(&dir, 0o755)?;
        }
        for file in data_files(&root)?
            .into_iter()
            .chain([root.join("metadata.db")])
        {
            chmod(&file, 0o644)?;
        }
        let leaked = data_files(&root)?;
        let mut cat = Command::new("runuser");
        cat.args(["-u", "nobody", "--", "cat"]).arg(&leaked[0]);
        anyhow::ensure!(
            process::run(&mut cat, Duration::from_secs(20)).is_ok(),
            "with 0755/0644 nobody could not read the cache: the check below proves nothing"
        );
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        ensure_private(&root)?;
        let read = stack.run(&image.estargz, "after-restart", "cat /data/secret")?;
        anyhow::ensure!(read == SECRET, "after the restart root read {read:?}");
        Ok(())
    });
}
