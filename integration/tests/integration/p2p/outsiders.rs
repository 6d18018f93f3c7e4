//! The peer port against clients that are not members, without TLS (`insecure = true`): raw
//! HTTP from a namespace of the test's own that no static list names gets 403 and no byte
//! of a cached layer, and its announcements, lookups and renewals change nothing; a member's
//! flood of announcements of made-up blobs stays under `peers.index_memory`, and oversized
//! bodies get 413.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::{start_together, with_cluster, Cluster, PEER_PORT};
use crate::convert::manifest_layers;
use crate::fixture::{privileged, Fixture};

/// The node's owner index may take this much.
const INDEX_CAP: u64 = 2 << 20;
/// Announcements in the member's flood, each of a new blob with every one of 2^20 blocks.
const FLOOD: usize = 40;

/// `requests` sent by `curl` from `label`'s namespace, over HTTP/2 one process each (this
/// curl fails requests after the first on a reused prior-knowledge connection), or over
/// HTTP/1.1 in one process (`--next` between them); per request, the HTTP status and the
/// body bytes received, as `"<status> <bytes>"`, status `000` when curl got no answer (an
/// HTTP/2 server that refuses a request before reading its body resets the stream).
fn curl(
    cluster: &Cluster,
    label: &str,
    http2: bool,
    requests: &[Vec<String>],
) -> Result<Vec<String>> {
    let batches: Vec<&[Vec<String>]> = if http2 {
        requests.chunks(1).collect()
    } else {
        vec![requests]
    };
    let mut answers = Vec::new();
    for batch in batches {
        let mut command = cluster.network.command(label, "timeout")?;
        command.args(["60", "curl"]);
        for (i, request) in batch.iter().enumerate() {
            if i > 0 {
                command.arg("--next");
            }
            if http2 {
                command.arg("--http2-prior-knowledge");
            }
            command
                .args(["-s", "--max-time", "10"])
                .args(["-o", "/dev/null", "-w", "%{http_code} %{size_download}\\n"])
                .args(request);
        }
        let out = command.output().context("run curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        answers.extend(text.lines().map(str::to_owned));
    }
    anyhow::ensure!(
        answers.len() == requests.len(),
        "curl answered {answers:?} to {} requests",
        requests.len()
    );
    Ok(answers)
}

/// A POST of the JSON in file `body` to `url`.
fn post(url: &str, body: &Path) -> Vec<String> {
    vec![
        "-H".into(),
        "content-type: application/json".into(),
        "--data-binary".into(),
        format!("@{}", body.display()),
        url.into(),
    ]
}

fn write_json(
    fixture: &Fixture,
    name: &str,
    value: &serde_json::Value,
) -> Result<std::path::PathBuf> {
    let path = fixture.path(name);
    fs::write(&path, value.to_string())?;
    Ok(path)
}

#[test]
fn a_non_member_gets_no_byte_and_a_flood_of_announcements_stays_under_the_cap() {
    privileged!();
    Fixture::run(|fixture| {
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let layers =
                manifest_layers(&format!("{}/{}", cluster.host_registry(), published.path))?;
            let (layer, _) = layers
                .iter()
                .max_by_key(|(_, size)| *size)
                .context("no layers")?
                .clone();
            let settings = format!("latency_budget_ms = 3000\nindex_memory = {INDEX_CAP}");
            let node = cluster.add_peers("m", &[settings.as_str()])?[0];
            let started = start_together(cluster, &[node], &reference, "cached");
            super::ensure_all_right(&started, &published.blob_sha256)?;
            let member = cluster.nodes[node].peer_name();
            let base = format!("http://{member}");
            let outsider_ip = cluster.network.attach("outsider")?;
            let outsider = format!("{outsider_ip}:{PEER_PORT}");

            let range = |url: &str| {
                vec![
                    "-H".to_owned(),
                    "Range: bytes=0-1048575".to_owned(),
                    url.to_owned(),
                ]
            };
            let blob_url = format!("{base}/v1/blobs/{layer}");
            let announce = |from: &str, blob: String| {
                json!({
                    "from": from, "blob": blob, "block_size": 1 << 20,
                    "blocks": "f".repeat(1 << 18), "replace": false,
                })
            };
            let made_up = |n: usize| format!("sha256:{:064x}", n + 1);
            let announce_file =
                write_json(fixture, "announce.json", &announce(&outsider, made_up(0)))?;
            let lookup = json!({
                "from": outsider, "blob": layer, "block_size": 1 << 20, "first": 0, "count": 1,
            });
            let lookup_file = write_json(fixture, "lookup.json", &lookup)?;
            let renew_file = write_json(fixture, "renew.json", &lookup)?;

            // The member itself is served the block: the request is one that yields bytes.
            let answers = curl(cluster, "m0", true, &[range(&blob_url)])?;
            anyhow::ensure!(
                answers == ["206 1048576"],
                "the member's own range request: {answers:?}"
            );

            // The outsider gets 403 and nothing else from every route but /health.
            let before = cluster.nodes[node].status(&cluster.network)?["peers"].clone();
            let requests = [
                range(&blob_url),
                post(&format!("{base}/v1/announce"), &announce_file),
                post(&format!("{base}/v1/lookup"), &lookup_file),
                post(&format!("{base}/v1/renew"), &renew_file),
            ];
            let mut answers = curl(cluster, "outsider", true, &requests)?;
            answers.extend(curl(cluster, "outsider", false, &requests)?);
            eprintln!("p2p outsiders: a non-member's requests were answered {answers:?}");
            for answer in &answers {
                let (status, _) = answer.split_once(' ').context("curl's -w")?;
                anyhow::ensure!(
                    status == "403" || status == "000",
                    "a non-member was answered {answers:?}"
                );
            }
            let after = cluster.nodes[node].status(&cluster.network)?["peers"].clone();
            anyhow::ensure!(
                after["bytes_uploaded"] == before["bytes_uploaded"]
                    && after["index_blobs"] == before["index_blobs"]
                    && after["lookups_answered"] == before["lookups_answered"],
                "a non-member's requests changed the node: {before} -> {after}"
            );
            anyhow::ensure!(
                after["requests_refused"].as_u64()
                    == before["requests_refused"].as_u64().map(|n| n + 8),
                "refusals not counted: {after}"
            );

            // A member announcing for an address no list names is refused too.
            let answers = curl(
                cluster,
                "m0",
                true,
                &[post(&format!("{base}/v1/announce"), &announce_file)],
            )?;
            anyhow::ensure!(
                answers.len() == 1 && answers[0].starts_with("403 "),
                "an announcement for a non-member: {answers:?}"
            );

            // A member's flood of new blobs, each with 2^20 blocks, stays under the cap.
            let mut flood = Vec::new();
            for n in 1..=FLOOD {
                let file = write_json(
                    fixture,
                    &format!("flood-{n}.json"),
                    &announce(&member, made_up(n)),
                )?;
                flood.push(post(&format!("{base}/v1/announce"), &file));
            }
            let answers = curl(cluster, "m0", false, &flood)?;
            anyhow::ensure!(
                answers.len() == FLOOD && answers.iter().all(|a| a.starts_with("200 ")),
                "the member's announcements: {answers:?}"
            );
            let peers = cluster.nodes[node].status(&cluster.network)?["peers"].clone();
            let (bytes, blobs, evicted) = (
                peers["index_bytes"].as_u64().unwrap_or(u64::MAX),
                peers["index_blobs"].as_u64().unwrap_or(0),
                peers["index_evictions"].as_u64().unwrap_or(0),
            );
            eprintln!(
                "p2p outsiders: after {FLOOD} announcements of 128 KiB block sets the index \
                 holds {blobs} blobs in {bytes} bytes, {evicted} forgotten"
            );
            anyhow::ensure!(
                bytes <= INDEX_CAP && evicted as usize >= FLOOD - (INDEX_CAP as usize >> 17),
                "the index grew past its cap: {peers}"
            );

            // Bodies past their route's limit get 413, declared or not.
            let padded = format!("{lookup}{}", " ".repeat(8 << 10));
            let padded_file = fixture.path("padded.json");
            fs::write(&padded_file, padded)?;
            let huge = announce(&member, made_up(0)).to_string().replace(
                "\"blocks\":\"",
                &format!("\"blocks\":\"{}", "0".repeat(1 << 18)),
            );
            let huge_file = fixture.path("huge.json");
            fs::write(&huge_file, huge)?;
            let answers = curl(
                cluster,
                "m0",
                false,
                &[
                    post(&format!("{base}/v1/lookup"), &padded_file),
                    post(&format!("{base}/v1/renew"), &padded_file),
                    post(&format!("{base}/v1/announce"), &huge_file),
                ],
            )?;
            anyhow::ensure!(
                answers.iter().all(|a| a.starts_with("413 ")),
                "oversized bodies were answered {answers:?}"
            );
            Ok(())
        })
    });
}
