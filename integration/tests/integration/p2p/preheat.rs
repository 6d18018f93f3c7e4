//! Preheat as Harbor asks for it: a client that sends, byte for byte, what Harbor's Dragonfly
//! preheat provider sends (Go's net/http over one kept-alive connection, the driver's JSON),
//! from a host of its own, to one node's `[preheat]` API; then a rollout on every other node
//! takes no layer bytes from the registry. Jobs that cannot succeed (no such image, a
//! registry that wants credentials the job did not bring) end in FAILURE with the reason,
//! and `shoal preheat` prints progress and exits non-zero on failure.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use super::{
    ensure_all_right, start_together, with_cluster, with_cluster_of, Cluster, REGISTRY_MBIT,
};
use crate::fixture::{privileged, Fixture};
use crate::process;

const PREHEAT_PORT: u16 = 7430;
/// The token Harbor's provider instance is registered with (auth mode OAuth).
const TOKEN: &str = "harbor-instance-token-0123456789";
/// What a preheat job may take on this machine, however loaded.
const JOB_WITHIN: Duration = Duration::from_secs(240);
const LOGIN: &str = "puller:pull-secret";
/// bcrypt (cost 5) of `pull-secret`, as the registry's htpasswd file wants it.
const HASH: &str = "$2b$05$YxNDRbdAbNuc1GE4n/isNuoJhJdq29IYDHIuoBXARCsRThtPn50tO";

/// The `[preheat]` section of the preheating node: on its address, so it needs the token.
fn preheat_section() -> String {
    format!("\n[preheat]\nlisten = \"0.0.0.0:{PREHEAT_PORT}\"\ntoken = \"{TOKEN}\"\n")
}

/// Harbor's Dragonfly provider on the wire: `client.GetHTTPClient(...)` of
/// `src/pkg/p2p/preheat/provider/client/http_client.go` as Go's transport writes its requests
/// (Host, User-Agent, Content-Length, the other headers sorted, then `Accept-Encoding: gzip`),
/// with the `Authorization` of the OAuth auth handler, over one connection kept alive.
struct Harbor {
    reader: BufReader<TcpStream>,
    host: String,
}

