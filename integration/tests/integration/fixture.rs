//! The per-test sandbox: a short temporary directory, the logs of everything started in it, and
//! the cleanup that leaves the host as it was (stray processes killed, mounts detached).

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::mount;

/// Skips the calling test (returning from it) unless it can run as root with /dev/fuse; under
/// `CI=true` a missing privilege fails the test instead, so CI never silently skips.
macro_rules! privileged {
    () => {
        if let Some(reason) = $crate::fixture::missing_privilege() {
            let test = $crate::fixture::test_name();
            if $crate::fixture::in_ci() {
                panic!("{test} must run under CI=true but cannot: {reason}");
            }
            eprintln!("SKIP: {test} needs root and /dev/fuse ({reason})");
            return;
        }
    };
}
pub(crate) use privileged;

/// Why privileged tests cannot run here, or `None` when they can.
pub fn missing_privilege() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist".to_owned());
    }
    None
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// libtest names each test's thread after the test.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

/// A test's temporary directory (`/tmp/sh-XXXXXX`: unix socket paths must stay under 108 bytes).
pub struct Fixture {
    dir: tempfile::TempDir,
    logs: RefCell<Vec<(String, PathBuf)>>,
}

impl Fixture {
    pub fn new() -> Result<Fixture> {
        let dir = tempfile::Builder::new()
            .prefix("sh-")
            .tempdir_in("/tmp")
            .context("create the test's temporary directory")?;
        Ok(Fixture {
            dir,
            logs: RefCell::new(Vec::new()),
        })
    }

    /// Runs a test body in a fresh fixture; on error, prints every registered log, then panics
    /// with the whole error chain.
    pub fn run(body: impl FnOnce(&Fixture) -> Result<()>) {
        let fixture = match Fixture::new() {
            Ok(fixture) => fixture,
            Err(err) => panic!("{err:#}"),
        };
        if let Err(err) = body(&fixture) {
            fixture.dump_logs();
            panic!("{}: {err:?}", test_name());
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the fixture directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates `name` (and its parents) inside the fixture directory.
    pub fn mkdir(&self, name: &str) -> Result<PathBuf> {
        let path = self.path(name);
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(path)
    }

    /// Remembers a log file to print when the test fails.
    pub fn register_log(&self, what: &str, path: &Path) {
        self.logs
            .borrow_mut()
            .push((what.to_owned(), path.to_owned()));
    }

    pub fn dump_logs(&self) {
        for (what, path) in self.logs.borrow().iter() {
            let text =
                fs::read_to_string(path).unwrap_or_else(|err| format!("<unreadable: {err}>"));
            let tail = tail_lines(&text, 200);
            eprintln!(
                "===== {what} ({}) =====\n{tail}\n===== end of {what} =====",
                path.display()
            );
        }
    }

    /// Kills every process whose command line names this fixture's directory: containerd shims
    /// and anything else a test started that outlived its owner.
    fn kill_strays(&self) {
        let marker = self.dir().to_string_lossy().into_owned();
        let me = std::process::id();
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            if u32::try_from(pid).is_ok_and(|pid| pid == me) {
                continue;
            }
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.kill_strays();
        // Deepest first, lazily: a busy mount must not keep the rest of the tree mounted.
        for target in mount::mounts_under(self.dir()).into_iter().rev() {
            if let Err(err) = mount::detach(&target) {
                eprintln!("cleanup: {err:#}");
            }
        }
    }
}

/// Polls `probe` every 50ms until it returns `Ok(true)`, at most `timeout`; the last probe error
/// (or a plain timeout) becomes the error.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let outcome = probe();
        if let Ok(true) = outcome {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return match outcome {
                Err(err) => {
                    Err(err.context(format!("timed out after {timeout:?} waiting for {what}")))
                }
                _ => anyhow::bail!("timed out after {timeout:?} waiting for {what}"),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("\n")
}

/// `port` on a loopback address no other server of this test process has had: each server
/// a test starts gets its own address, so no two tests, however they interleave, race for
/// one (as picking a free port and binding it later would). The second octet comes from
/// the process id, so a server left behind by an earlier run is unlikely to be in the way;
/// one that is makes the new server fail to bind, which its start reports.
pub fn loopback_addr(port: u16) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // From 1: every one of the 65,535 addresses per process is distinct (x.y.0.0 is skipped).
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 0xffff + 1;
    // 127.100.0.0 and up: clear of 127.0.0.0/16, which documentation and demos use.
    let second = 100 + (std::process::id() % 150) as u8;
    let [_, _, third, fourth] = n.to_be_bytes();
    std::net::SocketAddr::from(([127, second, third, fourth], port))
}
