//! `shoal convert --optimize` against the real registry on loopback, runc and fanotify: a
//! two-layer image whose entrypoint reads a file of the upper layer, a layer that has no
//! entries for that file's parent directories (they live only in the lower layer, the case the
//! reference optimizer cannot prioritize). The files read lead their layers before
//! `.prefetch.landmark`, the image mounts lazily under Shoal and runs, a command that hangs is
//! stopped at the timeout, one that fails pushes nothing, and no work files or mounts stay.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::convert::{layer_digests, layout_blob, layout_manifest, sha256_hex, skopeo};
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::process;
use crate::registry::Registry;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const GREETING: &str = "hello from the upper layer";
const ENTRYPOINT: [&str; 3] = ["/bin/sh", "-c", "cat /app/data/greeting"];

/// A tar entry: name (a directory's ends in `/`), file data, symlink target.
type Entry<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

/// A gzip'd layer tar of `entries`.
fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data, link) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        if let Some(target) = link {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder.append_link(&mut header, name, target)?;
        } else if name.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder.append_data(&mut header, name, &[][..])?;
        } else {
            let data = data.unwrap_or_default();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o755);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, name, data)?;
        }
    }
    let tar = builder.into_inner()?;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&tar)?;
    Ok(gzip.finish()?)
}

/// The test image as an OCI layout: busybox and the directories below, one file on top.
fn write_image(dir: &Path) -> Result<()> {
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    let filler = vec![7u8; 256 << 10];
    let lower = layer(&[
        ("bin/", None, None),
        ("bin/busybox", Some(&busybox), None),
        ("bin/sh", None, Some("busybox")),
        ("bin/cat", None, Some("busybox")),
        ("bin/sleep", None, Some("busybox")),
        ("bin/echo", None, Some("busybox")),
        ("app/", None, None),
        ("app/data/", None, None),
        ("app/data/lower-unread", Some(&filler), None),
        ("etc/", None, None),
        ("etc/passwd", Some(b"root:x:0:0:root:/root:/bin/sh\n"), None),
    ])?;
    // No `app/` or `app/data/` entries: the parents live only in the lower layer.
    let upper = layer(&[
        (
            "app/data/greeting",
            Some(format!("{GREETING}\n").as_bytes()),
            None,
        ),
        ("app/data/upper-unread", Some(&filler), None),
    ])?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8], media_type: &str| -> Result<Value> {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes)?;
        Ok(
            json!({"mediaType": media_type, "digest": format!("sha256:{hex}"),
                  "size": bytes.len()}),
        )
    };
    let gunzipped_digest = |blob: &[u8]| -> Result<String> {
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(blob), &mut tar)?;
        Ok(format!("sha256:{}", sha256_hex(&tar)))
    };
    let layer_type = "application/vnd.oci.image.layer.v1.tar+gzip";
    let layers = [put(&lower, layer_type)?, put(&upper, layer_type)?];
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ENTRYPOINT, "Env": ["PATH=/bin"], "WorkingDir": "/app"},
        "rootfs": {"type": "layers",
                   "diff_ids": [gunzipped_digest(&lower)?, gunzipped_digest(&upper)?]},
    });
    let config = put(
        config.to_string().as_bytes(),
        "application/vnd.oci.image.config.v1+json",
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers,
    });
    let manifest = put(
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    )?;
    let index = json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(dir.join("index.json"), index.to_string())?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// `shoal convert --plain-http --optimize <extra...> <source> <destination> [-- command]`,
/// with its work files in `tmp` (checked empty afterwards): stdout, or the error text.
fn convert_optimized(
    fixture: &Fixture,
    extra: &[&str],
    destination: &str,
    command: &[&str],
) -> Result<std::result::Result<String, String>> {
    let config = fixture.path("convert.toml");
    fs::write(&config, "")?;
    let tmp = fixture.mkdir("tmp")?;
    let layout = fixture.path("images/optimize");
    let mut run = Command::new(binary::cli()?);
    run.env("TMPDIR", &tmp)
        .arg("--config")
        .arg(&config)
        .args(["convert", "--plain-http", "--optimize"])
        .args(extra)
        .arg(format!("oci:{}", layout.display()))
        .arg(destination);
    if !command.is_empty() {
        run.arg("--").args(command);
    }
    let result = process::run(&mut run, TOOL_TIMEOUT).map_err(|e| format!("{e:#}"));
    let left: Vec<_> = fs::read_dir(&tmp)?.flatten().map(|e| e.path()).collect();
    anyhow::ensure!(left.is_empty(), "work files left behind: {left:?}");
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    anyhow::ensure!(
        !mounts.contains(&tmp.to_string_lossy().into_owned()),
        "a mount under {} stayed:\n{mounts}",
        tmp.display()
    );
    Ok(result)
}

