//! Against the real distribution registry (Debian's `docker-registry`), when installed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shoal_config::Config;
use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};

const BINARY: &str = "/usr/bin/docker-registry";

/// A registry process on a loopback address of its own, killed when dropped.
struct Registry {
    child: Child,
    host: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry, or `None` (said loudly) when it is not installed; under `CI=true` it must be.
async fn start_registry(dir: &std::path::Path) -> Option<Registry> {
    if !std::path::Path::new(BINARY).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{BINARY} must be installed under CI=true"
        );
        eprintln!("SKIP: {BINARY} is not installed");
        return None;
    }
    // An address no other test's server has (this process's id picks it) and a fixed port:
    // picking a free port and binding it later races with every other socket on the host.
    let pid = std::process::id();
    let host = format!("127.101.{}.{}:5000", (pid >> 8) % 256, (pid % 256).max(1));
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {host}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    let child = Command::new(BINARY)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut registry = Registry { child, host };
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(status) = registry.child.try_wait().unwrap() {
            panic!("docker-registry on {} exited: {status}", registry.host);
        }
        let url = format!("http://{}/v2/", registry.host);
        if http.get(&url).send().await.is_ok() {
            return Some(registry);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "docker-registry did not come up on {} within 30 s",
        registry.host
    );
}

/// Monolithic OCI upload: open a session, then PUT the bytes with their digest.
async fn push_blob(host: &str, repository: &str, data: &[u8]) -> Digest {
    let http = reqwest::Client::new();
    let digest = Digest::of(data);
    let started = http
        .post(format!("http://{host}/v2/{repository}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    let mut url = reqwest::Url::parse(&format!("http://{host}"))
        .unwrap()
        .join(&location)
        .unwrap();
    url.query_pairs_mut().append_pair("digest", digest.as_str());
    let put = http
        .put(url)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.status(),
        201,
        "{}",
        put.text().await.unwrap_or_default()
    );
    digest
}

#[tokio::test]
async fn reads_blobs_and_manifests_from_the_real_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(registry) = start_registry(dir.path()).await else {
        return;
    };
    let host = registry.host.clone();
    let layer: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let config_json =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer_digest = push_blob(&host, "team/app", &layer).await;
    let config_digest = push_blob(&host, "team/app", config_json).await;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        config_json.len(),
        layer.len()
    );
    let put = reqwest::Client::new()
        .put(format!("http://{host}/v2/team/app/manifests/v1"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    let config = Config::parse(&format!(
        "root = \"{}\"\n[cache]\nblock_size = \"64KiB\"\n[registry]\ndocker_config = \"{}\"\n\
         [registry.hosts.\"{host}\"]\nplain_http = true\n",
        dir.path().join("shoal").display(),
        dir.path().join("none.json").display()
    ))
    .unwrap();
    let fetcher = Fetcher::new(&config).unwrap();
    let image = ImageRef::parse(&format!("{host}/team/app:v1")).unwrap();

    let fetched = fetcher.registry().get_manifest(&image).await.unwrap();
    assert_eq!(&fetched.bytes[..], manifest.as_bytes());
    assert_eq!(
        fetched.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(fetched.digest, Digest::of(manifest.as_bytes()));

    let config_blob = BlobRef::new(image.clone(), config_digest, config_json.len() as u64);
    let bytes = fetcher.registry().get_blob(&config_blob).await.unwrap();
    assert_eq!(&bytes[..], &config_json[..]);

    let layer_blob = BlobRef::new(image, layer_digest, layer.len() as u64);
    // A mounted layer pins its blob: the blocks its reads touched are then filled whole.
    fetcher.cache().pin(&layer_blob.digest);
    let bytes = fetcher.read(&layer_blob, 70_000..250_000).await.unwrap();
    assert_eq!(&bytes[..], &layer[70_000..250_000]);
    let tail = fetcher.read(&layer_blob, 299_000..300_000).await.unwrap();
    assert_eq!(&tail[..], &layer[299_000..]);
    // Reads return before their bytes are cached, and fetch only those bytes; the rest of
    // the blocks they touched is filled in the background.
    fetcher.settled().await;
    assert!(fetcher.read_cached(&layer_blob, 70_000..250_000).is_some());
    fetcher.filled().await;
    assert!(fetcher.read_cached(&layer_blob, 65_536..262_144).is_some());
}
