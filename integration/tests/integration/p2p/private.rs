//! Private repositories stay private between peers: a registry that asks for a login
//! (htpasswd), nodes talking mutual TLS. A node that read the image with a credential shares
//! its blocks only with peers that prove they may pull it; a node with the credential gets
//! them from its peer, and a request without a proof the registry accepts gets none.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;

use super::tls::certificates;
use super::{ensure_all_right, start_together, with_cluster_of, REGISTRY_MBIT};
use crate::fixture::{privileged, wait_until, Fixture};
use crate::process;

const LOGIN: &str = "puller:pull-secret";
/// bcrypt (cost 5) of `pull-secret`, as the registry's htpasswd file wants it.
const HASH: &str = "$2b$05$YxNDRbdAbNuc1GE4n/isNuoJhJdq29IYDHIuoBXARCsRThtPn50tO";

fn basic(login: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(login)
    )
}

#[test]
fn private_blocks_go_only_to_peers_that_prove_they_may_pull_them() {
    privileged!();
    Fixture::run(|fixture| {
        let tls = certificates(fixture)?;
        with_cluster_of(
            fixture,
            REGISTRY_MBIT,
            Some((LOGIN, HASH)),
            &[],
            |cluster, published| {
                let registry = cluster.registry_host()?;
                let reference = format!("{registry}/{}", published.path);
                let (repository, _) = published.path.split_once(':').context("tagged path")?;

                // Without a credential, the registry refuses the pull outright.
                let lone = cluster.add_solo("anon")?;
                let refused = cluster.nodes[lone].rpull(&cluster.network, &reference);
                let text = format!(
                    "{:#}",
                    refused.err().context("a pull without a login worked")?
                );
                anyhow::ensure!(
                    text.contains("401") || text.contains("credential"),
                    "{text}"
                );

                let auth = fixture.path("docker-auth.json");
                fs::write(
                    &auth,
                    format!(
                        r#"{{"auths": {{"{registry}": {{"auth": "{}"}}}}}}"#,
                        base64::engine::general_purpose::STANDARD.encode(LOGIN)
                    ),
                )?;
                cluster.docker_config = Some(auth);
                let settings = format!(
                "latency_budget_ms = 3000\ntls = {{ ca = \"{0}/ca.pem\", cert = \"{0}/node.pem\", \
                 key = \"{0}/node.key\" }}",
                tls.display()
            );
                let nodes = cluster.add_peers("s", &[settings.as_str(); 2])?;
                let (first, second) = (nodes[0], nodes[1]);
                ensure_all_right(
                    &start_together(cluster, &[first], &reference, "first"),
                    &published.blob_sha256,
                )?;

                // The first node marks what it read with its credential as private (saved
                // beside its cache within seconds): the blob, a block of it, and the registry.
                let shareable = cluster.nodes[first].cache.join("shareable");
                let mut private = None;
                wait_until(
                    "private blocks to be saved",
                    Duration::from_secs(30),
                    || {
                        let text = fs::read_to_string(&shareable).unwrap_or_default();
                        private = text.lines().find_map(|line| {
                            let fields: Vec<&str> = line.split_whitespace().collect();
                            (fields.len() == 3 && fields[2] == registry)
                                .then(|| (fields[0].to_owned(), first_block(fields[1])))
                                .and_then(|(blob, block)| Some((blob, block?)))
                        });
                        Ok(private.is_some())
                    },
                )?;
                let (blob, block) = private.context("a private blob")?;
                let at = block << 20;

                // The second node, with the credential, gets the image from the first.
                let started = start_together(cluster, &[second], &reference, "second");
                ensure_all_right(&started, &published.blob_sha256)?;
                let got = cluster.nodes[second].status(&cluster.network)?;
                let gave = cluster.nodes[first].status(&cluster.network)?;
                anyhow::ensure!(
                    got["bytes_from_peers"].as_u64() > Some(0),
                    "the node with the credential got nothing from its peer: {got:#}"
                );
                anyhow::ensure!(
                    gave["peers"]["pull_checks"].as_u64() >= Some(1),
                    "the holder never checked a proof: {gave:#}"
                );
                let refused_before = gave["peers"]["private_refused"].as_u64().unwrap_or(0);

                // Straight at the first node's port, with a valid node certificate: only a
                // proof the registry accepts opens a private block.
                let url = format!(
                    "https://{}/v1/blobs/{blob}",
                    cluster.nodes[first].peer_name()
                );
                let curl = |proof: Option<(&str, &str)>| -> Result<String> {
                    let mut command = cluster.network.command("s1", "curl")?;
                    command
                        .args(["-sS", "--http2", "--max-time", "10", "-o", "/dev/null"])
                        .args(["-w", "%{http_code}", "--cacert"])
                        .arg(tls.join("ca.pem"))
                        .arg("--cert")
                        .arg(tls.join("node.pem"))
                        .arg("--key")
                        .arg(tls.join("node.key"))
                        .args(["-H", &format!("Range: bytes={at}-{at}")]);
                    if let Some((repository, authorization)) = proof {
                        command
                            .args(["-H", &format!("shoal-repository: {repository}")])
                            .args(["-H", &format!("shoal-pull-authorization: {authorization}")]);
                    }
                    command.arg(&url);
                    process::run(&mut command, Duration::from_secs(30))
                };
                let wrong = basic("puller:guessed");
                for (what, proof) in [
                    ("no proof", None),
                    ("a wrong password", Some((repository, wrong.as_str()))),
                    ("a made-up token", Some((repository, "Bearer forged"))),
                ] {
                    let status = curl(proof)?;
                    anyhow::ensure!(status.trim() == "403", "with {what}: answered {status}");
                }
                let right = basic(LOGIN);
                let status = curl(Some((repository, right.as_str())))?;
                anyhow::ensure!(
                    status.trim() == "206",
                    "with the credential: answered {status}"
                );
                let after = cluster.nodes[first].status(&cluster.network)?;
                let refused = after["peers"]["private_refused"].as_u64().unwrap_or(0);
                anyhow::ensure!(
                    refused == refused_before + 3,
                    "refusals counted {refused_before} then {refused}: {after:#}"
                );
                eprintln!(
                    "p2p private: second node got {} bytes from its peer; the holder checked {} \
                 proofs and refused {refused} requests",
                    got["bytes_from_peers"], after["peers"]["pull_checks"]
                );
                Ok(())
            },
        )
    });
}

/// The lowest block in a block set's hex (little-endian bytes), if any.
fn first_block(hex: &str) -> Option<u64> {
    let bytes = hex::decode(hex).ok()?;
    bytes.iter().enumerate().find_map(|(at, byte)| {
        (*byte != 0).then(|| at as u64 * 8 + u64::from(byte.trailing_zeros()))
    })
}
