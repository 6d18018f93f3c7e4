//! The registry client against scripted HTTP servers on 127.0.0.1.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use shoal_fetcher::{
    BlobRef, CredentialsError, Digest, HttpFailure, ImageRef, RegistryClient, RegistryError,
};
use support::{config, content, Reply, Request, TestServer};

fn blob_on(host: &str, data: &[u8]) -> BlobRef {
    BlobRef::new(
        ImageRef::repository(host, "team/app").unwrap(),
        Digest::of(data),
        data.len() as u64,
    )
}

fn client(root: &std::path::Path, retries: u32, hosts: &[(&str, &str)]) -> RegistryClient {
    RegistryClient::new(&config(root, retries, hosts).registry).unwrap()
}

#[tokio::test]
async fn range_reads_return_exactly_the_asked_bytes() {
    let data = Arc::new(content(10_000));
    let served = data.clone();
    let server = TestServer::start(move |request| Reply::blob(request, &served)).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &data);

    let bytes = client.get_blob_range(&blob, 100..5_000).await.unwrap();
    assert_eq!(&bytes[..], &data[100..5_000]);
    let request = &server.requests()[0];
    assert_eq!(request.header("range"), Some("bytes=100-4999"));
    assert_eq!(
        request.path(),
        format!("/v2/team/app/blobs/{}", blob.digest)
    );

    let whole = client.get_blob(&blob).await.unwrap();
    assert_eq!(&whole[..], &data[..]);
    assert!(matches!(
        client.get_blob_range(&blob, 9_000..10_001).await,
        Err(RegistryError::RangeOutOfBounds { .. })
    ));
}

#[tokio::test]
async fn a_server_ignoring_range_is_sliced() {
    let data = Arc::new(content(50_000));
    let served = data.clone();
    let server = TestServer::start(move |_| Reply::ok(served.to_vec())).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &data);
    let bytes = client.get_blob_range(&blob, 30_000..30_100).await.unwrap();
    assert_eq!(&bytes[..], &data[30_000..30_100]);
}

