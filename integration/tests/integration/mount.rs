//! Performing the mounts a snapshotter returns, the way containerd would, with mount(8).

use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use containerd_snapshots::api::types::Mount;
use nix::mount::MntFlags;

use crate::process;

/// The kernel copies at most one page of mount options.
const MAX_OPTIONS_LEN: usize = 4096;

/// Mounts every entry of `mounts` on `target`, in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    anyhow::ensure!(!mounts.is_empty(), "the snapshotter returned no mounts");
    for entry in mounts {
        mount_one(entry, target)
            .with_context(|| format!("mount {} on {}", describe(entry), target.display()))?;
    }
    Ok(())
}

fn mount_one(entry: &Mount, target: &Path) -> Result<()> {
    let mut command = Command::new("mount");
    let mut options = entry.options.clone();
    if entry.r#type == "overlay" && options.join(",").len() >= MAX_OPTIONS_LEN {
        // Too long for one page: run mount(8) from the lowerdirs' common parent and name them
        // relative to it, as containerd's mount package does.
        let (parent, relative) = compact_lowerdirs(&options)?;
        command.current_dir(parent);
        options = relative;
    }
    if entry.r#type != "bind" {
        command.arg("-t").arg(&entry.r#type);
    }
    if !options.is_empty() {
        command.arg("-o").arg(options.join(","));
    }
    command.arg(&entry.source).arg(target);
    process::run(&mut command, Duration::from_secs(20))?;
    Ok(())
}

/// Rewrites the `lowerdir=` option relative to the lowerdirs' deepest common directory.
fn compact_lowerdirs(options: &[String]) -> Result<(PathBuf, Vec<String>)> {
    let lowerdirs: Vec<&Path> = options
        .iter()
        .find_map(|option| option.strip_prefix("lowerdir="))
        .context("overlay mount without lowerdir")?
        .split(':')
        .map(Path::new)
        .collect();
    let mut common: Vec<Component> = lowerdirs[0]
        .parent()
        .unwrap_or(lowerdirs[0])
        .components()
        .collect();
    for dir in &lowerdirs[1..] {
        let shared = common
            .iter()
            .zip(dir.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(shared);
    }
    let parent: PathBuf = common.iter().collect();
    anyhow::ensure!(
        parent != Path::new("/"),
        "lowerdirs share no parent below /"
    );
    let relative: Vec<String> = lowerdirs
        .iter()
        .map(|dir| {
            dir.strip_prefix(&parent)
                .map(|rel| rel.to_string_lossy().into_owned())
                .context("lowerdir outside its common parent")
        })
        .collect::<Result<_>>()?;
    let options = options
        .iter()
        .map(|option| {
            if option.starts_with("lowerdir=") {
                format!("lowerdir={}", relative.join(":"))
            } else {
                option.clone()
            }
        })
        .collect();
    Ok((parent, options))
}

fn describe(entry: &Mount) -> String {
    let options = entry.options.join(",");
    let shown = if options.len() > 300 {
        format!("{}... ({} bytes)", &options[..300], options.len())
    } else {
        options
    };
    format!("{} {} [{shown}]", entry.r#type, entry.source)
}

/// Unmounts `target`, retrying briefly while it is busy, then detaching it lazily.
pub fn unmount(target: &Path) -> Result<()> {
    for _ in 0..20 {
        match nix::mount::umount(target) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => return Err(err).with_context(|| format!("umount {}", target.display())),
        }
    }
    detach(target)
}

/// Lazily unmounts `target`.
pub fn detach(target: &Path) -> Result<()> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH)
        .with_context(|| format!("umount -l {}", target.display()))
}

/// Mount points at or below `dir`, shallowest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort_by_key(|point| point.components().count());
    found
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(value) = field
                .get(i + 1..i + 4)
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
            {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
