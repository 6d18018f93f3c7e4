//! What a lazy pull must never do with bad input: a chunk tampered in the registry never
//! reaches a container, a wrong TOC digest annotation falls back to a download, and registry
//! failures during lazy reads become bounded I/O errors.

use super::*;

/// `(offset, end)` in the blob of the first chunk of `name`, from the eStargz TOC read with
/// gzip and tar (independently of Shoal): the gzip member holding it ends where the next begins.
fn chunk_range(blob: &Path, name: &str) -> Result<(u64, u64)> {
    let script = format!(
        "gzip -dc '{}' 2>/dev/null | tar -xOf - stargz.index.json",
        blob.display()
    );
    let out = process::run(Command::new("sh").arg("-c").arg(script), TOOL_TIMEOUT)?;
    let toc: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parse the TOC: {out}"))?;
    let offsets: Vec<(&str, u64)> = toc["entries"]
        .as_array()
        .context("TOC without entries")?
        .iter()
        .filter_map(|entry| Some((entry["name"].as_str()?, entry["offset"].as_u64()?)))
        .filter(|(_, offset)| *offset > 0)
        .collect();
    let start = offsets
        .iter()
        .find(|(entry, _)| *entry == name)
        .map(|(_, offset)| *offset)
        .with_context(|| format!("{name} not in the TOC: {toc}"))?;
    let end = offsets
        .iter()
        .map(|(_, offset)| *offset)
        .filter(|offset| *offset > start)
        .min()
        .with_context(|| format!("nothing follows {name} in the TOC"))?;
    Ok((start, end))
}

/// Flips `len` bytes at `offset` of the file at `path`.
fn corrupt(path: &Path, offset: u64, len: usize) -> Result<()> {
    let mut bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let start = usize::try_from(offset)?;
    let region = bytes
        .get_mut(start..start + len)
        .context("corruption beyond the end of the blob")?;
    for byte in region {
        *byte ^= 0xff;
    }
    fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

#[test]
fn a_chunk_tampered_in_the_registry_never_reaches_a_container() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        let (layers, expected) = data_image(&[
            ("a-victim", 3 << 20),
            ("b-fine", 1 << 20),
            ("c-tail", 2 << 20),
        ])?;
        let image = stack.publish(fixture, "tamper", &layers)?;
        let out = stack.rpull(&image.estargz)?;
        ensure_all_lazy(&out, 2)?;

        // The TOC is verified and mounted; now the registry's copy of a chunk goes bad.
        let blob = stack.registry.blob_path(&image.layers[1].digest)?;
        let (start, end) = chunk_range(&blob, "data/a-victim")?;
        corrupt(&blob, start + (end - start) / 2, 64)?;

        let out = stack.run(
            &image.estargz,
            "victim",
            "sha256sum /data/a-victim; echo victim-rc=$?; \
             sha256sum /data/b-fine /data/c-tail /etc/greeting; echo fine-rc=$?",
        )?;
        let got = sums(&out);
        anyhow::ensure!(
            !got.contains_key("/data/a-victim") && !out.contains("victim-rc=0"),
            "the tampered file was read: {out}"
        );
        anyhow::ensure!(out.contains("fine-rc=0"), "other files failed: {out}");
        for path in ["/data/b-fine", "/data/c-tail"] {
            anyhow::ensure!(got.get(path) == expected.get(path), "{path}: {out}");
        }
        anyhow::ensure!(
            got.get("/etc/greeting") == Some(&sha256_hex(b"hello from shoal\n")),
            "/etc/greeting: {out}"
        );
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.contains("failed verification"),
            "the daemon log does not report the bad chunk"
        );
        Ok(())
    });
}

