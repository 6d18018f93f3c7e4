//! The JSON of the Dragonfly manager open API subset Harbor's Dragonfly preheat provider
//! calls (`src/pkg/p2p/preheat/provider/dragonfly.go`): the job it creates and the job it
//! reads back. Field names and types are the driver's; fields it does not send are
//! optional here, unknown ones ignored, as a Go server would.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use shoal_fetcher::{Digest, ImageRef};

use super::jobs::{BlobOutcome, Job, Progress, State};

/// The cluster id jobs report: Shoal has one cluster, the node's peers.
pub const CLUSTER_ID: u64 = 1;
/// A job's deadline when the request names none (Dragonfly's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `POST /oapi/v1/jobs`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CreateJob {
    #[serde(rename = "type")]
    pub kind: String,
    pub args: CreateJobArgs,
    /// `null` when Harbor's instance names no cluster ids.
    #[serde(default)]
    pub scheduler_cluster_ids: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct CreateJobArgs {
    #[serde(rename = "type")]
    pub kind: String,
    /// The manifest URL: `<scheme>://<registry>/v2/<repository>/manifests/<tag or digest>`.
    pub url: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub filtered_query_params: String,
    /// Headers to read the registry with; Harbor sends `Authorization` (a pull token).
    /// `null` in Go's JSON for a nil map.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub concurrent_count: i64,
    /// Go's `time.Duration`: nanoseconds; 0 for none.
    #[serde(default)]
    pub timeout: i64,
    /// Shoal's own: how many other nodes take each blob whole from the preheating node
    /// (Harbor never sends it; its `scope` decides then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u64>,
}

/// What a valid [`CreateJob`] asks for.
#[derive(Debug)]
pub struct Preheat {
    pub image: ImageRef,
    /// The `Authorization` to read the registry with, when the caller sent one.
    pub authorization: Option<String>,
    pub timeout: Duration,
    /// Other nodes that take each blob whole; `None`: as many as each blob has index owners.
    pub nodes: Option<u64>,
}

impl CreateJob {
    /// Checks the request; `Err` is the reason for a 400.
    pub fn validate(self) -> Result<Preheat, String> {
        if self.kind != "preheat" {
            return Err(format!(
                "job type `{}` is not supported: only `preheat`",
                self.kind
            ));
        }
        let args = self.args;
        if args.kind != "image" {
            return Err(format!(
                "preheat type `{}` is not supported: only `image`",
                args.kind
            ));
        }
        let image = manifest_image(&args.url)?;
        let authorization = args
            .headers
            .unwrap_or_default()
            .into_iter()
            .find_map(|(name, value)| name.eq_ignore_ascii_case("authorization").then_some(value));
        if let Some(value) = &authorization {
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err("header `Authorization` is not a valid header value".into());
            }
        }
        let timeout = match args.timeout {
            t if t < 0 => return Err(format!("timeout {t} is negative")),
            0 => DEFAULT_TIMEOUT,
            t => Duration::from_nanos(t as u64),
        };
        let nodes = match (args.nodes, args.scope.as_str()) {
            (Some(n), _) => Some(n),
            // One seed peer: the preheating node alone.
            (None, "single_seed_peer") => Some(0),
            (None, "all_peers") => Some(u64::MAX),
            (None, "" | "all_seed_peers" | "single_peer") => None,
            (None, other) => return Err(format!("scope `{other}` is not supported")),
        };
        Ok(Preheat {
            image,
            authorization,
            timeout,
            nodes,
        })
    }
}

