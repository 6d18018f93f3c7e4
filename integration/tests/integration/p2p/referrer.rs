//! Learned-prefetch traces kept in the registry as OCI referrer artifacts: a node with
//! `fetch.learn_push` pushes the traces it records next to the image (docker-registry 2.8
//! has no referrers API, so through the referrers tag), and a fresh node that no peer can
//! serve fetches them from there and prefetches what they name before its container runs.
//! A damaged trace there, or an artifact for another image, changes nothing.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::learned::{damage, layer_bytes_fetched, record, replayed, traces, LEARN};
use super::{with_cluster, Cluster, Published, REGISTRY_BEHIND_DELAY};
use crate::fixture::{privileged, wait_until, Fixture};
use crate::process;

const ARTIFACT_TYPE: &str = "application/vnd.shoal.trace.v1";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIGNATURE_TYPE: &str = "application/vnd.example.signature.v1";

/// The registry in namespace `reg`, spoken to with curl from inside it.
struct Repo<'a> {
    cluster: &'a Cluster,
    /// `test/p2p`
    name: String,
    /// Where request and response bodies are kept.
    dir: PathBuf,
    count: std::cell::Cell<u32>,
}

impl<'a> Repo<'a> {
    fn new(cluster: &'a Cluster, fixture: &Fixture, published: &Published) -> Result<Repo<'a>> {
        let dir = fixture.path("referrer-bodies");
        fs::create_dir_all(&dir)?;
        let name = published.path.split(':').next().context("a repository")?;
        Ok(Repo {
            cluster,
            name: name.to_owned(),
            dir,
            count: std::cell::Cell::new(0),
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{REGISTRY_BEHIND_DELAY}/v2/{}/{path}",
            self.name
        )
    }

    fn file(&self) -> PathBuf {
        self.count.set(self.count.get() + 1);
        self.dir.join(format!("body-{}", self.count.get()))
    }

    fn curl(&self, args: &[&str]) -> Result<String> {
        let mut command = self.cluster.network.command("reg", "curl")?;
        command.args(["-sSf", "--max-time", "60"]).args(args);
        process::run(&mut command, Duration::from_secs(90))
    }

    /// The body at `path`, asked for as `accept`; `None` on 404.
    fn get(&self, path: &str, accept: &str) -> Result<Option<Vec<u8>>> {
        let out = self.file();
        let code = self.curl(&[
            "-o",
            out.to_str().context("a path")?,
            "-w",
            "%{http_code}",
            "-H",
            &format!("Accept: {accept}"),
            &self.url(path),
        ]);
        match code {
            Ok(_) => Ok(Some(fs::read(&out)?)),
            Err(error) if format!("{error:#}").contains("404") => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn json(&self, path: &str, accept: &str) -> Result<Value> {
        let body = self
            .get(path, accept)?
            .with_context(|| format!("{path}: 404"))?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Stores `body` as manifest `reference`; returns its digest.
    fn put_manifest(&self, reference: &str, media_type: &str, body: &[u8]) -> Result<String> {
        let input = self.file();
        fs::write(&input, body)?;
        self.curl(&[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {media_type}"),
            "--data-binary",
            &format!("@{}", input.display()),
            &self.url(&format!("manifests/{reference}")),
        ])?;
        Ok(format!("sha256:{}", hex::encode(Sha256::digest(body))))
    }

    /// Uploads `bytes` as a blob; returns its descriptor's digest and size.
    fn put_blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let headers = self.curl(&[
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &self.url("blobs/uploads/"),
        ])?;
        let location = headers
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_owned())
            })
            .context("upload without a location")?;
        let location = if location.starts_with('/') {
            format!("http://127.0.0.1:{REGISTRY_BEHIND_DELAY}{location}")
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let input = self.file();
        fs::write(&input, bytes)?;
        self.curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", input.display()),
            &format!("{location}{separator}digest={digest}"),
        ])?;
        Ok((digest, bytes.len() as u64))
    }

    /// The image's manifest descriptor (the subject of its referrers).
    fn subject(&self, published: &Published) -> Result<Value> {
        let tag = published.path.split(':').nth(1).context("a tag")?;
        let accept = format!("{OCI_MANIFEST}, {OCI_INDEX}");
        let body = self
            .get(&format!("manifests/{tag}"), &accept)?
            .context("the image's manifest")?;
        let manifest: Value = serde_json::from_slice(&body)?;
        if manifest["mediaType"] == OCI_INDEX {
            return Ok(manifest["manifests"][0].clone());
        }
        Ok(json!({
            "mediaType": OCI_MANIFEST,
            "digest": format!("sha256:{}", hex::encode(Sha256::digest(&body))),
            "size": body.len(),
        }))
    }

    /// The index at the referrers tag of `subject`.
    fn referrers(&self, subject: &str) -> Result<Vec<Value>> {
        let tag = subject.replace(':', "-");
        let index = self.json(&format!("manifests/{tag}"), OCI_INDEX)?;
        Ok(index["manifests"].as_array().cloned().unwrap_or_default())
    }

