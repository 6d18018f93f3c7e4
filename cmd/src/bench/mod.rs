//! `shoal bench REF [-- CMD...]`: cold starts of the user's image on the user's node,
//! overlayfs against Shoal (and stargz-snapshotter when its socket or binary is given), the median of
//! `--runs` each, as a table on stdout, a CSV and a PNG chart.
//!
//! Cold means nothing of the image is on the node: every run gets a node of its own
//! ([`node`]): a private containerd and a private `shoal-snapshotter`, each with an empty root
//! under the bench's work folder, in containerd namespace `shoal-bench-<pid>`. The user's
//! containerd, its images and Shoal's cache are never read or touched. A plain-HTTP registry
//! is reached through a counting relay ([`relay`]) for the bytes and requests of each run.
//!
//! - [`table`]: runs, medians, the table and the CSV.
//! - [`chart`]: the PNG.
//! - [`interrupt`]: Ctrl-C unwinds through the same cleanup as a failure.

pub mod chart;
mod interrupt;
pub mod node;
mod relay;
pub mod table;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_fetcher::ImageRef;

use self::node::{Binaries, Node, Snapshotter, Stargz};
use self::relay::Relay;
use self::table::Run;

/// A progress line every this long while a step waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Polling period for the container's first output.
const OUTPUT_POLL: Duration = Duration::from_millis(2);
/// The container's name in the bench's namespace.
const CONTAINER: &str = "shoal-bench";

/// What `shoal bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub reference: String,
    /// Replaces the image's entrypoint and command when not empty.
    pub command: Vec<String>,
    pub runs: usize,
    pub stargz_socket: Option<PathBuf>,
    /// A stargz-snapshotter daemon binary to run privately, cold, like Shoal's.
    pub stargz_bin: Option<PathBuf>,
    /// The registry speaks plain HTTP: it is then relayed and its bytes and requests counted.
    pub plain_http: bool,
    /// The results folder (default `shoal-bench-<unix time>` in the current folder).
    pub out: Option<PathBuf>,
    pub csv: Option<PathBuf>,
    pub png: Option<PathBuf>,
    /// Where each run's private node lives (a `shoal-bench-<pid>` folder is made in it).
    pub work: PathBuf,
    /// The longest one run may take, pull and first output together.
    pub timeout: Duration,
}

/// What a finished bench wrote.
#[derive(Debug)]
pub struct Report {
    pub runs: Vec<Run>,
    pub table: String,
    pub csv: PathBuf,
    pub png: PathBuf,
}

/// A progress line on stderr.
fn progress(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "bench: {line}");
}

