//! `shoal preheat REF`: asks the local daemon's preheat API (`[preheat] listen`, with its
//! credential) for a job, as Harbor would, and follows it to its end, printing progress.

use std::time::Duration;

use anyhow::{bail, Context};
use shoal_config::{ByteSize, Config, PreheatAuth};
use shoal_fetcher::ImageRef;

use super::api::{CreateJob, CreateJobArgs, JobView};
use super::http::JOBS_PATH;
use super::jobs::Progress;

/// How often the job is read.
const POLL: Duration = Duration::from_millis(500);
/// One request to the daemon's API may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the job for `reference`; `Ok` once it succeeded, else why not. `nodes`: how many
/// peers take a share of the blocks (`None`: every live peer). Progress goes to `out`.
pub async fn preheat(
    config: &Config,
    reference: &str,
    nodes: Option<u64>,
    timeout: Duration,
    out: &mut impl std::io::Write,
) -> anyhow::Result<JobView> {
    let Some(preheat) = &config.preheat else {
        bail!(
            "the config has no [preheat] section: the daemon serves no preheat API \
             (add `[preheat]` to its config and restart it)"
        );
    };
    let image = ImageRef::parse(reference).with_context(|| format!("parse {reference}"))?;
    let scheme = if config.host(image.host()).plain_http {
        "http"
    } else {
        "https"
    };
    let url = format!(
        "{scheme}://{}/v2/{}/manifests/{}",
        image.api_host(),
        image.repository_name(),
        image.manifest_reference()
    );
    let mut listen = preheat.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let base = format!("http://{listen}{JOBS_PATH}");
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("build an HTTP client")?;
    let authorized = |request: reqwest::RequestBuilder| match &preheat.auth {
        PreheatAuth::None => request,
        PreheatAuth::Bearer(token) => request.bearer_auth(token),
        PreheatAuth::Basic { username, password } => request.basic_auth(username, Some(password)),
    };
    let body = CreateJob {
        kind: "preheat".into(),
        args: CreateJobArgs {
            kind: "image".into(),
            url,
            timeout: timeout.as_nanos().min(i64::MAX as u128) as i64,
            nodes,
            ..CreateJobArgs::default()
        },
        scheduler_cluster_ids: None,
    };
    let mut job: JobView = read(
        authorized(client.post(&base)).json(&body),
        &format!("create a preheat job at {base}"),
    )
    .await?;
    writeln!(out, "preheat job {} for {}", job.id, job.image)?;
    let mut shown = None;
    loop {
        if shown.as_ref() != Some(&job.progress) {
            writeln!(out, "{}", line(&job.progress))?;
            shown = Some(job.progress.clone());
        }
        match job.state.as_str() {
            "PENDING" => {}
            "SUCCESS" => return Ok(job),
            "FAILURE" => {
                let errors: Vec<&str> = job
                    .result
                    .job_states
                    .iter()
                    .map(|state| state.error.as_str())
                    .collect();
                bail!("preheat job {} failed: {}", job.id, errors.join("; "))
            }
            other => bail!("preheat job {} is in an unknown state `{other}`", job.id),
        }
        tokio::time::sleep(POLL).await;
        let url = format!("{base}/{}", job.id);
        job = read(authorized(client.get(&url)), &format!("read {url}")).await?;
    }
}

async fn read(request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<JobView> {
    let response = request.send().await.with_context(|| what.to_owned())?;
    let status = response.status();
    let body = response.bytes().await.with_context(|| what.to_owned())?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{what}: {status}: {message}");
    }
    serde_json::from_slice(&body).with_context(|| format!("{what}: parse the answer"))
}

/// One progress line.
fn line(p: &Progress) -> String {
    let mut text = format!(
        "{}: {}/{} blobs, {} of {} (from the registry {}, from peers {})",
        p.phase,
        p.blobs_done,
        p.blobs_total,
        ByteSize(p.bytes_done),
        ByteSize(p.bytes_total),
        ByteSize(p.bytes_from_registry),
        ByteSize(p.bytes_from_peers)
    );
    if p.nodes_asked > 0 {
        text.push_str(&format!(
            ", spread to {}/{} nodes",
            p.nodes_spread, p.nodes_asked
        ));
    }
    text
}