/// Entry names of each layer of `reference` in blob order (what `tar tzf` lists).
fn layer_entries(fixture: &Fixture, reference: &str, name: &str) -> Result<Vec<Vec<String>>> {
    let copied = fixture.path(&format!("images/{name}"));
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:{name}", copied.display()),
    ])?;
    let mut layers = Vec::new();
    for digest in layer_digests(&layout_manifest(&copied)?)? {
        let mut command = Command::new("tar");
        command.arg("-tzf").arg(layout_blob(&copied, &digest));
        let listed = process::run(&mut command, TOOL_TIMEOUT)?;
        layers.push(
            listed
                .lines()
                .map(|l| l.trim_start_matches("./").to_owned())
                .collect(),
        );
    }
    Ok(layers)
}

/// Asserts that `read` come before `.prefetch.landmark` in `entries`, in this order, and
/// `unread` after it.
fn ensure_order(entries: &[String], read: &[&str], unread: &[&str]) -> Result<()> {
    let at = |name: &str| entries.iter().position(|e| e == name);
    let landmark = at(".prefetch.landmark").with_context(|| format!("no landmark: {entries:?}"))?;
    let mut previous = None;
    for name in read {
        let position = at(name).with_context(|| format!("{name} missing: {entries:?}"))?;
        anyhow::ensure!(
            position < landmark && previous < Some(position),
            "{name} is not prioritized in read order: {entries:?}"
        );
        previous = Some(position);
    }
    for name in unread {
        let position = at(name).with_context(|| format!("{name} missing: {entries:?}"))?;
        anyhow::ensure!(position > landmark, "{name} was prioritized: {entries:?}");
    }
    Ok(())
}

#[test]
fn optimized_image_prioritizes_what_the_entrypoint_reads_and_runs_lazily() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        write_image(&fixture.mkdir("images/optimize")?)?;
        let reference = format!("{}/test/optimize:opt", registry.host());
        let out = convert_optimized(fixture, &[], &reference, &[])?.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            out.contains(&format!(
                "optimize: ran {ENTRYPOINT:?} as 0:0 in /app: exited with status 0"
            )),
            "{out}"
        );
        anyhow::ensure!(
            out.contains("layer 2/2:") && out.contains(", 1 files prioritized"),
            "{out}"
        );

        let layers = layer_entries(fixture, &reference, "opt")?;
        anyhow::ensure!(layers.len() == 2, "{layers:?}");
        // (runc reads etc/passwd at start, as it does under containerd: not asserted.)
        ensure_order(&layers[0], &["bin/busybox"], &["app/data/lower-unread"])?;
        ensure_order(
            &layers[1],
            &["app/data/greeting"],
            &["app/data/upper-unread"],
        )?;
        // The upper layer still has no entries for the parents: nothing was made up.
        anyhow::ensure!(
            !layers[1].iter().any(|e| e == "app/" || e == "app/data/"),
            "upper layer: {:?}",
            layers[1]
        );

        // Shoal mounts the optimized layers lazily and the entrypoint runs.
        let daemon = Daemon::start_plain_http(fixture, &[&registry.host()])?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            ..containerd::Options::default()
        };
        let ctd = Containerd::start(fixture, &options)?;
        let pulled = crate::convert::rpull_in_fixture(fixture, &ctd, &reference)?;
        anyhow::ensure!(pulled.contains("2 layers, 2 lazy"), "rpull: {pulled}");
        let run = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "optimized",
        ])?;
        anyhow::ensure!(run.trim() == GREETING, "container printed {run:?}");
        Ok(())
    });
}

#[test]
fn optimize_stops_a_hanging_command_and_refuses_a_failing_one() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        write_image(&fixture.mkdir("images/optimize")?)?;

        // Still running at the timeout: stopped, and what it read until then is kept.
        let hanging = format!("{}/test/optimize:hang", registry.host());
        let started = Instant::now();
        let out = convert_optimized(
            fixture,
            &["--optimize-timeout", "2s"],
            &hanging,
            &["/bin/sh", "-c", "cat /app/data/greeting; exec sleep 600"],
        )?
        .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            out.contains("still running at the 2s timeout, stopped"),
            "{out}"
        );
        // Far below the 600 s the command wanted, on any machine.
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(200),
            "took {:?}",
            started.elapsed()
        );
        let layers = layer_entries(fixture, &hanging, "hang")?;
        ensure_order(
            &layers[1],
            &["app/data/greeting"],
            &["app/data/upper-unread"],
        )?;

        // A failing command: a clear error with its output, and no tag.
        let failing = format!("{}/test/optimize:fail", registry.host());
        let err = convert_optimized(
            fixture,
            &[],
            &failing,
            &["/bin/sh", "-c", "echo broken-start >&2; exit 3"],
        )?
        .err()
        .context("a failing command converted")?;
        anyhow::ensure!(
            err.contains("exited with status 3") && err.contains("broken-start"),
            "{err}"
        );
        // overlaybd has no landmark to order by: refused before anything is read.
        let err = convert_optimized(fixture, &["--format", "overlaybd"], &failing, &[])?
            .err()
            .context("--optimize converted to overlaybd")?;
        anyhow::ensure!(err.contains("--optimize lays out eStargz layers"), "{err}");
        let inspected = skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{failing}"),
        ]);
        anyhow::ensure!(inspected.is_err(), "the failed conversion pushed {failing}");
        Ok(())
    });
}