/// Runs the bench; the work folder is removed whatever happens.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let image = ImageRef::parse(&options.reference)
        .with_context(|| format!("bad image reference {:?}", options.reference))?;
    if !nix::unistd::geteuid().is_root() {
        bail!("shoal bench runs as root (it starts containerd and mounts)");
    }
    let binaries = find_binaries()?;
    interrupt::install()?;

    let out = match &options.out {
        Some(out) => out.clone(),
        None => PathBuf::from(format!(
            "shoal-bench-{}",
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs()
        )),
    };
    let csv_path = options.csv.clone().unwrap_or_else(|| out.join("bench.csv"));
    let png_path = options.png.clone().unwrap_or_else(|| out.join("bench.png"));

    let namespace = format!("shoal-bench-{}", std::process::id());
    let work = WorkDir::create(&options.work.join(&namespace))?;
    let relay = if options.plain_http {
        Some(Relay::start(with_port(image.host())).context("start the registry relay")?)
    } else {
        None
    };
    let reference = match &relay {
        Some(relay) => relayed(&image, &relay.address().to_string()),
        None => options.reference.clone(),
    };
    let mut scenarios = vec![Snapshotter::Overlayfs, Snapshotter::Shoal];
    if let Some(binary) = &options.stargz_bin {
        scenarios.push(Snapshotter::Stargz(Stargz::Private(binary.clone())));
    } else if let Some(socket) = &options.stargz_socket {
        scenarios.push(Snapshotter::Stargz(Stargz::Socket(socket.clone())));
        progress(
            "stargz-snapshotter is your daemon: its cache is not cleared between runs, so runs \
             after the first may find the image's chunks in it (--stargz-bin runs a private, \
             cold one)",
        );
    }
    progress(&format!(
        "{} cold runs each of {} for {}, containerd namespace {namespace}, work in {}; \
         results to {}",
        options.runs,
        scenarios
            .iter()
            .map(Snapshotter::name)
            .collect::<Vec<_>>()
            .join(", "),
        options.reference,
        work.0.display(),
        out.display()
    ));
    if let Some(relay) = &relay {
        progress(&format!(
            "the registry is relayed through {} to count bytes and requests",
            relay.address()
        ));
    } else {
        progress("an HTTPS registry is not relayed: bytes and requests are not counted");
    }

    let mut runs = Vec::new();
    let total = options.runs * scenarios.len();
    // Interleaved, so that a change in the machine's load affects every scenario alike.
    for number in 1..=options.runs {
        for snapshotter in &scenarios {
            let bench = ColdRun {
                options,
                binaries: &binaries,
                namespace: &namespace,
                reference: &reference,
                relay: relay.as_ref(),
                snapshotter: snapshotter.clone(),
                number,
                label: format!(
                    "[{}/{total}] {} run {number}/{}",
                    runs.len() + 1,
                    snapshotter.name(),
                    options.runs
                ),
            };
            let dir = work.0.join(format!("{}-{number}", snapshotter.name()));
            runs.push(bench.run(&dir)?);
        }
    }
    drop(relay);
    drop(work);

    let table = table::render(&runs);
    for path in [&csv_path, &png_path] {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
    }
    fs::write(&csv_path, table::csv(&runs))
        .with_context(|| format!("write {}", csv_path.display()))?;
    let title = format!("shoal bench {}", options.reference);
    fs::write(&png_path, chart::render(&runs, &title))
        .with_context(|| format!("write {}", png_path.display()))?;
    progress(&format!(
        "wrote {} and {}",
        csv_path.display(),
        png_path.display()
    ));
    Ok(Report {
        runs,
        table,
        csv: csv_path,
        png: png_path,
    })
}

/// `shoal` is this program; `shoal-snapshotter` lies beside it; containerd and ctr are the
/// node's own, on PATH.
fn find_binaries() -> anyhow::Result<Binaries> {
    let shoal = std::env::current_exe().context("find the shoal binary")?;
    let shoal_snapshotter = shoal.with_file_name("shoal-snapshotter");
    if !shoal_snapshotter.exists() {
        bail!(
            "no shoal-snapshotter beside {} (the bench runs a private one)",
            shoal.display()
        );
    }
    let find = |name: &str| -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    };
    let on_path = |name: &str| -> anyhow::Result<PathBuf> {
        find(name)
            .with_context(|| format!("no {name} on PATH (the bench runs a private containerd)"))
    };
    Ok(Binaries {
        shoal_snapshotter,
        shoal,
        containerd: on_path("containerd")?,
        ctr: on_path("ctr")?,
        ctr_remote: find("ctr-remote"),
    })
}

/// `host` with HTTP's port when it names none.
fn with_port(host: &str) -> String {
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:80")
    }
}

/// `image` as served through the relay at `relay`.
fn relayed(image: &ImageRef, relay: &str) -> String {
    let mut reference = format!("{relay}/{}", image.repository_name());
    if let Some(tag) = image.tag() {
        reference.push_str(&format!(":{tag}"));
    }
    if let Some(digest) = image.digest() {
        reference.push_str(&format!("@{digest}"));
    }
    reference
}