    /// Lists `entry` last in the referrers tag of `subject`, keeping what is there.
    fn list_referrer(&self, subject: &str, entry: Value) -> Result<()> {
        let mut manifests = self.referrers(subject).unwrap_or_default();
        manifests.push(entry);
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.put_manifest(
            &subject.replace(':', "-"),
            OCI_INDEX,
            &serde_json::to_vec(&index)?,
        )?;
        Ok(())
    }
}

/// Adds a node without peers; with `push`, it pushes the traces it records.
fn add_learner(cluster: &mut Cluster, label: &str, push: bool) -> Result<usize> {
    let address = cluster.network.attach(label)?;
    let push = if push { "learn_push = true\n" } else { "" };
    cluster.push_node(label, address, &format!("{LEARN}{push}"))
}

/// Node `i`'s log lines that contain `text`.
fn log_lines(cluster: &Cluster, i: usize, text: &str) -> Result<usize> {
    let log = fs::read_to_string(&cluster.nodes[i].log)?;
    Ok(log.lines().filter(|l| l.contains(text)).count())
}

/// Seeds a signature referrer, runs the image on a node that pushes its traces, and waits
/// for both traces to be in the registry; returns the subject's digest and what was recorded.
fn push_traces(
    cluster: &mut Cluster,
    fixture: &Fixture,
    reference: &str,
    published: &Published,
) -> Result<(String, Vec<(String, u64)>)> {
    let digest = {
        let repo = Repo::new(cluster, fixture, published)?;
        let subject = repo.subject(published)?;
        let digest = subject["digest"].as_str().context("a digest")?.to_owned();
        // Another tool's referrer, there first: the push must keep it.
        let image = repo.json(&format!("manifests/{digest}"), OCI_MANIFEST)?;
        let signature = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SIGNATURE_TYPE,
            "config": image["config"],
            "layers": [image["layers"][0]],
            "subject": subject,
        });
        let body = serde_json::to_vec(&signature)?;
        let reference = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let signed = repo.put_manifest(&reference, OCI_MANIFEST, &body)?;
        repo.list_referrer(
            &digest,
            json!({
                "mediaType": OCI_MANIFEST,
                "digest": signed,
                "size": body.len(),
                "artifactType": SIGNATURE_TYPE,
            }),
        )?;
        digest
    };

    let pusher = add_learner(cluster, "push", true)?;
    let recorded = record(cluster, pusher, reference, published)?;
    // Each layer's recording pushes once: the second push lists both traces.
    wait_until("both pushes", Duration::from_secs(60), || {
        Ok(log_lines(cluster, pusher, "traces pushed to the registry")? == 2)
    })?;
    anyhow::ensure!(
        log_lines(cluster, pusher, "traces not pushed")? == 0,
        "a push failed"
    );
    let kept = traces(cluster, pusher)?;
    anyhow::ensure!(
        kept.iter().all(|p| p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&digest[7..]))),
        "traces kept for another image than {digest}: {kept:?}"
    );
    Ok((digest, recorded))
}

#[test]
fn a_trace_pushed_to_the_registry_is_prefetched_by_a_node_no_peer_serves() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let (subject, recorded) = push_traces(cluster, fixture, &reference, published)?;

            // The tag index: the signature, kept, and one trace artifact naming both layers.
            let repo = Repo::new(cluster, fixture, published)?;
            let listed = repo.referrers(&subject)?;
            let types: Vec<&str> = listed
                .iter()
                .map(|e| e["artifactType"].as_str().unwrap_or(""))
                .collect();
            anyhow::ensure!(
                types == [SIGNATURE_TYPE, ARTIFACT_TYPE],
                "referrers after two pushes: {listed:#?}"
            );
            let artifact = repo.json(
                &format!(
                    "manifests/{}",
                    listed[1]["digest"].as_str().context("digest")?
                ),
                OCI_MANIFEST,
            )?;
            anyhow::ensure!(
                artifact["subject"]["digest"] == subject.as_str()
                    && artifact["artifactType"] == ARTIFACT_TYPE,
                "artifact: {artifact:#}"
            );
            let mut layers: Vec<&str> = artifact["layers"]
                .as_array()
                .context("layers")?
                .iter()
                .map(|l| {
                    l["annotations"]["dev.shoal.trace.layer"]
                        .as_str()
                        .unwrap_or("")
                })
                .collect();
            layers.sort();
            let mut want: Vec<&str> = recorded.iter().map(|(d, _)| d.as_str()).collect();
            want.sort();
            anyhow::ensure!(
                layers == want,
                "traced layers {layers:?}, recorded {want:?}"
            );
            drop(repo);

            // A fresh node, no peers, empty cache: the traces come from the registry and are
            // prefetched at mount, before any container runs.
            let fresh = add_learner(cluster, "fresh", false)?;
            cluster.nodes[fresh].rpull(&cluster.network, &reference)?;
            let learned = replayed(cluster, fresh, 2)?;
            let before = cluster.nodes[fresh].status(&cluster.network)?;
            for (digest, chunks) in &recorded {
                let layer = learned
                    .iter()
                    .find(|l| l["digest"] == digest.as_str())
                    .with_context(|| format!("{digest} not learned: {before:#}"))?;
                anyhow::ensure!(
                    layer["chunks"].as_u64() == Some(*chunks)
                        && layer["peer"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("registry ")),
                    "the fresh node prefetched {layer} where {chunks} chunks were recorded"
                );
            }
            anyhow::ensure!(
                before["learn"]["from_registry"].as_u64() == Some(2),
                "counters: {:#}",
                before["learn"]
            );
            // Kept, so this node gives them on to peers.
            anyhow::ensure!(traces(cluster, fresh)?.len() == 2, "traces not kept");

            // The container then reads only what is there: no more data-layer bytes.
            let (data, _) = recorded
                .iter()
                .max_by_key(|(_, chunks)| *chunks)
                .context("no layer recorded")?;
            let fetched = |status: &Value| layer_bytes_fetched(status, data.as_str(), false);
            let sum = cluster.nodes[fresh].run_sum(&reference, "after-registry-prefetch")?;
            anyhow::ensure!(sum == published.blob_sha256, "the container saw {sum}");
            let after = cluster.nodes[fresh].status(&cluster.network)?;
            anyhow::ensure!(
                fetched(&after) == fetched(&before),
                "the container fetched data-layer bytes the trace should have brought: {} \
                 before, {} after",
                fetched(&before),
                fetched(&after)
            );
            Ok(())
        })
    });
}

