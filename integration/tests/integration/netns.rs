//! A private network per test: a hub namespace holding a bridge, and namespaces attached to
//! it by veth pairs, each with an address in 10.77.0.0/24. Any of them can have its egress
//! shaped with `tc tbf`. Names are unique per process and test, so tests run side by side;
//! every namespace is removed on drop, also when the test fails.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process;

const IP_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Network {
    hub: String,
    /// Namespaces attached to the hub, by the name the test gave them.
    members: Vec<Member>,
}

struct Member {
    label: String,
    namespace: String,
    address: Ipv4Addr,
}

impl Network {
    /// Creates the hub and its bridge.
    pub fn create() -> Result<Network> {
        let id = format!(
            "shoal{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{id}-hub");
        ip(&["netns", "add", &hub])?;
        let network = Network {
            hub,
            members: Vec::new(),
        };
        ip(&["-n", &network.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &network.hub, "link", "set", "br0", "up"])?;
        Ok(network)
    }

    /// Adds a namespace `label` on the bridge; returns its address.
    pub fn attach(&mut self, label: &str) -> Result<Ipv4Addr> {
        let index = self.members.len();
        anyhow::ensure!(index < 200, "too many namespaces on one bridge");
        let namespace = format!("{}-{label}", self.hub.trim_end_matches("-hub"));
        let address = Ipv4Addr::new(10, 77, 0, 10 + index as u8);
        ip(&["netns", "add", &namespace])?;
        // Recorded before it is configured, so that a failure below still removes it.
        self.members.push(Member {
            label: label.to_owned(),
            namespace: namespace.clone(),
            address,
        });
        let port = format!("p{index}");
        ip(&[
            "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &namespace,
        ])?;
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
        ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        Ok(address)
    }

    /// Shapes what `label` sends to `mbit` megabits per second (token bucket).
    pub fn shape(&self, label: &str, mbit: u32) -> Result<()> {
        let member = self.member(label)?;
        let rate = format!("{mbit}mbit");
        let mut tc = Command::new("tc");
        tc.args([
            "-n",
            &member.namespace,
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            "64kb",
            "latency",
            "100ms",
        ]);
        process::run(&mut tc, IP_TIMEOUT).context("shape with tc tbf")?;
        Ok(())
    }

    pub fn address(&self, label: &str) -> Result<Ipv4Addr> {
        Ok(self.member(label)?.address)
    }

    /// `program` run inside `label`'s network namespace only (mounts stay shared with the
    /// host, so FUSE mounts made there are visible to containerd).
    pub fn command(&self, label: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let member = self.member(label)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", member.namespace))
            .arg("--")
            .arg(program);
        Ok(command)
    }

    /// The file naming `label`'s namespace, for `setns`.
    pub fn namespace_path(&self, label: &str) -> Result<std::path::PathBuf> {
        Ok(std::path::Path::new("/run/netns").join(&self.member(label)?.namespace))
    }

    /// A UDP socket bound to `address` inside `label`'s namespace: a socket stays in the
    /// namespace it was made in, whichever thread uses it afterwards.
    pub fn bind_udp(&self, label: &str, address: SocketAddr) -> Result<UdpSocket> {
        self.in_namespace(label, move || {
            UdpSocket::bind(address).with_context(|| format!("bind {address} in a namespace"))
        })
    }

    /// A TCP connection to `address` made from inside `label`'s namespace (as a client on
    /// that host would make it).
    pub fn connect_tcp(&self, label: &str, address: SocketAddr) -> Result<TcpStream> {
        self.in_namespace(label, move || {
            TcpStream::connect_timeout(&address, Duration::from_secs(10))
                .with_context(|| format!("connect to {address} in a namespace"))
        })
    }

    /// What `make` returns, run on a short-lived thread that entered `label`'s namespace.
    fn in_namespace<T: Send + 'static>(
        &self,
        label: &str,
        make: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.namespace_path(label)?;
        std::thread::spawn(move || -> Result<T> {
            let namespace =
                File::open(&path).with_context(|| format!("open {}", path.display()))?;
            // SAFETY: `namespace` is an open namespace file for the whole call; setns changes
            // only this short-lived thread's network namespace.
            let rc = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("enter {}", path.display()));
            }
            make()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in namespace {label} panicked"))?
    }

    /// Gives `label`'s loopback device `address` too (for a server at an address its
    /// programs expect, such as the host's name server).
    pub fn add_loopback_address(&self, label: &str, address: Ipv4Addr) -> Result<()> {
        let member = self.member(label)?;
        if address.is_loopback() {
            return Ok(());
        }
        ip(&[
            "-n",
            &member.namespace,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ])?;
        Ok(())
    }

    fn member(&self, label: &str) -> Result<&Member> {
        self.members
            .iter()
            .find(|member| member.label == label)
            .with_context(|| format!("no namespace `{label}` in this network"))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of each veth pair; the hub takes the bridge.
        for namespace in self
            .members
            .iter()
            .map(|m| m.namespace.as_str())
            .chain([self.hub.as_str()])
        {
            if let Err(err) = ip(&["netns", "del", namespace]) {
                eprintln!("cleanup: {err:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<String> {
    process::run(Command::new("ip").args(args), IP_TIMEOUT)
        .with_context(|| format!("ip {}", args.join(" ")))
}

#[test]
fn namespaces_are_created_connected_and_removed() {
    crate::fixture::privileged!();
    let names;
    {
        let mut network = Network::create().unwrap();
        let a = network.attach("a").unwrap();
        let b = network.attach("b").unwrap();
        network.shape("b", 50).unwrap();
        let ping = network
            .command("a", "busybox")
            .unwrap()
            .args(["ping", "-c", "1", "-W", "2", &b.to_string()])
            .output()
            .unwrap();
        assert!(ping.status.success(), "{a} cannot reach {b}: {ping:?}");
        names = network
            .members
            .iter()
            .map(|m| m.namespace.clone())
            .chain([network.hub.clone()])
            .collect::<Vec<_>>();
    }
    let listed = ip(&["netns", "list"]).unwrap();
    for name in names {
        assert!(!listed.contains(&name), "{name} left behind: {listed}");
    }
}
