//! Running the image's command once over its unpacked rootfs: runc with a generated OCI runtime
//! config (own mount, PID, network, IPC and UTS namespaces, the usual capabilities), stopped
//! with SIGKILL when it outlives the timeout, and always deleted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// PATH when the image sets none (what container runtimes use).
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The capabilities a container gets by default (Docker's and containerd's set).
const CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
/// How long runc gets to reap a killed container.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// Lines of the command's output an error quotes.
const QUOTED_LINES: usize = 20;

/// What to run and as whom, from the image config and the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid[:gid]` or `name[:group]` as the image config has it; empty is root.
    pub user: String,
}

impl ProcessSpec {
    /// The image config's Entrypoint and Cmd (or `command` when given, replacing both), Env,
    /// WorkingDir and User.
    pub fn from_config(config: &[u8], command: &[String]) -> anyhow::Result<ProcessSpec> {
        let config: Value = serde_json::from_slice(config).context("parse the image config")?;
        let section = &config["config"];
        let strings = |field: &str| -> Vec<String> {
            section[field]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let args = if command.is_empty() {
            let mut args = strings("Entrypoint");
            args.extend(strings("Cmd"));
            args
        } else {
            command.to_vec()
        };
        if args.is_empty() {
            bail!("the image has no Entrypoint or Cmd; give the command to run after `--`");
        }
        let mut env = strings("Env");
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(DEFAULT_PATH.to_owned());
        }
        let cwd = match section["WorkingDir"].as_str() {
            Some(dir) if !dir.is_empty() => dir.to_owned(),
            _ => "/".to_owned(),
        };
        let user = section["User"].as_str().unwrap_or_default().to_owned();
        Ok(ProcessSpec {
            args,
            env,
            cwd,
            user,
        })
    }
}

/// `user` as numeric ids, names looked up in the rootfs's `/etc/passwd` and `/etc/group`.
pub fn resolve_user(rootfs: &Path, user: &str) -> anyhow::Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let read = |file: &str| std::fs::read_to_string(rootfs.join(file)).unwrap_or_default();
    // name:x:uid:gid:... (passwd) and name:x:gid:... (group)
    let lookup = |table: &str, name: &str| -> Option<(u32, Option<u32>)> {
        table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 2).then(|| {
                let id = fields[2].parse().ok()?;
                Some((id, fields.get(3).and_then(|g| g.parse().ok())))
            })?
        })
    };
    let passwd = read("etc/passwd");
    let (uid, primary_gid) = match name.parse::<u32>() {
        // A numeric user's primary group comes from the passwd line with that uid.
        Ok(uid) => (
            uid,
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.get(2) == Some(&name))
                    .then(|| fields.get(3).and_then(|g| g.parse().ok()))?
            }),
        ),
        Err(_) => lookup(&passwd, name)
            .with_context(|| format!("user `{name}` is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => primary_gid.unwrap_or(0),
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup(&read("etc/group"), group)
                    .with_context(|| format!("group `{group}` is not in the image's /etc/group"))?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

/// The OCI runtime config for running `spec` as `uid:gid` over `rootfs`.
pub fn runtime_config(spec: &ProcessSpec, rootfs: &Path, uid: u32, gid: u32) -> Value {
    let capabilities: Vec<&str> = CAPABILITIES.to_vec();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "shoal-optimize",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"},
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    })
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The command exited with this status (a signal's number as 128 + signal, as runc
    /// reports it).
    Exited(i32),
    /// Still running at the timeout: killed.
    TimedOut,
}

/// One run's outcome.
#[derive(Debug)]
pub struct Run {
    pub ending: Ending,
    pub elapsed: Duration,
    /// The end of what the command wrote to stdout and stderr.
    pub output_tail: String,
}

/// Runs the container described by `config` with runc, state and logs kept in `dir`.
pub async fn run(dir: &Path, config: &Value, timeout: Duration) -> anyhow::Result<Run> {
    let bundle = dir.join("bundle");
    let state = dir.join("runc");
    for path in [&bundle, &state] {
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    }
    std::fs::write(bundle.join("config.json"), config.to_string())
        .context("write the runtime config")?;
    let log = dir.join("output.log");
    let output =
        std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let id = format!("shoal-optimize-{}", std::process::id());
    let runc = Runc {
        state: state.clone(),
        id: id.clone(),
    };
    let started = Instant::now();
    let mut child = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(output.try_clone().context("share the output log")?)
        .stderr(output)
        .kill_on_drop(true)
        .spawn()
        .context("start runc (is it installed?)")?;
    let ending = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status.context("wait for runc")?;
            Ending::Exited(status.code().unwrap_or(-1))
        }
        Err(_) => {
            runc.command(&["kill", &id, "KILL"]).await;
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            Ending::TimedOut
        }
    };
    let elapsed = started.elapsed();
    runc.command(&["delete", "--force", &id]).await;
    Ok(Run {
        ending,
        elapsed,
        output_tail: tail(&log),
    })
}

/// runc commands on the one container, errors ignored (cleanup must go on).
struct Runc {
    state: PathBuf,
    id: String,
}

impl Runc {
    async fn command(&self, args: &[&str]) {
        let _ = tokio::process::Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        tracing::debug!(container = %self.id, ?args, "runc");
    }
}

/// The last lines of the log file.
fn tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(QUOTED_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_comes_from_the_config_unless_a_command_is_given() {
        let config = br#"{"config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["cat /x"],
            "Env":["A=1"],"WorkingDir":"/app","User":"app"}}"#;
        let spec = ProcessSpec::from_config(config, &[]).unwrap();
        assert_eq!(spec.args, ["/bin/sh", "-c", "cat /x"]);
        assert_eq!(spec.env, ["A=1", DEFAULT_PATH]);
        assert_eq!((spec.cwd.as_str(), spec.user.as_str()), ("/app", "app"));
        let given = ProcessSpec::from_config(config, &["true".to_owned()]).unwrap();
        assert_eq!(given.args, ["true"]);
        let err = ProcessSpec::from_config(br#"{"config":{}}"#, &[]).unwrap_err();
        assert!(err.to_string().contains("no Entrypoint or Cmd"), "{err}");
        let bare = ProcessSpec::from_config(b"{}", &["x".to_owned()]).unwrap();
        assert_eq!(bare.cwd, "/");
    }

    #[test]
    fn users_resolve_through_the_images_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let root = dir.path();
        assert_eq!(resolve_user(root, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(root, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(root, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "7:8").unwrap(), (7, 8));
        let err = resolve_user(root, "nobody").unwrap_err();
        assert!(
            err.to_string().contains("not in the image's /etc/passwd"),
            "{err}"
        );
    }
}