#[test]
fn a_wrong_toc_digest_annotation_falls_back_to_a_download() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        let (layers, mut expected) = data_image(&[("payload", 2 << 20)])?;
        let image = stack.publish(fixture, "wrongtoc", &layers)?;

        // The same image with the top layer's toc.digest replaced, pushed under another tag.
        let copy = fixture.path("wrongtoc-dir");
        let mut pull = Command::new("skopeo");
        pull.args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{}", image.estargz))
            .arg(format!("dir:{}", copy.display()));
        process::run(&mut pull, TOOL_TIMEOUT)?;
        let manifest_path = copy.join("manifest.json");
        let mut manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path)?)?;
        let wrong = format!("sha256:{}", sha256_hex(b"not the TOC"));
        manifest["layers"][1]["annotations"][TOC_DIGEST] = wrong.into();
        fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
        let reference = format!("{}/test/wrongtoc:bad-toc", stack.registry.host());
        let mut push = Command::new("skopeo");
        push.args(["copy", "--dest-tls-verify=false"])
            .arg(format!("dir:{}", copy.display()))
            .arg(format!("docker://{reference}"));
        process::run(&mut push, TOOL_TIMEOUT)?;

        // The pull completes, but --require-lazy makes it fail, naming the reason the
        // daemon gave (carried back on the snapshot's label through containerd).
        let out = match stack.rpull_with(&["--require-lazy"], &reference) {
            Ok(out) => anyhow::bail!("rpull --require-lazy succeeded: {out}"),
            Err(failed) => format!("{failed:#}"),
        };
        anyhow::ensure!(
            out.contains("--require-lazy: 1 lazily mountable layers were downloaded"),
            "{out}"
        );
        let line = |position: usize| -> Result<&str> {
            out.lines()
                .find(|line| line.starts_with(&format!("layer {position}/2 ")))
                .with_context(|| format!("no line for layer {position}: {out}"))
        };
        anyhow::ensure!(line(1)?.contains(" lazy"), "bottom layer: {out}");
        let top = line(2)?;
        anyhow::ensure!(
            top.contains("fetched")
                && top.contains("applied")
                && top.contains("(not lazy: index_digest_mismatch: TOC digest differs"),
            "top layer: {out}"
        );
        anyhow::ensure!(
            out.contains("2 layers, 1 lazy, 1 fetched"),
            "summary: {out}"
        );

        expected.insert("/etc/greeting".into(), sha256_hex(b"hello from shoal\n"));
        ensure_sums(&stack, &reference, "fallback", &expected)?;
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.contains("lazy mount failed") && log.contains("TOC digest differs"),
            "the daemon log does not say why the layer was downloaded"
        );
        Ok(())
    });
}

/// Reads `path` in a new container under a fault: the read must fail, printing no hash.
/// Returns how long the read took, timed inside the container (to the second), so that
/// creating the container on a loaded machine does not count.
fn ensure_read_fails(stack: &Stack, reference: &str, id: &str, path: &str) -> Result<Duration> {
    let out = stack.run(
        reference,
        id,
        &format!("t0=$(date +%s); sha256sum {path}; echo rc=$? took=$(( $(date +%s) - t0 ))"),
    )?;
    anyhow::ensure!(
        sums(&out).is_empty() && out.contains("rc=") && !out.contains("rc=0"),
        "{path} was read despite the fault: {out}"
    );
    let took = out
        .split_once("took=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|secs| secs.parse().ok())
        .with_context(|| format!("the container did not say how long the read took: {out}"))?;
    Ok(Duration::from_secs(took))
}

#[test]
fn registry_failures_during_lazy_reads_are_bounded_io_errors() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "timeout_secs = 2\nretries = 1\n")?;
        let (layers, expected) = data_image(&[
            ("cold-a", 3 << 20),
            ("cold-b", 3 << 20),
            ("warm", 1 << 20),
            ("z-tail", 2 << 20),
        ])?;
        let image = stack.publish(fixture, "faults", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        let warm: BTreeMap<String, String> = expected
            .iter()
            .filter(|(path, _)| path.ends_with("/warm"))
            .map(|(path, hash)| (path.clone(), hash.clone()))
            .collect();
        ensure_sums(&stack, &image.estargz, "warm-up", &warm)?;

        // A limit well above 2 attempts of 2 s each, well below a hang.
        let limit = Duration::from_secs(30);
        let proxy = stack.registry.proxy();
        proxy.inject("/blobs/", Fault::Status(500));
        let took = ensure_read_fails(&stack, &image.estargz, "under-500", "/data/cold-a")?;
        eprintln!("read under HTTP 500s failed after {took:?}");
        anyhow::ensure!(took < limit, "the failing read took {took:?}");

        proxy.inject("/blobs/", Fault::Stall);
        let took = ensure_read_fails(&stack, &image.estargz, "stalled", "/data/cold-b")?;
        eprintln!("read against a stalled registry failed after {took:?}");
        anyhow::ensure!(took < limit, "the stalled read took {took:?}");
        let faulted: u64 = proxy.stats().values().map(|stats| stats.faulted).sum();
        anyhow::ensure!(
            faulted >= 2,
            "the faults were not hit: {:#?}",
            proxy.stats()
        );

        // Still stalled: the daemon answers, and what it holds still reads.
        let socket = stack.daemon.socket().to_string_lossy().into_owned();
        let mut status = Command::new(binary::cli()?);
        status.args(["--socket", &socket, "status"]);
        let status = process::run(&mut status, Duration::from_secs(30))?;
        anyhow::ensure!(status.contains("running"), "shoal status: {status}");
        ensure_sums(&stack, &image.estargz, "warm-again", &warm)?;

        // And once the registry is back, the files that failed read correctly.
        proxy.clear_faults();
        ensure_sums(&stack, &image.estargz, "recovered", &expected)?;
        Ok(())
    });
}