#[tokio::test]
async fn a_wrong_content_range_is_an_error() {
    let data = content(1_000);
    let server = TestServer::start(move |_| {
        Reply {
            body: data[0..10].to_vec(),
            ..Reply::status(206)
        }
        .header("Content-Range", "bytes 0-9/1000")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 2, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &content(1_000));
    let error = client.get_blob_range(&blob, 10..20).await.unwrap_err();
    assert!(
        matches!(
            &error,
            RegistryError::FetchRange {
                cause: HttpFailure::ContentRange { .. },
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(server.count(), 1, "a protocol error is not retried");
}

#[tokio::test]
async fn bearer_tokens_are_fetched_cached_and_renewed_on_expiry() {
    let issued = Arc::new(AtomicUsize::new(0));
    let issued_by_auth = issued.clone();
    let auth = TestServer::start(move |request| {
        assert!(request
            .target
            .contains("scope=repository%3Ateam%2Fapp%3Apull"));
        assert!(request.target.contains("service=test-registry"));
        let n = issued_by_auth.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::ok(format!(r#"{{"token": "tok-{n}", "expires_in": 300}}"#))
    })
    .await;
    let realm = format!("http://{}/token", auth.host());
    // Tokens numbered below `oldest_valid` have expired on the registry's side.
    let oldest_valid = Arc::new(AtomicUsize::new(1));
    let registry_oldest = oldest_valid.clone();
    let data = content(100);
    let registry = TestServer::start(move |request| {
        let token = request
            .header("authorization")
            .and_then(|value| value.strip_prefix("Bearer tok-"))
            .and_then(|n| n.parse::<usize>().ok());
        if token.is_some_and(|n| n >= registry_oldest.load(Ordering::SeqCst)) {
            return Reply::blob(request, &data);
        }
        Reply::status(401).header(
            "WWW-Authenticate",
            format!(
                r#"Bearer realm="{realm}",service="test-registry",scope="repository:team/app:pull""#
            ),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&registry.host(), "")]);
    let blob = blob_on(&registry.host(), &content(100));

    client.get_blob_range(&blob, 0..10).await.unwrap();
    assert_eq!(auth.count(), 1);
    assert_eq!(registry.count(), 2, "a 401, then the retry with the token");

    client.get_blob_range(&blob, 10..20).await.unwrap();
    assert_eq!(auth.count(), 1, "the token is cached");
    assert_eq!(registry.count(), 3);

    oldest_valid.store(2, Ordering::SeqCst);
    client.get_blob_range(&blob, 20..30).await.unwrap();
    assert_eq!(
        auth.count(),
        2,
        "a 401 with a cached token fetches a new one"
    );
    let last = registry.requests().pop().unwrap();
    assert_eq!(last.header("authorization"), Some("Bearer tok-2"));
}

#[tokio::test]
async fn readers_meeting_an_expired_token_together_fetch_one_new_token() {
    let issued = Arc::new(AtomicUsize::new(0));
    let issued_by_auth = issued.clone();
    let auth = TestServer::start(move |_| {
        let n = issued_by_auth.fetch_add(1, Ordering::SeqCst) + 1;
        // Slow enough that every reader's 401 arrives while the first refresh runs.
        std::thread::sleep(Duration::from_millis(200));
        Reply::ok(format!(r#"{{"token": "tok-{n}", "expires_in": 300}}"#))
    })
    .await;
    let realm = format!("http://{}/token", auth.host());
    let data = content(1000);
    let registry = TestServer::start(move |request| {
        if request.header("authorization").is_some() {
            return Reply::blob(request, &data);
        }
        Reply::status(401).header(
            "WWW-Authenticate",
            format!(r#"Bearer realm="{realm}",service="s",scope="repository:team/app:pull""#),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&registry.host(), "")]);
    let blob = blob_on(&registry.host(), &content(1000));
    let reads = (0..8u64).map(|i| {
        let (client, blob) = (client.clone(), blob.clone());
        tokio::spawn(async move { client.get_blob_range(&blob, i * 100..i * 100 + 100).await })
    });
    for read in futures::future::join_all(reads).await {
        read.unwrap().unwrap();
    }
    assert_eq!(auth.count(), 1, "eight readers, one token");
}

#[tokio::test]
async fn refused_credentials_fail_after_one_reauth() {
    let auth = TestServer::start(|_| Reply::ok(r#"{"access_token": "never-good"}"#)).await;
    let realm = format!("http://{}/token", auth.host());
    let registry = TestServer::start(move |_| {
        Reply::status(401).header("WWW-Authenticate", format!(r#"Bearer realm="{realm}""#))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_docker_config(dir.path(), &registry.host(), "alice:wrong");
    let client = client(dir.path(), 3, &[(&registry.host(), "")]);
    let blob = blob_on(&registry.host(), &content(100));
    let error = client.get_blob(&blob).await.unwrap_err();
    assert!(
        matches!(
            error,
            RegistryError::FetchBlob {
                cause: HttpFailure::Unauthorized,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("credentials rejected"),
        "{error}"
    );
    assert_eq!(registry.count(), 2);
}

fn write_docker_config(dir: &std::path::Path, host: &str, user_password: &str) {
    std::fs::write(
        dir.join("docker-config.json"),
        format!(
            r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
            base64::engine::general_purpose::STANDARD.encode(user_password)
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn a_registry_wanting_credentials_when_none_are_found_says_so_and_where_shoal_looked() {
    // Basic: nothing can be sent at all.
    let basic = TestServer::start(|_| {
        Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#)
    })
    .await;
    // Bearer: the token server hands out anonymous tokens, which the registry refuses.
    let auth = TestServer::start(|_| Reply::ok(r#"{"token": "anonymous"}"#)).await;
    let realm = format!("http://{}/token", auth.host());
    let bearer = TestServer::start(move |_| {
        Reply::status(401).header("WWW-Authenticate", format!(r#"Bearer realm="{realm}""#))
    })
    .await;
    // Bearer whose token server itself wants credentials.
    let strict_auth = TestServer::start(|_| Reply::status(401)).await;
    let strict_realm = format!("http://{}/token", strict_auth.host());
    let strict = TestServer::start(move |_| {
        Reply::status(401).header(
            "WWW-Authenticate",
            format!(r#"Bearer realm="{strict_realm}""#),
        )
    })
    .await;
    for server in [&basic, &bearer, &strict] {
        let dir = tempfile::tempdir().unwrap();
        let client = client(dir.path(), 0, &[(&server.host(), "")]);
        let error = client
            .get_blob(&blob_on(&server.host(), &content(100)))
            .await
            .unwrap_err();
        let RegistryError::FetchBlob {
            cause: HttpFailure::NoCredentials { searched },
            ..
        } = &error
        else {
            panic!("{}: {error}", server.host());
        };
        let (host, looked_in) = (&searched.host, &searched.looked_in);
        assert_eq!(host, &server.host());
        let config = dir.path().join("docker-config.json");
        assert!(
            looked_in.contains(&format!("{} (absent)", config.display())),
            "{error}"
        );
        assert!(error.to_string().contains("none were found"), "{error}");
    }

    // A docker config without an entry for the host says that instead.
    let dir = tempfile::tempdir().unwrap();
    write_docker_config(dir.path(), "elsewhere.example", "alice:s3cret");
    let client = client(dir.path(), 0, &[(&basic.host(), "")]);
    let error = client
        .get_blob(&blob_on(&basic.host(), &content(100)))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("(no entry for {})", basic.host())),
        "{error}"
    );
}

#[tokio::test]
async fn a_plain_http_registry_asked_over_https_names_the_setting() {
    // What an HTTP server answers to a TLS ClientHello, as Go's (the registry's) does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let answering = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut hello = [0u8; 512];
            let _ = stream.read(&mut hello).await;
            let _ = stream
                .write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                .await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // No `plain_http` for the host: the client speaks TLS to a plain HTTP server.
    let client = client(dir.path(), 0, &[]);
    let error = client
        .get_blob(&blob_on(&host, &content(100)))
        .await
        .unwrap_err();
    answering.abort();
    let expected = host;
    let RegistryError::FetchBlob {
        cause: HttpFailure::PlainHttp { host },
        ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(host, &expected);
    let message = error.to_string();
    assert!(
        message.contains("plain_http = true")
            && message.contains(&format!("[registry.hosts.\"{expected}\"]")),
        "{message}"
    );
}

#[tokio::test]
async fn basic_auth_comes_from_docker_config() {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let body = manifest.clone();
    let server = TestServer::start(move |request| {
        if request.header("authorization") == Some(expected.as_str()) {
            Reply::ok(body.clone()).header(
                "Content-Type",
                "application/vnd.oci.image.manifest.v1+json; x=y",
            )
        } else {
            Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docker-config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            server.host(),
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        ),
    )
    .unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let image = ImageRef::parse(&format!("{}/team/app:v1", server.host())).unwrap();

    let fetched = client.get_manifest(&image).await.unwrap();
    assert_eq!(&fetched.bytes[..], &manifest[..]);
    assert_eq!(
        fetched.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(fetched.digest, Digest::of(&manifest));
    let first = &server.requests()[0];
    assert_eq!(first.path(), "/v2/team/app/manifests/v1");
    assert!(first
        .header("accept")
        .unwrap()
        .contains("application/vnd.docker.distribution.manifest.list.v2+json"));

    // Basic credentials are sent up front once the registry asked for them.
    client.get_manifest(&image).await.unwrap();
    assert_eq!(server.count(), 3);

    let pinned = ImageRef::parse(&format!(
        "{}/team/app@{}",
        server.host(),
        Digest::of(b"something else")
    ))
    .unwrap();
    assert!(matches!(
        client.get_manifest(&pinned).await,
        Err(RegistryError::VerifyDigest { .. })
    ));
}

#[tokio::test]
async fn credentials_can_come_from_a_docker_credential_helper() {
    use std::os::unix::fs::PermissionsExt;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:from-helper")
    );
    let server = TestServer::start(move |request| {
        if request.header("authorization") == Some(expected.as_str()) {
            Reply::ok(br#"{"schemaVersion":2}"#.to_vec())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        } else {
            Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("docker-credential-fake");
    std::fs::write(
        &helper,
        "#!/bin/sh\nread server\nprintf '{\"Username\":\"robot\",\"Secret\":\"from-helper\"}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker_config = dir.path().join("docker-config.json");
    let image = ImageRef::parse(&format!("{}/team/app:v1", server.host())).unwrap();
    let client_with = |helper: &str| {
        std::fs::write(
            &docker_config,
            format!(r#"{{"credHelpers": {{"{}": "{helper}"}}}}"#, server.host()),
        )
        .unwrap();
        let config = config(dir.path(), 0, &[(&server.host(), "")]).registry;
        let credentials = shoal_fetcher::Credentials::load(&config.docker_config)
            .unwrap()
            .searching(vec![dir.path().to_owned()]);
        RegistryClient::with_credentials(&config, credentials).unwrap()
    };

    client_with("fake").get_manifest(&image).await.unwrap();
    // A helper that is not installed is named in the error, not taken for "no credentials".
    let error = client_with("absent")
        .get_manifest(&image)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RegistryError::Credentials(CredentialsError::CredentialHelper { helper, .. }) if helper == "absent"),
        "{error}"
    );
}

#[tokio::test]
async fn redirects_never_carry_the_registry_authorization_elsewhere() {
    let data = Arc::new(content(3_000));
    let stored = data.clone();
    let storage = TestServer::start(move |request| Reply::blob(request, &stored)).await;
    let location = format!("http://{}/signed/blob?sig=abc", storage.host());
    let registry = TestServer::start(move |request| {
        if request.header("authorization").is_none() {
            return Reply::status(401).header("WWW-Authenticate", r#"Basic realm="r""#);
        }
        Reply::status(307).header("Location", location.clone())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docker-config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"username": "u", "password": "p"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let client = client(dir.path(), 0, &[(&registry.host(), "")]);
    let blob = blob_on(&registry.host(), &data);

    let bytes = client.get_blob_range(&blob, 1_000..2_000).await.unwrap();
    assert_eq!(&bytes[..], &data[1_000..2_000]);
    assert!(registry.requests()[1].header("authorization").is_some());
    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 1);
    assert_eq!(at_storage[0].target, "/signed/blob?sig=abc");
    assert_eq!(at_storage[0].header("authorization"), None);
    assert_eq!(at_storage[0].header("range"), Some("bytes=1000-1999"));
}

#[tokio::test]
async fn transient_errors_are_retried_until_success() {
    let data = Arc::new(content(100));
    let served = data.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = TestServer::start(move |request: &Request| {
        if seen.fetch_add(1, Ordering::SeqCst) < 2 {
            Reply::status(500)
        } else {
            Reply::blob(request, &served)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 3, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &data);
    let bytes = client.get_blob_range(&blob, 0..50).await.unwrap();
    assert_eq!(&bytes[..], &data[..50]);
    assert_eq!(server.count(), 3);
}

#[tokio::test]
async fn retries_are_bounded_and_the_error_names_url_and_status() {
    let server = TestServer::start(|_| Reply::status(503)).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 2, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &content(100));
    let error = client.get_blob_range(&blob, 0..50).await.unwrap_err();
    assert_eq!(server.count(), 3, "one attempt and two retries");
    assert!(
        matches!(
            &error,
            RegistryError::FetchRange {
                cause: HttpFailure::Status { status: 503 },
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains(&server.host()), "{message}");
    assert!(message.contains("status 503"), "{message}");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = TestServer::start(|_| Reply::status(404)).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 4, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &content(100));
    assert!(client.get_blob(&blob).await.is_err());
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let data = Arc::new(content(100));
    let served = data.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = TestServer::start(move |request: &Request| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(429).header("Retry-After", "1")
        } else {
            Reply::blob(request, &served)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 1, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &data);
    let started = Instant::now();
    client.get_blob_range(&blob, 0..10).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn a_stalled_server_times_out() {
    let server = TestServer::start(|_| Reply::stall()).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &content(100));
    let started = Instant::now();
    let error = client.get_blob_range(&blob, 0..10).await.unwrap_err();
    assert!(
        matches!(
            error,
            RegistryError::FetchRange {
                cause: HttpFailure::TimedOut { .. },
                ..
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A registry that answers a range GET's headers, then never sends the body.
async fn stalling_body_server(data: Arc<Vec<u8>>) -> TestServer {
    TestServer::start(move |request| Reply::blob(request, &data).stalling_body()).await
}

#[tokio::test]
async fn a_body_stalled_after_its_headers_is_one_failed_attempt() {
    let data = Arc::new(content(10_000));
    let server = stalling_body_server(data.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // 2 s per attempt, 2 retries, the default 60 s deadline: the retries run out first.
    let client = client(dir.path(), 2, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), &data);
    let started = Instant::now();
    let error = client.get_blob_range(&blob, 0..4096).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            &error,
            RegistryError::FetchRange {
                cause: HttpFailure::TimedOut { after },
                ..
            } if *after == Duration::from_secs(2)
        ),
        "{error}"
    );
    assert_eq!(
        server.count(),
        3,
        "retries + 1 attempts, one per stalled body"
    );
    // 3 attempts of 2 s and two short backoffs, with room for a loaded machine.
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[tokio::test]
async fn a_request_ends_at_its_deadline_whatever_retries_remain() {
    let data = Arc::new(content(10_000));
    let server = stalling_body_server(data.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 4, &[(&server.host(), "")]);
    config.registry.deadline = Duration::from_secs(3);
    let client = RegistryClient::new(&config.registry).unwrap();
    let blob = blob_on(&server.host(), &data);
    let started = Instant::now();
    let error = client.get_blob_range(&blob, 0..4096).await.unwrap_err();
    let took = started.elapsed();
    // The first attempt takes its 2 s, the second what is left of the 3 s; 5 attempts of
    // 2 s each (10 s) would be what the retries alone allow.
    assert!(
        matches!(
            &error,
            RegistryError::FetchRange {
                cause: HttpFailure::Deadline { attempts: 2, .. },
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("deadline"), "{error}");
    assert_eq!(server.count(), 2);
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test]
async fn mirrors_are_tried_first_and_fall_through_on_error() {
    let data = Arc::new(content(100));
    let broken = TestServer::start(|_| Reply::status(404)).await;
    let served = data.clone();
    let mirror = TestServer::start(move |request| Reply::blob(request, &served)).await;
    let served = data.clone();
    let origin = TestServer::start(move |request| Reply::blob(request, &served)).await;
    let dir = tempfile::tempdir().unwrap();
    let mirrors = format!("mirrors = [\"{}\", \"{}\"]", broken.host(), mirror.host());
    let client = client(
        dir.path(),
        0,
        &[
            (&origin.host(), &mirrors),
            (&broken.host(), ""),
            (&mirror.host(), ""),
        ],
    );
    let blob = blob_on(&origin.host(), &data);
    let bytes = client.get_blob_range(&blob, 5..15).await.unwrap();
    assert_eq!(&bytes[..], &data[5..15]);
    assert_eq!((broken.count(), mirror.count(), origin.count()), (1, 1, 0));

    drop(mirror);
    let bytes = client.get_blob_range(&blob, 5..15).await.unwrap();
    assert_eq!(&bytes[..], &data[5..15]);
    assert_eq!(origin.count(), 1, "the registry itself is the last resort");
}

#[tokio::test]
async fn a_tampered_blob_fails_verification() {
    let server = TestServer::start(|_| Reply::ok(b"not the blob".to_vec())).await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let blob = blob_on(&server.host(), b"the blob!!!!");
    assert!(matches!(
        client.get_blob(&blob).await,
        Err(RegistryError::VerifyDigest { .. })
    ));
}

#[tokio::test]
async fn a_push_replaces_a_cached_pull_token_once_with_a_push_scoped_one() {
    let scopes = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let asked = scopes.clone();
    let auth = TestServer::start(move |request| {
        let pushing = request.target.contains("pull%2Cpush");
        let mut asked = asked.lock().unwrap();
        asked.push(request.target.clone());
        let kind = if pushing { "push" } else { "pull" };
        Reply::ok(format!(
            r#"{{"token": "{kind}-{}", "expires_in": 300}}"#,
            asked.len()
        ))
    })
    .await;
    let realm = format!("http://{}/token", auth.host());
    let data = content(100);
    let digest = Digest::of(&data);
    let registry = TestServer::start(move |request| {
        let token = request
            .header("authorization")
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let reading = request.method == "GET" || request.method == "HEAD";
        let allowed = token.starts_with("push-") || (reading && token.starts_with("pull-"));
        if !allowed {
            // Like a registry that names only what the last request needed to read.
            return Reply::status(401).header(
                "WWW-Authenticate",
                format!(r#"Bearer realm="{realm}",service="s",scope="repository:team/app:pull""#),
            );
        }
        match request.method.as_str() {
            "GET" => Reply::blob(request, &data),
            "HEAD" => Reply::status(404),
            "POST" => Reply::status(202).header("Location", "/v2/team/app/blobs/uploads/u1"),
            "PUT" => {
                Reply::status(201).header("Docker-Content-Digest", Digest::of(&data).to_string())
            }
            _ => Reply::status(405),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&registry.host(), "")]);
    let blob = blob_on(&registry.host(), &content(100));
    client.get_blob_range(&blob, 0..10).await.unwrap();

    let pushed = client
        .push_blob(
            &blob.image,
            &digest,
            100,
            &shoal_fetcher::BlobContent::Bytes(content(100).into()),
        )
        .await
        .unwrap();
    assert_eq!(pushed, shoal_fetcher::Pushed::Uploaded);
    let scopes = scopes.lock().unwrap().clone();
    assert_eq!(
        scopes.len(),
        2,
        "one pull token, then one push token: {scopes:?}"
    );
    assert!(
        !scopes[0].contains("push"),
        "reads ask only to pull: {scopes:?}"
    );
    assert!(
        scopes[1].contains("scope=repository%3Ateam%2Fapp%3Apull%2Cpush"),
        "{scopes:?}"
    );
    // The push token serves reads too: no third token.
    client.get_blob_range(&blob, 10..20).await.unwrap();
    assert_eq!(auth.count(), 2);
}

/// What peers build repository-scoped reads on: a repository is private once the registry
/// refused it anonymously and took the configured credential, the `Authorization` read with
/// is this node's proof, and another node's proof is checked with one HEAD carrying exactly
/// that value.
#[tokio::test]
async fn private_repositories_are_recognised_and_pull_proofs_checked() {
    let alice = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let data = Arc::new(content(4_000));
    let (served, wanted) = (data.clone(), alice.clone());
    let server = TestServer::start(move |request| {
        let private = request.path().starts_with("/v2/team/");
        if private && request.header("authorization") != Some(wanted.as_str()) {
            return Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#);
        }
        if request.method == "HEAD" {
            return Reply::status(200);
        }
        Reply::blob(request, &served)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docker-config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            server.host(),
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        ),
    )
    .unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let private = blob_on(&server.host(), &data);
    let public = BlobRef::new(
        ImageRef::repository(&server.host(), "open/app").unwrap(),
        private.digest.clone(),
        private.size,
    );

    client.get_blob_range(&public, 0..100).await.unwrap();
    assert!(!client.needs_credentials(&public.image));
    assert!(client.pull_authorization(&public.image).is_none());
    assert!(!client.needs_credentials(&private.image), "not read yet");

    client.get_blob_range(&private, 0..100).await.unwrap();
    assert!(client.needs_credentials(&private.image));
    assert_eq!(
        client.pull_authorization(&private.image).unwrap(),
        alice.as_str()
    );

    let before = server.count();
    let good = reqwest::header::HeaderValue::from_str(&alice).unwrap();
    let bad = reqwest::header::HeaderValue::from_static("Basic bWFsbG9yeTpndWVzcw==");
    assert!(client
        .may_pull(&private.image, &private.digest, &good)
        .await
        .unwrap());
    assert!(!client
        .may_pull(&private.image, &private.digest, &bad)
        .await
        .unwrap());
    let checks = &server.requests()[before..];
    assert_eq!(checks.len(), 2, "one HEAD per check, no retry with our own");
    assert!(checks.iter().all(|check| check.method == "HEAD"
        && check.path() == format!("/v2/team/app/blobs/{}", private.digest)));
    assert_eq!(
        checks[1].header("authorization"),
        Some("Basic bWFsbG9yeTpndWVzcw==")
    );
}

#[tokio::test]
async fn a_pull_secret_serves_its_repository_until_forgotten() {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("kubelet:from-secret")
    );
    let server = TestServer::start(move |request| {
        if request.header("authorization") == Some(expected.as_str()) {
            Reply::ok(br#"{"schemaVersion":2}"#.to_vec())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        } else {
            Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 0, &[(&server.host(), "")]).registry;
    let secrets = shoal_fetcher::PullSecrets::default();
    secrets.fed_by("the CRI proxy at /run/test/cri.sock".to_owned());
    let client = RegistryClient::with_pull_secrets(&config, secrets.clone()).unwrap();
    let image = ImageRef::parse(&format!("{}/team/app:v1", server.host())).unwrap();
    let no_credentials = |error: RegistryError| {
        let text = error.to_string();
        assert!(
            text.contains("none were found")
                && text.contains("/run/test/cri.sock")
                && text.contains("team/app"),
            "{text}"
        );
    };

    no_credentials(client.get_manifest(&image).await.unwrap_err());
    let credential = shoal_fetcher::Credential {
        username: "kubelet".into(),
        password: "from-secret".into(),
    };
    let _ = secrets.record(&image, credential.clone());
    client.get_manifest(&image).await.unwrap();
    // The manifest by digest, as a layer's lookup asks for it: the same repository.
    let pinned = ImageRef::parse(&format!(
        "{}/team/app@{}",
        server.host(),
        Digest::of(br#"{"schemaVersion":2}"#)
    ))
    .unwrap();
    client.get_manifest(&pinned).await.unwrap();
    // Another repository of the host is not the secret's.
    let other = ImageRef::parse(&format!("{}/team/other:v1", server.host())).unwrap();
    assert!(client.get_manifest(&other).await.is_err());
    // A client built by a reload shares the secrets.
    let reloaded =
        RegistryClient::with_pull_secrets(&config, client.pull_secrets().clone()).unwrap();
    reloaded.get_manifest(&image).await.unwrap();

    // Forgotten: the basic header cached for the repository goes with it.
    assert!(secrets.forget(&image));
    no_credentials(client.get_manifest(&image).await.unwrap_err());
    no_credentials(reloaded.get_manifest(&image).await.unwrap_err());
}

#[tokio::test]
async fn a_lent_authorization_reads_for_its_job_only_and_marks_the_repository_private() {
    let token = "Bearer a-pull-token-from-harbor";
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let server = TestServer::start(move |request| {
        if request.header("authorization") == Some(token) {
            Reply::ok(manifest.clone())
        } else {
            Reply::status(401).header("WWW-Authenticate", r#"Basic realm="registry""#)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let client = client(dir.path(), 0, &[(&server.host(), "")]);
    let image = ImageRef::parse(&format!("{}/team/app:v1", server.host())).unwrap();
    let other = ImageRef::parse(&format!("{}/team/other:v1", server.host())).unwrap();
    assert!(client.get_manifest(&image).await.is_err());

    let lent = client.lend_authorization(
        &image,
        reqwest::header::HeaderValue::from_static(token),
        Duration::from_secs(60),
    );
    client.get_manifest(&image).await.unwrap();
    // Read with a credential: its blobs are private, gated between peers.
    assert!(client.needs_credentials(&image));
    // Only for the repository it was lent for.
    assert!(client.get_manifest(&other).await.is_err());

    drop(lent);
    assert!(client.get_manifest(&image).await.is_err());
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| r.header("authorization") == Some(token))
            .count()
            == 1,
        "the token went out only while lent"
    );
}
