//! A long-lived container for restart tests: started detached, exec'd into by readers that
//! may block (a read held by a stalled registry), killed when dropped so that a failed test
//! leaves no task running.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::containerd::Containerd;
use crate::process;

/// How long a reader may block; a read across a restart takes a second or two.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A detached `sleep` container on the `shoal` snapshotter.
pub struct Keeper {
    address: PathBuf,
    namespace: String,
    id: String,
}

impl Keeper {
    /// Runs `image` detached as container `id`.
    pub fn start(ctd: &Containerd, image: &str, id: &str) -> Result<Keeper> {
        let run = ["run", "-d", "--snapshotter", "shoal", image, id];
        ctd.ctr(&[&run[..], &["sleep", "600"]].concat())?;
        Ok(Keeper {
            address: ctd.address().to_owned(),
            namespace: ctd.namespace().to_owned(),
            id: id.to_owned(),
        })
    }

    fn ctr(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", &self.namespace]);
        command
    }

    /// `sha256sum` of `paths` inside the container, as a child process that may block; its
    /// exec id is `exec`.
    pub fn start_sums(&self, exec: &str, paths: &[&str]) -> Result<Reader> {
        let mut command = self.ctr();
        command
            .args(["task", "exec", "--exec-id", exec, &self.id, "sha256sum"])
            .args(paths)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().context("start ctr task exec")?;
        Ok(Reader(child))
    }

    /// [`Keeper::start_sums`], waited for.
    pub fn sums(&self, exec: &str, paths: &[&str]) -> Result<String> {
        self.start_sums(exec, paths)?.finish()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let mut command = self.ctr();
        command.args(["task", "kill", "-s", "SIGKILL", &self.id]);
        let _ = process::run(&mut command, READ_TIMEOUT);
    }
}

/// A `sha256sum` running inside a [`Keeper`].
pub struct Reader(Child);

impl Reader {
    /// Waits (bounded by [`READ_TIMEOUT`]) and returns what it printed, or an error with its
    /// status and stderr.
    pub fn finish(mut self) -> Result<String> {
        let started = Instant::now();
        loop {
            if self.0.try_wait()?.is_some() {
                let output = self.0.wait_with_output()?;
                anyhow::ensure!(
                    output.status.success(),
                    "reader failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
                return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
            }
            if started.elapsed() > READ_TIMEOUT {
                let _ = self.0.kill();
                let _ = self.0.wait();
                anyhow::bail!("reader still blocked after {READ_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
