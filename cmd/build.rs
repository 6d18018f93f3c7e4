//! Stamps the binaries with the commit they were built from (`SHOAL_COMMIT`), so that every
//! `--version` names it. A build outside git (a source tarball) says `unknown`, unless the
//! packager sets `SHOAL_COMMIT` itself.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SHOAL_COMMIT");
    let commit = std::env::var("SHOAL_COMMIT")
        .ok()
        .filter(|commit| !commit.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=SHOAL_COMMIT={commit}");
}

/// The short hash of HEAD; also asks cargo to run this again when HEAD moves.
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=7", "HEAD"])?;
    // HEAD names a branch whose ref file (or packed-refs) moves on each commit; a worktree's
    // HEAD lives in its own git dir, the refs in the common one.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|name| git(&["rev-parse", "--git-path", &name])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        let path = PathBuf::from(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}

fn git(args: &[&str]) -> Option<String> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let output = Command::new("git")
        .args(args)
        .current_dir(&manifest_dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    if text.is_empty() {
        return None;
    }
    // `--git-path` answers relative to the directory it ran in.
    if args.contains(&"--git-path") && !text.starts_with('/') {
        return Some(PathBuf::from(manifest_dir).join(text).display().to_string());
    }
    Some(text)
}
