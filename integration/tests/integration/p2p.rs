//! Peer-to-peer chunk fetch between real daemons: each node is a shoal-snapshotter in a
//! network namespace of its own (with its own containerd), the registry sits in another one
//! behind a `tc`-shaped link and a delaying proxy for the round trip, and the registry's
//! access log says how many blob bytes it served. Nodes started at the same moment must
//! fetch the image from the registry about once between them, and containers must only ever
//! see the right bytes.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::convert::convert;
use crate::delay::DelayProxy;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::image;
use crate::netns::Network;
use crate::process::{self, Process};
use crate::registry::Registry;
use crate::tree;

// The benchmark `scripts/bench-p2p.sh` runs: not a test, so built only with `--features bench`.
#[cfg(feature = "bench")]
mod bench;
mod dns;
mod faults;
mod herd;
mod learned;
pub(crate) use learned::trace_files;
mod liar;
mod outsiders;
mod overlaybd;
mod preheat;
mod private;
mod referrer;
mod reshare;
mod tls;

const REGISTRY_PORT: u16 = 5000;
const PEER_PORT: u16 = 7420;
const METRICS_PORT: u16 = 9464;
/// The registry's link, as the issue describes a modest uplink: its bandwidth, and the round
/// trip added by a delaying proxy in front of it, which listens where the registry is reached.
const REGISTRY_MBIT: u32 = 100;
const REGISTRY_RTT: Duration = Duration::from_millis(20);
/// Where the registry itself listens, inside its namespace.
pub(super) const REGISTRY_BEHIND_DELAY: u16 = 5001;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const DATA_BYTES: usize = 6 << 20;

/// A network with the registry in namespace `reg`, serving the storage of a loopback registry
/// the image was pushed to, and nodes added to it.
struct Cluster {
    nodes: Vec<Node>,
    /// The nodes' directories, dropped after their processes so that no mount is in use.
    fixtures: Vec<Fixture>,
    _registry: Process,
    _delay: DelayProxy,
    registry_log: PathBuf,
    network: Network,
    host_registry: Registry,
    /// The docker config nodes added from now on read registry credentials from.
    docker_config: Option<PathBuf>,
    /// `user:password` the registry in `reg` asks for, when it asks for one.
    login: Option<String>,
}

struct Node {
    label: String,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// The daemon's chunk cache directory.
    cache: PathBuf,
    ctd: Containerd,
    address: Ipv4Addr,
    daemon: Process,
}

/// The image under test: busybox, then `/data/blob` of random bytes, converted to eStargz
/// (or as `shoal convert` arguments say).
struct Published {
    /// `repository:tag` on the registry, without host.
    path: String,
    blob_sha256: String,
}

