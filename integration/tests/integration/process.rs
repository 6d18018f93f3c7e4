//! A child process owned by a test: its output goes to a log file, and it is killed on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// A spawned program whose stdout and stderr are captured in `log`.
pub struct Process {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `command` with both output streams appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Process> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log {}", log.display()))?;
        let err = out.try_clone().context("duplicate log handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {name}: {command:?}"))?;
        Ok(Process {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|err| format!("<unreadable log: {err}>"))
    }

    /// The exit status if the process has ended (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("wait for {}", self.name))?;
        }
        Ok(self.status)
    }

    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            anyhow::bail!("{} already exited, cannot send {sig}", self.name);
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        signal::kill(pid, sig).with_context(|| format!("send {sig} to {}", self.name))
    }

    /// Waits at most `timeout` for the process to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap; a process that already ended is left alone.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(10))?
            .with_context(|| format!("{} survived SIGKILL for 10s", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(err) = self.kill() {
            eprintln!("cleanup: {}: {err:#}", self.name);
        }
    }
}

/// Runs a short-lived command to completion, bounded by `timeout`, returning its stdout; on a
/// non-zero exit or a timeout the error carries the command line, status and stderr.
pub fn run(command: &mut Command, timeout: Duration) -> Result<String> {
    let described = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {described}"))?;
    // Drain both pipes on their own threads so a chatty command cannot block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => anyhow::bail!(
            "{described} failed ({status})\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
        ),
        None => anyhow::bail!(
            "{described} timed out after {timeout:?}\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
        ),
    }
}

fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}