/// The image a manifest URL names; the URL's scheme is not used (the daemon's
/// `registry.hosts` settings decide how each registry is reached).
pub fn manifest_image(url: &str) -> Result<ImageRef, String> {
    let bad = |why: &str| {
        format!("url `{url}` is not a manifest URL (<scheme>://<registry>/v2/<repository>/manifests/<reference>): {why}")
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("the scheme is not http or https"))?;
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (host, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
    let path = path
        .strip_prefix("v2/")
        .ok_or_else(|| bad("the path does not start with /v2/"))?;
    let (repository, reference) = path
        .rsplit_once("/manifests/")
        .ok_or_else(|| bad("no /manifests/ in the path"))?;
    if host.is_empty() || repository.is_empty() || reference.is_empty() {
        return Err(bad("an empty part"));
    }
    let text = if reference.starts_with("sha256:") {
        Digest::parse(reference).map_err(|error| bad(&error.to_string()))?;
        format!("{host}/{repository}@{reference}")
    } else {
        format!("{host}/{repository}:{reference}")
    };
    ImageRef::parse(&text).map_err(|error| bad(&error.to_string()))
}

/// A job as `GET /oapi/v1/jobs/<id>` (and the create) answer it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct JobView {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339, as Go's `time.Time` reads it.
    pub created_at: String,
    pub updated_at: String,
    pub state: String,
    pub result: JobResult,
    /// Shoal's own (Harbor ignores it): what the job has done so far, for `shoal preheat`.
    pub progress: Progress,
    /// The image the job preheats.
    pub image: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct JobResult {
    pub job_states: Vec<JobState>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct JobState {
    pub error: String,
    pub results: Vec<ClusterResult>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ClusterResult {
    pub success_tasks: Vec<Task>,
    pub failure_tasks: Vec<Task>,
    pub scheduler_cluster_id: u64,
}

/// One blob: `description` only for a failure.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Task {
    pub url: String,
    pub hostname: String,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl JobView {
    /// `job` as the API shows it; `hostname` and `ip` name the preheating node.
    pub fn of(job: &Job, hostname: &str, ip: &str) -> JobView {
        let task = |blob: &BlobOutcome, description: Option<String>| Task {
            url: blob.url.clone(),
            hostname: match blob.node {
                None => hostname.to_owned(),
                Some(node) => node.to_string(),
            },
            ip: match blob.node {
                None => ip.to_owned(),
                Some(node) => node.ip().to_string(),
            },
            description,
        };
        let job_states = match job.state {
            State::Pending => Vec::new(),
            State::Success | State::Failure => vec![JobState {
                error: job.error.clone().unwrap_or_default(),
                results: vec![ClusterResult {
                    success_tasks: job
                        .blobs
                        .iter()
                        .filter(|blob| blob.failure.is_none())
                        .map(|blob| task(blob, None))
                        .collect(),
                    failure_tasks: job
                        .blobs
                        .iter()
                        .filter_map(|blob| {
                            blob.failure
                                .as_ref()
                                .map(|why| task(blob, Some(why.clone())))
                        })
                        .collect(),
                    scheduler_cluster_id: CLUSTER_ID,
                }],
            }],
        };
        JobView {
            id: job.id,
            kind: "preheat".into(),
            created_at: rfc3339(job.created_at),
            updated_at: rfc3339(job.updated_at),
            state: job.state.as_str().into(),
            result: JobResult { job_states },
            progress: job.progress.clone(),
            image: job.image.clone(),
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preheat::jobs::Jobs;

    /// What Harbor's driver marshals for an image of a project (Go's `json.Marshal` of
    /// `dragonflyCreateJobRequest`, field order and zero values included).
    const HARBOR_BODY: &str = r#"{"type":"preheat","args":{"type":"image","url":"https://harbor.example.com/v2/library/nginx/manifests/1.25","tag":"","filtered_query_params":"","headers":{"Authorization":"Bearer eyJhbGciOi"},"scope":"","concurrent_count":0,"timeout":0},"scheduler_cluster_ids":null}"#;

    #[test]
    fn harbors_request_is_understood() {
        let request: CreateJob = serde_json::from_str(HARBOR_BODY).unwrap();
        let preheat = request.validate().unwrap();
        assert_eq!(preheat.image.host(), "harbor.example.com");
        assert_eq!(preheat.image.repository_name(), "library/nginx");
        assert_eq!(preheat.image.tag(), Some("1.25"));
        assert_eq!(preheat.authorization.as_deref(), Some("Bearer eyJhbGciOi"));
        assert_eq!(preheat.timeout, DEFAULT_TIMEOUT);
        assert_eq!(preheat.nodes, None);
        // With a scope and cluster ids, as an instance's extra attributes set them.
        let scoped = HARBOR_BODY
            .replace(r#""scope":"""#, r#""scope":"single_seed_peer""#)
            .replace(
                r#""scheduler_cluster_ids":null"#,
                r#""scheduler_cluster_ids":[1,2]"#,
            );
        let preheat = serde_json::from_str::<CreateJob>(&scoped)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(preheat.nodes, Some(0));
    }

    #[test]
    fn bad_requests_say_why() {
        let invalid = |body: String| {
            serde_json::from_str::<CreateJob>(&body)
                .unwrap()
                .validate()
                .unwrap_err()
        };
        assert!(
            invalid(HARBOR_BODY.replace(r#""type":"preheat""#, r#""type":"sync""#))
                .contains("job type `sync`")
        );
        assert!(
            invalid(HARBOR_BODY.replace(r#""type":"image""#, r#""type":"file""#))
                .contains("preheat type `file`")
        );
        assert!(invalid(HARBOR_BODY.replace("/manifests/1.25", "/blobs/x"))
            .contains("not a manifest URL"));
        assert!(invalid(HARBOR_BODY.replace("https://", "ftp://")).contains("scheme"));
        assert!(
            invalid(HARBOR_BODY.replace(r#""scope":"""#, r#""scope":"galaxy""#))
                .contains("scope `galaxy`")
        );
        assert!(
            invalid(HARBOR_BODY.replace(r#""timeout":0"#, r#""timeout":-1"#)).contains("negative")
        );
    }

    #[test]
    fn manifest_urls_by_digest_and_with_ports() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = manifest_image(&format!(
            "http://10.0.0.1:5000/v2/test/p2p/manifests/{digest}"
        ))
        .unwrap();
        assert_eq!(image.host(), "10.0.0.1:5000");
        assert_eq!(image.repository_name(), "test/p2p");
        assert_eq!(image.digest().unwrap().as_str(), digest);
        assert!(manifest_image("http://h/v2/r/manifests/sha256:nothex").is_err());
        assert!(manifest_image("http://h/v2//manifests/t").is_err());
    }

    /// The JSON Harbor's driver reads: every field it unmarshals, with the types Go wants.
    #[test]
    fn job_views_have_the_fields_harbor_reads() {
        let jobs = Jobs::default();
        let job = jobs.create("r/a:1".into()).unwrap();
        let pending = serde_json::to_value(JobView::of(&job, "node-a", "10.0.0.2")).unwrap();
        assert_eq!(pending["id"], 1);
        assert_eq!(pending["state"], "PENDING");
        assert!(pending["created_at"].as_str().unwrap().ends_with('Z'));
        assert!(humantime::parse_rfc3339(pending["updated_at"].as_str().unwrap()).is_ok());
        assert_eq!(pending["result"]["job_states"], serde_json::json!([]));

        let blobs = vec![
            BlobOutcome {
                url: "http://h/v2/r/blobs/sha256:1".into(),
                node: None,
                failure: None,
            },
            BlobOutcome {
                url: "http://h/v2/r/blobs/sha256:2".into(),
                node: Some("10.0.0.3:7420".parse().unwrap()),
                failure: Some("status 404".into()),
            },
        ];
        assert!(jobs.finish(job.id, None, blobs));
        let done =
            serde_json::to_value(JobView::of(&jobs.get(1).unwrap(), "node-a", "10.0.0.2")).unwrap();
        assert_eq!(done["state"], "SUCCESS");
        let state = &done["result"]["job_states"][0];
        assert_eq!(state["error"], "");
        let result = &state["results"][0];
        assert_eq!(result["scheduler_cluster_id"], CLUSTER_ID);
        assert_eq!(
            result["success_tasks"][0],
            serde_json::json!({"url": "http://h/v2/r/blobs/sha256:1", "hostname": "node-a", "ip": "10.0.0.2"})
        );
        assert_eq!(result["failure_tasks"][0]["description"], "status 404");
        assert_eq!(result["failure_tasks"][0]["ip"], "10.0.0.3");

        let failed = jobs.create("r/b:1".into()).unwrap();
        assert!(jobs.finish(failed.id, Some("manifest unknown".into()), Vec::new()));
        let failed =
            serde_json::to_value(JobView::of(&jobs.get(failed.id).unwrap(), "n", "i")).unwrap();
        assert_eq!(failed["state"], "FAILURE");
        assert_eq!(
            failed["result"]["job_states"][0]["error"],
            "manifest unknown"
        );
    }
}