impl Cluster {
    /// Builds and converts the image on a loopback registry, then serves its storage from
    /// the `reg` namespace behind a link of `mbit` megabits per second; with `auth`
    /// (`user:password` and the bcrypt hash of the password), only to clients that log in so.
    fn start_with(
        fixture: &Fixture,
        mbit: u32,
        auth: Option<(&str, &str)>,
        convert_args: &[&str],
    ) -> Result<(Cluster, Published)> {
        let host_registry = Registry::start(fixture)?;
        let data = random_bytes(DATA_BYTES)?;
        let blob_sha256 = hex::encode(Sha256::digest(&data));
        let layers = vec![
            image::busybox_layer()?,
            vec![
                tree::dir("/data", 0o755),
                tree::file("/data/blob", data, 0o644),
            ],
        ];
        image::build(fixture, "p2p", &layers)?;
        let layout = fixture.path("images/p2p");
        let path = format!(
            "test/p2p:{}",
            ["converted", "esgz"][convert_args.is_empty() as usize]
        );
        convert(
            fixture,
            convert_args,
            &format!("oci:{}", layout.display()),
            &format!("{}/{path}", host_registry.host()),
        )?;

        let mut network = Network::create()?;
        let address = network.attach("reg")?;
        network.shape("reg", mbit)?;
        let config = fixture.path("registry/netns.yml");
        let auth_section = match auth {
            None => String::new(),
            Some((login, hash)) => {
                let user = login.split(':').next().unwrap_or(login);
                let htpasswd = fixture.path("registry/htpasswd");
                fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
        };
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{REGISTRY_BEHIND_DELAY}\n{auth_section}",
                fixture.path("registry/data").display()
            ),
        )?;
        let registry_log = fixture.path("registry/netns.log");
        fixture.register_log("docker-registry (netns)", &registry_log);
        let mut command = network.command("reg", "/usr/bin/docker-registry")?;
        command.arg("serve").arg(&config);
        let registry = Process::spawn("docker-registry", &mut command, &registry_log)?;
        // netem is missing, so a proxy in the registry's namespace adds the round trip.
        let delay = DelayProxy::start(
            &network.namespace_path("reg")?,
            SocketAddr::from((address, REGISTRY_PORT)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, REGISTRY_BEHIND_DELAY)),
            REGISTRY_RTT / 2,
        )?;
        let cluster = Cluster {
            nodes: Vec::new(),
            fixtures: Vec::new(),
            _registry: registry,
            _delay: delay,
            registry_log,
            network,
            host_registry,
            docker_config: None,
            login: auth.map(|(login, _)| login.to_owned()),
        };
        let probe = match &cluster.login {
            None => format!("{address}:{REGISTRY_PORT}"),
            Some(login) => format!("{login}@{address}:{REGISTRY_PORT}"),
        };
        wait_until(
            "the registry in its namespace",
            Duration::from_secs(20),
            || {
                let mut curl = cluster.network.command("reg", "busybox")?;
                curl.args([
                    "wget",
                    "-q",
                    "-O",
                    "/dev/null",
                    &format!("http://{probe}/v2/"),
                ]);
                Ok(process::run(&mut curl, Duration::from_secs(5)).is_ok())
            },
        )?;
        Ok((cluster, Published { path, blob_sha256 }))
    }

    /// The loopback registry the image was pushed to (same storage).
    fn host_registry(&self) -> String {
        self.host_registry.host()
    }

    fn registry_host(&self) -> Result<String> {
        Ok(format!("{}:{REGISTRY_PORT}", self.network.address("reg")?))
    }

    /// Attaches a node without `[peers]`: Shoal as it was before peers.
    fn add_solo(&mut self, label: &str) -> Result<usize> {
        let address = self.network.attach(label)?;
        self.push_node(label, address, "")
    }

    /// Attaches one peer node per entry of `settings` (extra keys of its `[peers]` table),
    /// named `{prefix}{i}`; each lists all of them, itself included. Returns once every one
    /// sees all of them live.
    fn add_peers(&mut self, prefix: &str, settings: &[&str]) -> Result<Vec<usize>> {
        self.add_peers_with(prefix, settings, &[])
    }

    /// [`add_peers`](Self::add_peers) with `extra` peer addresses in every static list, which
    /// must answer their probes too.
    fn add_peers_with(
        &mut self,
        prefix: &str,
        settings: &[&str],
        extra: &[String],
    ) -> Result<Vec<usize>> {
        let mut addresses = Vec::new();
        for i in 0..settings.len() {
            let label = format!("{prefix}{i}");
            addresses.push((label.clone(), self.network.attach(&label)?));
        }
        let listed: Vec<String> = addresses
            .iter()
            .map(|(_, address)| format!("{address}:{PEER_PORT}"))
            .chain(extra.iter().cloned())
            .map(|peer| format!("\"{peer}\""))
            .collect();
        let mut added = Vec::new();
        for ((label, address), settings) in addresses.into_iter().zip(settings) {
            // Plain HTTP between the test's namespaces must be asked for; TLS needs no asking.
            let insecure = if settings.contains("tls =") {
                ""
            } else {
                "insecure = true\n"
            };
            let section = format!(
                "\n[peers]\nlisten = \"{address}:{PEER_PORT}\"\nstatic = [{}]\n\
                 probe_interval_ms = 200\n{insecure}{settings}\n",
                listed.join(", ")
            );
            added.push(self.push_node(&label, address, &section)?);
        }
        self.wait_live(&added, (added.len() + extra.len()) as u64)?;
        Ok(added)
    }

    /// Waits until each of `nodes` sees `count` live peers (itself included) and has told
    /// the owners that membership gives it what it holds, so that every owner's advice
    /// names it from then on.
    fn wait_live(&self, nodes: &[usize], count: u64) -> Result<()> {
        wait_until("peers to see each other", Duration::from_secs(20), || {
            for &i in nodes {
                let peers = &self.nodes[i].status(&self.network)?["peers"];
                if peers["members_live"].as_u64() != Some(count)
                    || peers["announcing"].as_bool() != Some(false)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Waits until `node` has announced every block that landed on it so far (at once for
    /// a node without peers).
    fn wait_announced(&self, node: usize) -> Result<()> {
        wait_until("announcements to go out", Duration::from_secs(20), || {
            let peers = &self.nodes[node].status(&self.network)?["peers"];
            Ok(peers.is_null() || peers["announcing"].as_bool() == Some(false))
        })
    }

    fn push_node(&mut self, label: &str, address: Ipv4Addr, extra: &str) -> Result<usize> {
        let fixture = Fixture::new()?;
        let started = self.start_node(&fixture, label, address, extra);
        self.fixtures.push(fixture);
        self.nodes.push(started?);
        Ok(self.nodes.len() - 1)
    }

    fn start_node(
        &self,
        fixture: &Fixture,
        label: &str,
        address: Ipv4Addr,
        extra: &str,
    ) -> Result<Node> {
        let config = fixture.path("shoal.toml");
        let socket = fixture.path("run/shoal.sock");
        let credentials = match &self.docker_config {
            None => String::new(),
            Some(path) => format!("[registry]\ndocker_config = \"{}\"\n", path.display()),
        };
        fs::write(
            &config,
            format!(
                "root = \"{root}\"\nsocket = \"{socket}\"\n[log]\nlevel = \"info,shoal_fetcher=debug\"\n\
                 {credentials}[registry.hosts.\"{registry}\"]\nplain_http = true\n\
                 [metrics]\naddress = \"{address}:{METRICS_PORT}\"\n\
                 [handover]\nholder_socket = \"{holder}\"\n{extra}",
                root = fixture.path("shoal").display(),
                // A holder of the node's own: one shared by every node of the machine (other
                // tests' too) gives a starting daemon the others' connections, which it then
                // releases as no snapshot of its own has them, unmounting live layers.
                holder = fixture.path("run/fdholder.sock").display(),
                socket = socket.display(),
                registry = self.registry_host()?,
            ),
        )?;
        let log = fixture.path("shoal-snapshotter.log");
        fixture.register_log(&format!("shoal-snapshotter {label}"), &log);
        let daemon = self.spawn_daemon(label, &config, &socket, &log)?;
        let ctd = Containerd::start(
            fixture,
            &containerd::Options {
                shoal_socket: Some(socket.clone()),
                ..containerd::Options::default()
            },
        )?;
        Ok(Node {
            label: label.to_owned(),
            config,
            socket,
            log,
            cache: fixture.path("shoal/cache"),
            ctd,
            address,
            daemon,
        })
    }

    /// Starts `label`'s daemon and waits for its socket.
    fn spawn_daemon(
        &self,
        label: &str,
        config: &Path,
        socket: &Path,
        log: &Path,
    ) -> Result<Process> {
        let mut command = self.network.command(label, binary::daemon()?)?;
        command.arg("--config").arg(config);
        let mut daemon = Process::spawn("shoal-snapshotter", &mut command, log)?;
        wait_until("the daemon's socket", Duration::from_secs(20), || {
            if let Some(status) = daemon.try_status()? {
                anyhow::bail!(
                    "shoal-snapshotter {label} exited ({status}):\n{}",
                    daemon.log()
                );
            }
            Ok(std::os::unix::net::UnixStream::connect(socket).is_ok())
        })?;
        Ok(daemon)
    }

    /// Kills node `i`'s daemon (SIGKILL: nothing is saved on the way out) and starts it again
    /// on the same root; its containerd stays up.
    fn restart_daemon(&mut self, i: usize) -> Result<()> {
        self.nodes[i].daemon.kill()?;
        let node = &self.nodes[i];
        let daemon = self.spawn_daemon(&node.label, &node.config, &node.socket, &node.log)?;
        self.nodes[i].daemon = daemon;
        self.nodes[i].ctd.wait_for_snapshotter("shoal")
    }

    /// Blob bytes the registry has sent so far (its access log, body sizes of blob GETs).
    fn registry_blob_bytes(&self) -> u64 {
        let log = fs::read_to_string(&self.registry_log).unwrap_or_default();
        log.lines()
            .filter(|line| line.contains("\"GET /v2/") && line.contains("/blobs/"))
            .filter_map(|line| {
                let after = line.split("HTTP/1.1\" ").nth(1)?;
                let mut fields = after.split_whitespace();
                let status: u16 = fields.next()?.parse().ok()?;
                let size: u64 = fields.next()?.parse().ok()?;
                (200..300).contains(&status).then_some(size)
            })
            .sum()
    }

    /// Starts `reference` on `nodes` together and checks what each container printed;
    /// returns how each start went and the blob bytes the registry sent meanwhile.
    fn run_counted(
        &self,
        nodes: &[usize],
        reference: &str,
        tag: &str,
        published: &Published,
    ) -> Result<(Vec<Started>, u64)> {
        let before = self.registry_blob_bytes();
        let started = start_together(self, nodes, reference, tag);
        ensure_all_right(&started, &published.blob_sha256)?;
        Ok((started, self.registry_blob_bytes() - before))
    }

    /// Dumps every node's logs (the main fixture dumps the registry's).
    fn dump_node_logs(&self) {
        for fixture in &self.fixtures {
            fixture.dump_logs();
        }
    }
}

impl Node {
    /// Waits until this node is uploading blocks to exactly `count` requesters.
    fn wait_uploads(&self, network: &Network, count: u64, within: Duration) -> Result<()> {
        wait_until(&format!("{count} uploads under way"), within, || {
            Ok(self.status(network)?["peers"]["uploads_in_flight"].as_u64() == Some(count))
        })
    }

    fn peer_name(&self) -> String {
        format!("{}:{PEER_PORT}", self.address)
    }

    fn shoal(&self, network: &Network) -> Result<Command> {
        let mut command = network.command(&self.label, binary::cli()?)?;
        command.arg("--config").arg(&self.config);
        Ok(command)
    }

    fn rpull(&self, network: &Network, reference: &str) -> Result<String> {
        let mut command = self.shoal(network)?;
        command
            .arg("rpull")
            .arg("--address")
            .arg(self.ctd.address())
            .args(["-n", self.ctd.namespace(), "--plain-http", reference]);
        process::run(&mut command, TOOL_TIMEOUT)
    }

    /// `sha256sum /data/blob` in a new container: the hash it printed.
    fn run_sum(&self, reference: &str, id: &str) -> Result<String> {
        let out = self.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            reference,
            id,
            "busybox",
            "sha256sum",
            "/data/blob",
        ])?;
        out.split_whitespace()
            .next()
            .map(str::to_owned)
            .with_context(|| format!("sha256sum printed {out:?}"))
    }

    /// The daemon's counters (`shoal status --json`, its `daemon` part).
    fn status(&self, network: &Network) -> Result<serde_json::Value> {
        let mut command = self.shoal(network)?;
        command.args(["status", "--json"]);
        let out = process::run(&mut command, Duration::from_secs(20))?;
        let parsed: serde_json::Value = serde_json::from_str(&out).context("parse status")?;
        Ok(parsed["daemon"].clone())
    }
}

/// What one node's start took and printed.
pub(super) struct Started {
    label: String,
    took: Duration,
    sum: Result<String>,
}

/// Pulls and runs the image on `nodes` at the same moment, one thread each; a start counts
/// as done once its node has also announced what it fetched, so that whatever runs next
/// finds those blocks at their owners, however slowly this machine sends announcements.
fn start_together(cluster: &Cluster, nodes: &[usize], reference: &str, tag: &str) -> Vec<Started> {
    let barrier = Arc::new(Barrier::new(nodes.len()));
    std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|&i| {
                let node = &cluster.nodes[i];
                let network = &cluster.network;
                let barrier = barrier.clone();
                scope.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let sum = node
                        .rpull(network, reference)
                        .and_then(|_| node.run_sum(reference, &format!("{tag}-{}", node.label)));
                    Started {
                        label: node.label.clone(),
                        took: started.elapsed(),
                        sum,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(nodes)
            .map(|(handle, &i)| {
                let mut start = handle.join().expect("node thread panicked");
                start.sum = start
                    .sum
                    .and_then(|sum| cluster.wait_announced(i).map(|()| sum));
                start
            })
            .collect()
    })
}

fn random_bytes(len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(len);
    fs::File::open("/dev/urandom")?
        .take(len as u64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Runs `body`, dumping every node's logs if it fails.
fn with_cluster(
    fixture: &Fixture,
    body: impl FnOnce(&mut Cluster, &Published) -> Result<()>,
) -> Result<()> {
    with_shaped_cluster(fixture, REGISTRY_MBIT, body)
}

/// [`with_cluster`] with the registry's link at `mbit` megabits per second.
fn with_shaped_cluster(
    fixture: &Fixture,
    mbit: u32,
    body: impl FnOnce(&mut Cluster, &Published) -> Result<()>,
) -> Result<()> {
    with_cluster_of(fixture, mbit, None, &[], body)
}

/// [`with_shaped_cluster`] whose registry asks for `auth` (see [`Cluster::start_with`]).
fn with_cluster_of(
    fixture: &Fixture,
    mbit: u32,
    auth: Option<(&str, &str)>,
    convert_args: &[&str],
    body: impl FnOnce(&mut Cluster, &Published) -> Result<()>,
) -> Result<()> {
    // One cluster at a time: these tests measure how nodes starting together share blocks
    // within a latency budget, and several clusters of containerd + daemons at once on a
    // small CI machine starve each other's peers of CPU, which those numbers do not describe.
    // A test that failed while holding the lock must not wedge the others.
    static CLUSTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CLUSTERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (mut cluster, published) = Cluster::start_with(fixture, mbit, auth, convert_args)?;
    let outcome = body(&mut cluster, &published);
    if outcome.is_err() {
        cluster.dump_node_logs();
    }
    outcome
}

fn ensure_all_right(started: &[Started], expected: &str) -> Result<()> {
    for start in started {
        match &start.sum {
            Ok(sum) => anyhow::ensure!(
                sum == expected,
                "{} saw /data/blob as {sum}, not {expected}",
                start.label
            ),
            Err(err) => anyhow::bail!("{} failed: {err:#}", start.label),
        }
    }
    Ok(())
}

#[test]
fn four_nodes_fetch_the_image_from_the_registry_about_once() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);

            // The baseline: one node on its own, no peers configured.
            let solo = vec![cluster.add_solo("solo")?];
            let (alone, one_node) = cluster.run_counted(&solo, &reference, "solo", published)?;
            anyhow::ensure!(
                one_node as usize > DATA_BYTES,
                "one node fetched only {one_node} bytes"
            );

            let nodes = cluster.add_peers("n", &["latency_budget_ms = 5000"; 4])?;
            let (started, four_nodes) =
                cluster.run_counted(&nodes, &reference, "p2p", published)?;

            let mut from_peers = 0;
            let mut uploaded = 0;
            for &i in &nodes {
                let status = cluster.nodes[i].status(&cluster.network)?;
                from_peers += status["bytes_from_peers"].as_u64().unwrap_or(0);
                uploaded += status["peers"]["bytes_uploaded"].as_u64().unwrap_or(0);
            }
            let times: Vec<String> = started
                .iter()
                .map(|s| format!("{}={:?}", s.label, s.took))
                .collect();
            eprintln!(
                "p2p: registry bytes one node {one_node}, four nodes {four_nodes} ({:.2}x); \
                 peer bytes {from_peers} (uploaded {uploaded}); alone {:?}; together {}",
                four_nodes as f64 / one_node as f64,
                alone[0].took,
                times.join(" ")
            );
            anyhow::ensure!(
                four_nodes * 10 <= one_node * 12,
                "four nodes made the registry send {four_nodes} bytes, one alone {one_node}"
            );
            anyhow::ensure!(from_peers > 0 && from_peers == uploaded);
            Ok(())
        })
    });
}

/// A counter of `status.peers.per_peer[peer]`, 0 when absent.
fn peer_stat(status: &serde_json::Value, peer: &str, field: &str) -> u64 {
    status["peers"]["per_peer"][peer][field]
        .as_u64()
        .unwrap_or(0)
}