/// The bench's work folder; dropping it unmounts and removes whatever is left in it.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(path: &Path) -> anyhow::Result<WorkDir> {
        if path.exists() {
            bail!("{} exists already", path.display());
        }
        fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        Ok(WorkDir(path.to_owned()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for point in node::mounts_under(&self.0) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One cold run of one scenario.
struct ColdRun<'a> {
    options: &'a Options,
    binaries: &'a Binaries,
    namespace: &'a str,
    reference: &'a str,
    relay: Option<&'a Relay>,
    snapshotter: Snapshotter,
    number: usize,
    label: String,
}

impl ColdRun<'_> {
    /// Starts a node under `dir`, measures, and cleans the node up whatever happened.
    fn run(&self, dir: &Path) -> anyhow::Result<Run> {
        progress(&format!("{}: starting a private node", self.label));
        let plain_host = self.relay.map(|relay| relay.address().to_string());
        let node = Node::start(
            dir,
            self.namespace,
            self.snapshotter.clone(),
            self.binaries,
            plain_host.as_deref(),
        )
        .with_context(|| format!("{}: start the node", self.label))?;
        let measured = self.measure(&node);
        let stopped = node.stop();
        let run = measured.with_context(|| self.label.clone())?;
        stopped.with_context(|| format!("{}: clean up", self.label))?;
        progress(&format!(
            "{}: namespace {} emptied and removed, node stopped",
            self.label, self.namespace
        ));
        Ok(run)
    }

    fn measure(&self, node: &Node) -> anyhow::Result<Run> {
        let name = self.snapshotter.name();
        let before = self.relay.map(Relay::counted);
        let mut pull = match (&self.snapshotter, &self.binaries.ctr_remote) {
            // containerd's pull with unpack: layers are unpacked as they arrive.
            (Snapshotter::Overlayfs, Some(ctr_remote)) => {
                let mut pull = Command::new(ctr_remote);
                pull.arg("--address")
                    .arg(&node.address)
                    .args(["--namespace", self.namespace, "images", "rpull"])
                    .args(["--snapshotter", name]);
                pull
            }
            _ => {
                let mut pull = Command::new(&self.binaries.shoal);
                pull.arg("--config")
                    .arg(&node.shoal_config)
                    .arg("rpull")
                    .arg("--address")
                    .arg(&node.address)
                    .args(["--namespace", self.namespace, "--snapshotter", name]);
                pull
            }
        };
        if self.relay.is_some() {
            pull.arg("--plain-http");
        }
        pull.arg(self.reference);
        let tool = Path::new(pull.get_program())
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        progress(&format!(
            "{}: pulling {} ({tool} rpull)",
            self.label, self.options.reference
        ));
        let started = Instant::now();
        let pull_log = node.dir.join("pull.log");
        let child = node::spawn(&mut pull, &pull_log)?;
        let status = self.wait("pull", child, started)?;
        if !status.success() {
            bail!(
                "the pull of {} failed:\n{}",
                self.options.reference,
                node::log_tail(&pull_log)
            );
        }
        let pull_s = started.elapsed().as_secs_f64();
        progress(&format!(
            "{}: pulled in {pull_s:.2} s, starting the container",
            self.label
        ));

        let output = node.dir.join("output.log");
        let log_uri = format!("file://{}", output.display());
        let mut args = vec![
            "run",
            "--snapshotter",
            name,
            "--log-uri",
            &log_uri,
            self.reference,
            CONTAINER,
        ];
        args.extend(self.options.command.iter().map(String::as_str));
        let mut ctr = node.ctr_command(&args);
        let ctr_log = node.dir.join("ctr.log");
        let mut child = node::spawn(&mut ctr, &ctr_log)?;
        let first = self.first_output(&mut child, &output, started);
        let first_output_s = started.elapsed().as_secs_f64();
        let counted = self
            .relay
            .zip(before)
            .map(|(relay, before)| relay.counted().since(before));
        let usage = node.daemon_pid().and_then(node::usage);
        // The container has done what is measured: a server would run on.
        let _ = node.ctr_quiet(&["tasks", "kill", "--signal", "SIGKILL", CONTAINER]);
        let _ = node::wait_output(child, Duration::from_secs(30));
        interrupt::check()?;
        let line = first.with_context(|| {
            format!(
                "read the container's output (ctr's log: {:?})",
                node::log_tail(&ctr_log)
            )
        })?;
        progress(&format!(
            "{}: first output after {first_output_s:.2} s{}: {line:?}",
            self.label,
            counted.map_or_else(String::new, |c| format!(
                ", {:.1} MB in {} requests",
                c.bytes as f64 / 1e6,
                c.requests
            ))
        ));
        Ok(Run {
            scenario: name.to_owned(),
            number: self.number,
            first_output_s,
            pull_s,
            bytes: counted.map(|c| c.bytes),
            requests: counted.map(|c| c.requests),
            daemon_cpu_s: usage.map(|(cpu, _)| cpu),
            daemon_peak_rss: usage.map(|(_, rss)| rss),
        })
    }

    /// Waits for `child` (bounded by the run's timeout from `started`, interruptible).
    fn wait(
        &self,
        step: &str,
        mut child: Child,
        started: Instant,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut next_note = Instant::now() + PROGRESS_EVERY;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            let stop = interrupt::check().err().or_else(|| {
                (started.elapsed() > self.options.timeout).then(|| {
                    anyhow::anyhow!(
                        "the {step} took longer than {} s (--timeout)",
                        self.options.timeout.as_secs()
                    )
                })
            });
            if let Some(error) = stop {
                let _ = child.kill();
                let _ = child.wait();
                return Err(error);
            }
            if Instant::now() > next_note {
                progress(&format!(
                    "{}: {step} running for {:.0} s",
                    self.label,
                    started.elapsed().as_secs_f64()
                ));
                next_note += PROGRESS_EVERY;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first line the container writes to `output` (stdout and stderr, through
    /// containerd's file log); what it wrote if it exits before ending a line.
    fn first_output(
        &self,
        ctr: &mut Child,
        output: &Path,
        started: Instant,
    ) -> anyhow::Result<String> {
        let mut next_note = Instant::now() + PROGRESS_EVERY;
        loop {
            let text = fs::read(output).unwrap_or_default();
            if let Some(end) = text.iter().position(|b| *b == b'\n') {
                return Ok(String::from_utf8_lossy(&text[..end]).into_owned());
            }
            if let Some(status) = ctr.try_wait()? {
                // What the task wrote last may land after ctr returned.
                std::thread::sleep(Duration::from_millis(100));
                let text = fs::read(output).unwrap_or_default();
                if text.is_empty() {
                    bail!("the container printed nothing ({status})");
                }
                return Ok(String::from_utf8_lossy(&text).trim_end().to_owned());
            }
            interrupt::check()?;
            if started.elapsed() > self.options.timeout {
                bail!(
                    "no output within {} s (--timeout)",
                    self.options.timeout.as_secs()
                );
            }
            if Instant::now() > next_note {
                progress(&format!(
                    "{}: waiting for the first output, {:.0} s",
                    self.label,
                    started.elapsed().as_secs_f64()
                ));
                next_note += PROGRESS_EVERY;
            }
            std::thread::sleep(OUTPUT_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_reference_keeps_repository_tag_and_digest() {
        let image = ImageRef::parse("registry.example:5000/team/app:1.0").unwrap();
        assert_eq!(
            relayed(&image, "127.0.0.1:4000"),
            "127.0.0.1:4000/team/app:1.0"
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = ImageRef::parse(&format!("example.com/app@{digest}")).unwrap();
        assert_eq!(
            relayed(&image, "127.0.0.1:4000"),
            format!("127.0.0.1:4000/app@{digest}")
        );
    }

    #[test]
    fn a_host_without_a_port_gets_http_s() {
        assert_eq!(with_port("registry.example"), "registry.example:80");
        assert_eq!(with_port("127.0.0.1:5000"), "127.0.0.1:5000");
    }
}
