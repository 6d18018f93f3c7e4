//! Locating Shoal's binaries, which `cargo test` of this crate does not build.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The daemon, `target/<profile>/shoal-snapshotter`.
pub fn daemon() -> Result<PathBuf> {
    locate("shoal-snapshotter")
}

/// The CLI, `target/<profile>/shoal`.
pub fn cli() -> Result<PathBuf> {
    locate("shoal")
}

/// The daemon of the oldest release an upgrade takes mounts over from, which
/// `scripts/build-upgrade-base.sh` builds into `target/upgrade-base/` (with its fd holder
/// beside it); `None` when it has not been built.
pub fn upgrade_base_daemon() -> Result<Option<PathBuf>> {
    let daemon = daemon()?;
    let target = daemon
        .parent()
        .and_then(|profile| profile.parent())
        .with_context(|| format!("{} has no target/<profile> parent", daemon.display()))?;
    let path = target.join("upgrade-base/shoal-snapshotter");
    Ok(path.is_file().then_some(path))
}

/// This test executable is `target/<profile>/deps/integration-<hash>`; binaries sit in
/// `target/<profile>/`.
fn locate(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .with_context(|| format!("{} has no target/<profile>/deps parent", exe.display()))?;
    let path = profile_dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p shoal-cmd --bins` \
         (add --release when testing with --release)",
        path.display()
    );
    Ok(path)
}
