//! `shoal convert --optimize`: learn which files the image's command reads at start, so each
//! layer can put them first, in read order, before its `.prefetch.landmark`.
//!
//! The layers are unpacked (whiteouts honoured) onto a tmpfs of their own, the command runs
//! once there under runc while fanotify records every file opened on that tmpfs, and each read
//! path is attributed to the top-most layer that provides it. The eStargz builder then places
//! each layer's files first with whatever parent directory entries that layer has: a file whose
//! parent directories exist only in a lower layer is still prioritized (the reference builder
//! counts such a file as missing and leaves it unprioritized).
//!
//! - [`attribution`]: which layer provides each read path (pure).
//! - [`fanotify`]: the recording of opens on the rootfs filesystem.
//! - [`sandbox`]: the process from the image config, and its one run under runc.

pub mod attribution;
pub mod fanotify;
pub mod sandbox;

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::mount::{MntFlags, MsFlags};

use self::attribution::{attribute, LayerFiles};
use self::fanotify::Recorder;
use self::sandbox::{Ending, ProcessSpec};
use super::job::Job;
use super::overlaybd_disk::apply_tar;
use crate::pull::Progress;

/// How long the command may run when not told otherwise: long-running entrypoints (servers)
/// are stopped then, and what they read until that moment is what gets prioritized.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--optimize` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Optimize {
    /// Replaces the image's Entrypoint and Cmd when not empty.
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// What the run taught: each layer's files in read order, bottom layer first.
#[derive(Debug, Clone)]
pub struct Learned {
    pub per_layer: Vec<Vec<String>>,
}

/// The line telling what ran and how it ended.
struct RunLine<'a> {
    spec: &'a ProcessSpec,
    uid: u32,
    gid: u32,
    run: &'a sandbox::Run,
    files: usize,
    timeout: Duration,
}

impl fmt::Display for RunLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "optimize: ran {:?} as {}:{} in {}: ",
            self.spec.args, self.uid, self.gid, self.spec.cwd
        )?;
        match self.run.ending {
            Ending::Exited(code) => write!(f, "exited with status {code}")?,
            Ending::TimedOut => write!(
                f,
                "still running at the {}s timeout, stopped",
                self.timeout.as_secs_f64()
            )?,
        }
        write!(
            f,
            " after {:.1}s; {} files read from the image",
            self.run.elapsed.as_secs_f64(),
            self.files
        )
    }
}

/// Runs the job's image once as `optimize` says and returns each layer's files to prioritize.
/// A command that exits with a non-zero status fails the conversion (with the end of its
/// output); one still running at the timeout is stopped and what it read is kept.
pub async fn learn(
    job: &Job,
    optimize: &Optimize,
    work_dir: &Path,
    progress: &Progress,
) -> anyhow::Result<Learned> {
    let spec = ProcessSpec::from_config(&job.config, &optimize.command)?;
    let dir = work_dir.join("optimize");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).with_context(|| format!("create {}", rootfs.display()))?;
    let tmpfs = Tmpfs::mount(&rootfs)?;
    let mut layers = Vec::with_capacity(job.manifest.layers.len());
    let count = job.manifest.layers.len();
    for (index, descriptor) in job.manifest.layers.iter().enumerate() {
        progress.start(index + 1, count, &descriptor.digest, descriptor.size);
        let blob = job
            .source
            .layer(descriptor, work_dir, &|bytes| progress.bytes(bytes))
            .await?;
        let (path, root) = (blob.path.clone(), rootfs.clone());
        let files = tokio::task::spawn_blocking(move || unpack(&path, &root))
            .await
            .context("the unpack task did not finish")?
            .with_context(|| format!("unpack layer {}/{count} {}", index + 1, descriptor.digest))?;
        if blob.downloaded {
            std::fs::remove_file(&blob.path)
                .with_context(|| format!("remove {}", blob.path.display()))?;
        }
        layers.push(files);
    }
    progress.finish();
    let (uid, gid) = sandbox::resolve_user(&rootfs, &spec.user)?;
    let config = sandbox::runtime_config(&spec, &rootfs, uid, gid);
    let recorder = Recorder::start(&rootfs)?;
    let run = sandbox::run(&dir, &config, optimize.timeout).await;
    let recording = recorder.finish();
    tmpfs.unmount()?;
    let (run, recording) = (run?, recording?);
    if recording.overflowed {
        progress.line(&"optimize: the kernel dropped some open events; the list is partial");
    }
    let opened: Vec<String> = recording
        .opened
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let per_layer = attribute(&opened, &layers);
    progress.line(&RunLine {
        spec: &spec,
        uid,
        gid,
        run: &run,
        files: per_layer.iter().map(Vec::len).sum(),
        timeout: optimize.timeout,
    });
    if let Ending::Exited(code) = run.ending {
        if code != 0 {
            bail!(
                "the command {:?} exited with status {code}; nothing was pushed. Its output \
                 ended with:\n{}",
                spec.args,
                run.output_tail
            );
        }
    }
    Ok(Learned { per_layer })
}

/// Applies the layer blob at `path` (gzip or plain tar) onto `root`.
fn unpack(path: &Path, root: &Path) -> anyhow::Result<LayerFiles> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let gzip = reader
        .fill_buf()
        .with_context(|| format!("read {}", path.display()))?
        .starts_with(&[0x1f, 0x8b]);
    let tar: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    apply_tar(tar, root)
}

/// A tmpfs of the rootfs's own, so the fanotify mark sees nothing but the run; unmounted
/// (lazily, if busy) when dropped.
struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(path: &Path) -> anyhow::Result<Tmpfs> {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )
        .with_context(|| {
            format!(
                "mount a tmpfs on {} (optimizing needs root)",
                path.display()
            )
        })?;
        Ok(Tmpfs {
            path: path.to_owned(),
            mounted: true,
        })
    }

    fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        nix::mount::umount2(&self.path, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount {}", self.path.display()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH);
        }
    }
}
