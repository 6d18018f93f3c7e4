//! The preheat API served for real on 127.0.0.1, against a registry that is not there: status
//! codes, the caller's credential, and a job that ends in FAILURE with its reason.

use std::time::Duration;

use super::PreheatService;

const TOKEN: &str = "t0ken";

async fn service(dir: &std::path::Path) -> PreheatService {
    let config = shoal_config::Config::parse(&format!(
        "root = \"{}\"\n[registry]\nretries = 0\ntimeout_secs = 2\ndeadline_secs = 5\n\
         [registry.hosts.\"127.0.0.1:9\"]\nplain_http = true\n\
         [preheat]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
        dir.display()
    ))
    .unwrap();
    let fetcher = shoal_fetcher::Fetcher::new(&config).unwrap();
    PreheatService::start(config.preheat.as_ref().unwrap(), fetcher)
        .await
        .unwrap()
}

fn job(url: &str) -> serde_json::Value {
    serde_json::json!({"type": "preheat", "args": {"type": "image", "url": url, "tag": "",
        "filtered_query_params": "", "headers": {}, "scope": "", "concurrent_count": 0,
        "timeout": 0}, "scheduler_cluster_ids": null})
}

#[tokio::test]
async fn the_api_answers_as_harbor_expects_and_a_failed_job_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let service = service(dir.path()).await;
    let base = format!("http://{}", service.address);
    let http = reqwest::Client::new();
    let jobs = format!("{base}/oapi/v1/jobs");

    // Health needs no credential.
    let health = http.get(format!("{base}/healthy")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Everything else does.
    let refused = http
        .post(&jobs)
        .json(&job("http://127.0.0.1:9/v2/a/manifests/1"));
    let refused = refused.send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    let wrong = http
        .get(format!("{jobs}/1"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let post = |body: Vec<u8>| {
        http.post(&jobs)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let message = |body: &[u8]| -> String {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap();
        value["message"].as_str().unwrap().to_owned()
    };
    let bad = post(b"{not json".to_vec()).await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(message(&bad.bytes().await.unwrap()).starts_with("parse job"));
    let file = job("http://127.0.0.1:9/v2/a/manifests/1")
        .to_string()
        .replace("\"image\"", "\"file\"");
    let file = post(file.into_bytes()).await.unwrap();
    assert_eq!(file.status(), 400);
    assert!(message(&file.bytes().await.unwrap()).contains("preheat type `file`"));
    let huge = post(vec![b' '; 100 << 10]).await.unwrap();
    assert_eq!(huge.status(), 413);
    let put = http.put(&jobs).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(put.status(), 405);
    let unknown = http
        .get(format!("{jobs}/999"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A job whose registry does not answer: PENDING, then FAILURE naming the manifest.
    let created = post(
        job("http://127.0.0.1:9/v2/team/app/manifests/1.0")
            .to_string()
            .into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 200);
    let created: serde_json::Value = created.json().await.unwrap();
    assert_eq!(created["state"], "PENDING");
    let id = created["id"].as_u64().unwrap();
    let mut ended = None;
    for _ in 0..600 {
        let job: serde_json::Value = http
            .get(format!("{jobs}/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] != "PENDING" {
            ended = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = ended.expect("the job ended within a minute");
    assert_eq!(ended["state"], "FAILURE");
    let error = ended["result"]["job_states"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("fetch the manifest of 127.0.0.1:9/team/app:1.0"),
        "{error}"
    );
}
