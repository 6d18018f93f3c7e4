//! Membership from DNS, as on Kubernetes: every node names only a DNS name (a headless
//! Service) that resolves to all of them, and nodes that join or leave the answer join or
//! leave the cluster within a refresh.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;

use super::{ensure_all_right, start_together, with_cluster, Cluster, PEER_PORT};
use crate::dns::{system_nameserver, DnsServer};
use crate::fixture::{privileged, Fixture};

const NAME: &str = "shoal-peers.test";

/// Attaches node `label`, with a DNS server where its resolver looks; returns its address.
fn attach_with_dns(
    cluster: &mut Cluster,
    dns: &mut DnsServer,
    nameserver: Ipv4Addr,
    label: &str,
) -> Result<Ipv4Addr> {
    let address = cluster.network.attach(label)?;
    cluster.network.add_loopback_address(label, nameserver)?;
    dns.serve(
        cluster
            .network
            .bind_udp(label, SocketAddr::from((nameserver, 53)))?,
    )?;
    Ok(address)
}

fn start_dns_node(cluster: &mut Cluster, label: &str, address: Ipv4Addr) -> Result<usize> {
    let section = format!(
        "\n[peers]\nlisten = \"{address}:{PEER_PORT}\"\ndns = \"{NAME}:{PEER_PORT}\"\n\
         refresh_secs = 1\nprobe_interval_ms = 200\nlatency_budget_ms = 3000\ninsecure = true\n"
    );
    cluster.push_node(label, address, &section)
}

#[test]
fn nodes_find_each_other_by_a_dns_name_and_follow_its_answers() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let nameserver = system_nameserver()?;
            let mut dns = DnsServer::new(NAME, Vec::new());
            let mut addresses = Vec::new();
            for i in 0..3 {
                let label = format!("d{i}");
                addresses.push(attach_with_dns(cluster, &mut dns, nameserver, &label)?);
            }
            dns.set(addresses.clone());
            let mut nodes = Vec::new();
            for (i, &address) in addresses.iter().enumerate() {
                nodes.push(start_dns_node(cluster, &format!("d{i}"), address)?);
            }
            cluster.wait_live(&nodes, 3)?;

            // They exchange blocks like nodes listed one by one.
            let primed = start_together(cluster, &nodes[..1], &reference, "dns-first");
            ensure_all_right(&primed, &published.blob_sha256)?;
            let second = start_together(cluster, &nodes[1..2], &reference, "dns-second");
            ensure_all_right(&second, &published.blob_sha256)?;
            let status = cluster.nodes[nodes[1]].status(&cluster.network)?;
            let from_peers = status["bytes_from_peers"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                from_peers > 0,
                "a node found by DNS sent nothing: {status:#}"
            );

            // A node added to the answer joins everyone's membership...
            let address = attach_with_dns(cluster, &mut dns, nameserver, "d3")?;
            addresses.push(address);
            dns.set(addresses.clone());
            nodes.push(start_dns_node(cluster, "d3", address)?);
            cluster.wait_live(&nodes, 4)?;

            // ...and one that leaves it (and dies) drops out of the others'.
            let gone = nodes.remove(2);
            addresses.remove(2);
            dns.set(addresses);
            cluster.nodes[gone].daemon.kill()?;
            cluster.wait_live(&nodes, 3)?;
            eprintln!(
                "p2p dns: {} queries answered; second node got {from_peers} bytes from peers",
                dns.queries()
            );
            Ok(())
        })
    });
}