/// One answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "parse the answer ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Harbor {
    /// Connects from the `harbor` host of `cluster`'s network to `api`.
    fn connect(cluster: &mut Cluster, api: SocketAddr) -> Result<Harbor> {
        if cluster.network.address("harbor").is_err() {
            cluster.network.attach("harbor")?;
        }
        let stream = cluster.network.connect_tcp("harbor", api)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Harbor {
            reader: BufReader::new(stream),
            host: api.to_string(),
        })
    }

    /// `GetHealth`: `GET /healthy`.
    fn health(&mut self) -> Result<Answer> {
        self.get("/healthy")
    }

    /// `Preheat`: `POST /oapi/v1/jobs` with the driver's `dragonflyCreateJobRequest`, as
    /// `json.Marshal` writes it (no scope, no cluster ids: the instance's defaults).
    fn preheat(&mut self, manifest_url: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        let headers: Vec<String> = headers
            .iter()
            .map(|(name, value)| format!("{}:{}", go_json(name), go_json(value)))
            .collect();
        let body = format!(
            "{{\"type\":\"preheat\",\"args\":{{\"type\":\"image\",\"url\":{},\"tag\":\"\",\
             \"filtered_query_params\":\"\",\"headers\":{{{}}},\"scope\":\"\",\
             \"concurrent_count\":0,\"timeout\":0}},\"scheduler_cluster_ids\":null}}",
            go_json(manifest_url),
            headers.join(",")
        );
        let request = format!(
            "POST /oapi/v1/jobs HTTP/1.1\r\nHost: {}\r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/json\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.exchange(request.as_bytes())
    }

    /// `CheckProgress`: `GET /oapi/v1/jobs/<id>`.
    fn job(&mut self, id: u64) -> Result<Answer> {
        self.get(&format!("/oapi/v1/jobs/{id}"))
    }

    fn get(&mut self, path: &str) -> Result<Answer> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Go-http-client/1.1\r\n\
             Accept: application/json\r\nAuthorization: Bearer {TOKEN}\r\n\
             Accept-Encoding: gzip\r\n\r\n",
            self.host
        );
        self.exchange(request.as_bytes())
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Answer> {
        self.reader.get_mut().write_all(request)?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("status line {status_line:?}"))?;
        let mut length = None;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').context("header line")?;
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>()?);
            }
            anyhow::ensure!(
                !name.eq_ignore_ascii_case("transfer-encoding"),
                "a chunked answer; Harbor's client reads it, this one expects a length"
            );
        }
        let mut body = vec![0; length.context("an answer without Content-Length")?];
        self.reader.read_exact(&mut body)?;
        Ok(Answer { status, body })
    }

    /// Creates a job for `manifest_url` and reads it until it ends, as Harbor's preheat job
    /// polls `CheckProgress`; the ended job.
    fn preheat_to_end(
        &mut self,
        manifest_url: &str,
        headers: &[(&str, &str)],
    ) -> Result<serde_json::Value> {
        let created = self.preheat(manifest_url, headers)?;
        anyhow::ensure!(
            created.status == 200,
            "create: {} {}",
            created.status,
            String::from_utf8_lossy(&created.body)
        );
        let created = created.json()?;
        anyhow::ensure!(created["state"] == "PENDING", "created {created}");
        // Harbor formats the id with %d and parses created_at/updated_at as RFC 3339.
        let id = created["id"].as_u64().context("a numeric id")?;
        for field in ["created_at", "updated_at"] {
            let text = created[field].as_str().context("a time")?;
            anyhow::ensure!(text.contains('T') && text.ends_with('Z'), "{field} {text}");
        }
        let deadline = Instant::now() + JOB_WITHIN;
        loop {
            let answer = self.job(id)?;
            anyhow::ensure!(answer.status == 200, "job {id}: {}", answer.status);
            let job = answer.json()?;
            if job["state"] != "PENDING" {
                return Ok(job);
            }
            anyhow::ensure!(Instant::now() < deadline, "job {id} still pending: {job}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A string as Go's `json.Marshal` writes it (it escapes `<`, `>` and `&`).
fn go_json(text: &str) -> String {
    serde_json::to_string(text)
        .unwrap_or_default()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// The errors of an ended job, as Harbor's `CheckProgress` joins them.
fn job_errors(job: &serde_json::Value) -> String {
    job["result"]["job_states"]
        .as_array()
        .map(|states| {
            states
                .iter()
                .filter_map(|state| state["error"].as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Blob bytes the registry sent so far, by digest (its access log, as
/// [`Cluster::registry_blob_bytes`] counts them).
fn registry_bytes_by_blob(cluster: &Cluster) -> HashMap<String, u64> {
    let mut bytes = HashMap::new();
    let log = fs::read_to_string(&cluster.registry_log).unwrap_or_default();
    for line in log.lines() {
        let Some(path) = line.split("\"GET ").nth(1) else {
            continue;
        };
        let Some((_, digest)) = path
            .split_whitespace()
            .next()
            .and_then(|p| p.split_once("/blobs/"))
        else {
            continue;
        };
        let Some(after) = line.split("HTTP/1.1\" ").nth(1) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let status: u16 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let size: u64 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if (200..300).contains(&status) {
            *bytes.entry(digest.to_owned()).or_default() += size;
        }
    }
    bytes
}

/// The difference of two [`registry_bytes_by_blob`] readings.
fn sent_between(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
) -> HashMap<String, u64> {
    after
        .iter()
        .map(|(digest, bytes)| (digest.clone(), bytes - before.get(digest).unwrap_or(&0)))
        .filter(|(_, bytes)| *bytes > 0)
        .collect()
}

/// The config digest of `path` (`repository:tag`), read from the loopback registry the image
/// was pushed to (the same storage as the shaped one, not counted in its log).
fn config_digest(cluster: &Cluster, path: &str) -> Result<String> {
    let (repository, tag) = path.split_once(':').context("a tagged path")?;
    let mut stream = TcpStream::connect(cluster.host_registry())?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET /v2/{repository}/manifests/{tag} HTTP/1.1\r\nHost: {}\r\n\
         Accept: application/vnd.oci.image.manifest.v1+json, \
         application/vnd.docker.distribution.manifest.v2+json\r\nConnection: close\r\n\r\n",
        cluster.host_registry()
    )?;
    // The registry's proxy may keep the connection open: read just the answer's length.
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&body).context("parse the manifest")?;
    manifest["config"]["digest"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no config in {manifest}"))
}

#[test]
fn a_harbor_preheat_leaves_a_rollout_nothing_to_fetch_from_the_registry() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let registry = cluster.registry_host()?;
            let reference = format!("{registry}/{}", published.path);
            let (repository, tag) = published.path.split_once(':').context("tagged")?;
            let budget = "latency_budget_ms = 5000".to_owned();
            let preheater = budget.clone() + &preheat_section();
            let nodes = cluster.add_peers("h", &[&preheater, &budget, &budget, &budget])?;
            let api = SocketAddr::from((cluster.nodes[nodes[0]].address, PREHEAT_PORT));
            let mut harbor = Harbor::connect(cluster, api)?;

            // Registering the instance: Harbor checks its health.
            let health = harbor.health()?;
            anyhow::ensure!(health.status == 200, "healthy: {}", health.status);

            // An image that does not exist: the job fails, saying so.
            let missing = harbor.preheat_to_end(
                &format!("http://{registry}/v2/{repository}/manifests/no-such-tag"),
                &[("Authorization", "Bearer harbor-pull-token")],
            )?;
            anyhow::ensure!(missing["state"] == "FAILURE", "{missing}");
            let why = job_errors(&missing);
            anyhow::ensure!(
                why.contains("manifest") && why.contains("no-such-tag") && why.contains("404"),
                "{why}"
            );

            // The image: Harbor sends its pull token, which a public repository does not need.
            let before = cluster.registry_blob_bytes();
            let job = harbor.preheat_to_end(
                &format!("http://{registry}/v2/{repository}/manifests/{tag}"),
                &[("Authorization", "Bearer harbor-pull-token")],
            )?;
            anyhow::ensure!(job["state"] == "SUCCESS", "{job}");
            let preheated = cluster.registry_blob_bytes() - before;
            let tasks = &job["result"]["job_states"][0]["results"][0];
            anyhow::ensure!(
                tasks["failure_tasks"].as_array().is_some_and(Vec::is_empty)
                    && tasks["success_tasks"]
                        .as_array()
                        .is_some_and(|t| t.len() >= 3),
                "{job}"
            );
            anyhow::ensure!(job["progress"]["bytes_done"] == job["progress"]["bytes_total"]);
            // Each blob went on to its index owners (two per blob by default) over the peers.
            let (asked, spread) = (
                job["progress"]["nodes_asked"].as_u64().unwrap_or(0),
                job["progress"]["nodes_spread"].as_u64().unwrap_or(0),
            );
            anyhow::ensure!(
                asked >= 2 && spread == asked,
                "spread to {spread}/{asked}: {job}"
            );

            // The rollout on every other node: layers come from the peers alone.
            let config = config_digest(cluster, &published.path)?;
            let before = registry_bytes_by_blob(cluster);
            let rollout = &nodes[1..];
            let peer_bytes = |cluster: &Cluster| -> Result<u64> {
                let mut sum = 0;
                for &i in rollout {
                    sum += cluster.nodes[i].status(&cluster.network)?["bytes_from_peers"]
                        .as_u64()
                        .unwrap_or(0);
                }
                Ok(sum)
            };
            let peers_before = peer_bytes(cluster)?;
            let started = start_together(cluster, rollout, &reference, "rollout");
            ensure_all_right(&started, &published.blob_sha256)?;
            let sent = sent_between(&before, &registry_bytes_by_blob(cluster));
            let config_bytes = sent.get(&config).copied().unwrap_or(0);
            let layer_bytes: u64 = sent
                .iter()
                .filter(|(digest, _)| **digest != config)
                .map(|(_, bytes)| bytes)
                .sum();
            let from_peers = peer_bytes(cluster)? - peers_before;
            eprintln!(
                "preheat: registry blob bytes during the preheat {preheated}; during the \
                 rollout on {} nodes: layers {layer_bytes}, config {config_bytes} (rpull reads \
                 it itself); bytes the rollout read from peers {from_peers}",
                rollout.len()
            );
            anyhow::ensure!(
                preheated as usize > super::DATA_BYTES,
                "the preheat fetched only {preheated} bytes"
            );
            anyhow::ensure!(
                layer_bytes == 0,
                "the rollout fetched layer bytes from the registry: {sent:?}"
            );

            // `shoal preheat` on the preheating node, to every other node: progress, then
            // success (every node holds the image by now).
            let node = &cluster.nodes[nodes[0]];
            let mut command = node.shoal(&cluster.network)?;
            command.args(["preheat", &reference, "--nodes", "3"]);
            let out = process::run(&mut command, JOB_WITHIN)?;
            anyhow::ensure!(
                out.contains("3/3 blobs")
                    && out.contains("spread to 3/3 nodes")
                    && out.contains("succeeded"),
                "shoal preheat printed {out}"
            );
            // And a failure: exit status non-zero, the reason on stderr.
            let mut command = node.shoal(&cluster.network)?;
            command.args(["preheat", &format!("{registry}/{repository}:no-such-tag")]);
            let failed = process::run(&mut command, JOB_WITHIN)
                .err()
                .context("shoal preheat of a missing image exited 0")?;
            let text = format!("{failed:#}");
            anyhow::ensure!(
                text.contains("exit status: 1") && text.contains("404") && text.contains("failed"),
                "{text}"
            );
            Ok(())
        })
    });
}

#[test]
fn a_preheat_without_the_credentials_the_registry_wants_fails_and_with_them_succeeds() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster_of(
            fixture,
            REGISTRY_MBIT,
            Some((LOGIN, HASH)),
            &[],
            |cluster, published| {
                let registry = cluster.registry_host()?;
                let (repository, tag) = published.path.split_once(':').context("tagged")?;
                let url = format!("http://{registry}/v2/{repository}/manifests/{tag}");
                let nodes = cluster.add_peers("c", &[&preheat_section()])?;
                let api = SocketAddr::from((cluster.nodes[nodes[0]].address, PREHEAT_PORT));
                let mut harbor = Harbor::connect(cluster, api)?;

                // The node has no credential and the job brings none.
                let job = harbor.preheat_to_end(&url, &[])?;
                anyhow::ensure!(job["state"] == "FAILURE", "{job}");
                let why = job_errors(&job);
                anyhow::ensure!(
                    why.contains("wants credentials") && why.contains("brought no Authorization"),
                    "{why}"
                );

                // A wrong one.
                let wrong = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("puller:wrong")
                );
                let job = harbor.preheat_to_end(&url, &[("Authorization", &wrong)])?;
                anyhow::ensure!(job["state"] == "FAILURE", "{job}");
                let why = job_errors(&job);
                anyhow::ensure!(why.contains("refused the job's Authorization"), "{why}");

                // The right one, for this job only: the image lands.
                let right = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(LOGIN)
                );
                let before = cluster.registry_blob_bytes();
                let job = harbor.preheat_to_end(&url, &[("Authorization", &right)])?;
                anyhow::ensure!(job["state"] == "SUCCESS", "{job}");
                let fetched = cluster.registry_blob_bytes() - before;
                anyhow::ensure!(fetched as usize > super::DATA_BYTES, "{fetched}");

                // A request without the instance's token gets nothing.
                let mut stranger = cluster.network.connect_tcp("harbor", api)?;
                stranger.set_read_timeout(Some(Duration::from_secs(20)))?;
                write!(
                    stranger,
                    "GET /oapi/v1/jobs/1 HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
                )?;
                let mut answer = String::new();
                stranger.read_to_string(&mut answer)?;
                if !answer.starts_with("HTTP/1.1 401") {
                    bail!("without the token: {answer}");
                }
                Ok(())
            },
        )
    });
}