/// Pushes a copy of trace artifact `artifact` whose traces are `edit`ed and whose subject is
/// `subject` (sealed as a registry would keep it), and lists it last in the tag of `listed_under`.
fn push_altered(
    repo: &Repo,
    artifact: &Value,
    edit: fn(&mut [u8]),
    subject: Value,
    listed_under: &str,
) -> Result<()> {
    let mut altered = artifact.clone();
    for layer in altered["layers"].as_array_mut().context("layers")? {
        let digest = layer["digest"].as_str().context("digest")?.to_owned();
        let mut bytes = repo
            .get(&format!("blobs/{digest}"), "*/*")?
            .context("a trace blob")?;
        edit(&mut bytes);
        let (digest, size) = repo.put_blob(&bytes)?;
        layer["digest"] = json!(digest);
        layer["size"] = json!(size);
    }
    altered["subject"] = subject;
    let body = serde_json::to_vec(&altered)?;
    let reference = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    let digest = repo.put_manifest(&reference, OCI_MANIFEST, &body)?;
    repo.list_referrer(
        listed_under,
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": body.len(),
            "artifactType": ARTIFACT_TYPE,
        }),
    )
}

/// Starts the image on a fresh node without peers: it finds no usable trace in the registry,
/// so it prefetches nothing and records its own; `line` is logged once per layer (`count`).
fn start_unhelped(
    cluster: &mut Cluster,
    label: &str,
    reference: &str,
    published: &Published,
    line: &str,
    count: usize,
) -> Result<()> {
    let node = add_learner(cluster, label, false)?;
    record(cluster, node, reference, published)?;
    let status = cluster.nodes[node].status(&cluster.network)?;
    let learn = &status["learn"];
    anyhow::ensure!(
        learn["replayed"].as_u64() == Some(0)
            && learn["from_registry"].as_u64() == Some(0)
            && learn["prefetched_chunks"].as_u64() == Some(0),
        "{label}: {learn:#}"
    );
    let lines = log_lines(cluster, node, line)?;
    anyhow::ensure!(lines == count, "{label}: {lines} lines say {line:?}");
    Ok(())
}

#[test]
fn a_damaged_trace_in_the_registry_or_one_for_another_image_changes_nothing() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let (subject, _) = push_traces(cluster, fixture, &reference, published)?;
            let (artifact, image) = {
                let repo = Repo::new(cluster, fixture, published)?;
                let listed = repo.referrers(&subject)?;
                let ours = listed.last().context("no referrer")?;
                let path = format!("manifests/{}", ours["digest"].as_str().context("digest")?);
                let artifact = repo.json(&path, OCI_MANIFEST)?;
                let image = artifact["subject"].clone();
                // The newest trace artifact is the one used: its traces damaged.
                push_altered(&repo, &artifact, damage, image.clone(), &subject)?;
                (artifact, image)
            };
            start_unhelped(
                cluster,
                "bad",
                &reference,
                published,
                "trace rejected: not used for prefetch",
                2,
            )?;

            // Listed under this image, but made for another one: ignored whole, one line.
            {
                let repo = Repo::new(cluster, fixture, published)?;
                let mut elsewhere = image.clone();
                elsewhere["digest"] = json!(format!("sha256:{}", "5a".repeat(32)));
                push_altered(&repo, &artifact, |_| {}, elsewhere, &subject)?;
            }
            start_unhelped(
                cluster,
                "other",
                &reference,
                published,
                "trace artifact in the registry ignored",
                1,
            )?;
            Ok(())
        })
    });
}