#[test]
fn a_preheated_overlaybd_image_rolls_out_without_the_registry() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster_of(
            fixture,
            REGISTRY_MBIT,
            None,
            &["--format", "overlaybd"],
            |cluster, published| {
                let reference = format!("{}/{}", cluster.registry_host()?, published.path);
                let budget = "latency_budget_ms = 5000".to_owned();
                let preheater = budget.clone() + &preheat_section();
                let nodes = cluster.add_peers("b", &[&preheater, &budget, &budget, &budget])?;

                // `shoal preheat` this time, with its defaults.
                let before = cluster.registry_blob_bytes();
                let mut command = cluster.nodes[nodes[0]].shoal(&cluster.network)?;
                command.args(["preheat", &reference]);
                let out = process::run(&mut command, JOB_WITHIN)?;
                anyhow::ensure!(out.contains("succeeded"), "shoal preheat printed {out}");
                eprintln!("shoal preheat printed:\n{out}");
                let preheated = cluster.registry_blob_bytes() - before;

                let config = config_digest(cluster, &published.path)?;
                let before = registry_bytes_by_blob(cluster);
                let started = start_together(cluster, &nodes[1..], &reference, "rollout");
                ensure_all_right(&started, &published.blob_sha256)?;
                let sent = sent_between(&before, &registry_bytes_by_blob(cluster));
                let layer_bytes: u64 = sent
                    .iter()
                    .filter(|(digest, _)| **digest != config)
                    .map(|(_, bytes)| bytes)
                    .sum();
                eprintln!(
                    "preheat (overlaybd): registry blob bytes during the preheat {preheated}; \
                     during the rollout on 3 nodes: layers and tables {layer_bytes}"
                );
                anyhow::ensure!(
                    layer_bytes == 0,
                    "the rollout fetched layer bytes from the registry: {sent:?}"
                );
                Ok(())
            },
        )
    });
}
