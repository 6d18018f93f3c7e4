//! overlaybd images end to end, through real containerd, the loopback registry and FUSE:
//! - the real overlaybd-converted hello-world (made by the reference converter, in the shared
//!   fixtures) rpulls with every layer remote, runs and prints its greeting; a restarted daemon
//!   mounts its disk again without the registry; removing the image releases the loop device;
//! - `shoal convert --format overlaybd` (zstd, the default, and LZ4) of a four-layer image with overwrites,
//!   deletions and an opaque directory shows the same tree as the original on overlayfs;
//! - a container reading 3 MB of a 200 MB image fetches a few percent of it;
//! - a block tampered in the registry never reaches a container, and a damaged layer fails the
//!   pull with an error naming what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::containerd::Containerd;
use crate::convert::manifest_layers;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::image;
use crate::lazy;
use crate::mount;
use crate::process;
use crate::tree;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const FIXTURE_TAG: &str = "amd64-converted";
pub(crate) const GREETING: &str = "Hello from Docker!";

/// The reference-converted image: under `$SHOAL_FIXTURES`, else `../shared/fixtures` from the
/// project root, else where the workplace keeps them.
fn shared_layout() -> PathBuf {
    let fixtures = match std::env::var_os("SHOAL_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
            if beside.is_dir() {
                beside
            } else {
                PathBuf::from("/work/shared/fixtures")
            }
        }
    };
    fixtures.join("overlaybd/hello-world")
}

/// The eStargz tests' stack (registry behind the counting proxy, daemon, containerd using
/// it as `shoal`), with what the overlaybd tests add to it.
pub(crate) struct Stack(lazy::Stack);

impl std::ops::Deref for Stack {
    type Target = lazy::Stack;

    fn deref(&self) -> &lazy::Stack {
        &self.0
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut lazy::Stack {
        &mut self.0
    }
}

impl Stack {
    pub(crate) fn start(fixture: &Fixture) -> Result<Stack> {
        Stack::start_settings(fixture, "")
    }

    /// [`Stack::start`] with `settings` as in [`lazy::Stack::start`].
    pub(crate) fn start_settings(fixture: &Fixture, settings: &str) -> Result<Stack> {
        Ok(Stack(lazy::Stack::start(fixture, settings)?))
    }

    /// [`Stack::start`] with `prepare` applied to the daemon before its first launch.
    pub(crate) fn start_with(
        fixture: &Fixture,
        prepare: impl FnOnce(&mut crate::daemon::Daemon),
    ) -> Result<Stack> {
        Ok(Stack(lazy::Stack::start_with(fixture, "", prepare)?))
    }

    /// Copies the OCI layout `layout` tagged `tag` to `test/<name>:latest`, digests preserved.
    pub(crate) fn push_layout(&self, layout: &Path, tag: &str, name: &str) -> Result<String> {
        let reference = format!("{}/test/{name}:latest", self.registry.host());
        let mut command = Command::new("skopeo");
        command
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"));
        process::run(&mut command, TOOL_TIMEOUT).context("push the image with skopeo")?;
        Ok(reference)
    }

    /// `ctr run --rm` on Shoal of `reference` with its own command line: the container's stdout.
    pub(crate) fn run_default(&self, reference: &str, id: &str) -> Result<String> {
        self.ctd
            .ctr(&["run", "--rm", "--snapshotter", "shoal", reference, id])
    }

    /// Body bytes the registry sent for layer blobs since the proxy was last reset.
    fn blob_bytes(&self) -> u64 {
        self.registry.proxy().response_bytes_for("/blobs/")
    }
}

/// Loop devices whose backing file lies under `root`.
pub(crate) fn loops_under(root: &Path) -> Result<Vec<String>> {
    let out = process::run(
        Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]),
        Duration::from_secs(30),
    )?;
    let root = root.to_string_lossy().into_owned();
    Ok(out
        .lines()
        .filter(|line| line.contains(&root))
        .map(str::to_owned)
        .collect())
}

/// A copy of the read-only shared fixture, so tools never write next to it.
pub(crate) fn fixture_layout(fixture: &Fixture) -> Result<std::path::PathBuf> {
    let copy = fixture.path("hello-world-layout");
    let shared = shared_layout();
    let status = Command::new("cp")
        .arg("-r")
        .arg(&shared)
        .arg(&copy)
        .status()
        .context("copy the fixture layout")?;
    anyhow::ensure!(status.success(), "cp -r {} failed", shared.display());
    Ok(copy)
}

#[test]
fn reference_converted_hello_world_runs_lazily_and_survives_a_restart() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        let layout = fixture_layout(fixture)?;
        let reference = stack.push_layout(&layout, FIXTURE_TAG, "obd-hello")?;

        stack.registry.proxy().reset();
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(
            out.contains("1 layers, 1 lazy"),
            "the overlaybd layer is not mounted lazily: {out}"
        );
        // 642,560-byte layer: only the tar header, ZFile header/trailer/jump table and the
        // LSMT header/trailer/index blocks were read (whole cache blocks of them).
        let pulled = stack.blob_bytes();
        eprintln!("rpull fetched {pulled} layer bytes");

        let out = stack.run_default(&reference, "obd-hello-1")?;
        anyhow::ensure!(out.contains(GREETING), "no greeting: {out}");
        let root = stack.daemon.root().to_owned();
        anyhow::ensure!(
            !loops_under(&root)?.is_empty(),
            "no loop device backs the mounted virtual disk"
        );

        // A restarted daemon mounts the disk again from its persisted metadata alone.
        stack.daemon.stop()?;
        stack.registry.proxy().reset();
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        let out = stack.run_default(&reference, "obd-hello-2")?;
        anyhow::ensure!(out.contains(GREETING), "no greeting after restart: {out}");
        let manifests = stack.registry.proxy().response_bytes_for("/manifests/");
        anyhow::ensure!(
            manifests == 0,
            "the restart asked the registry for manifests ({manifests} bytes)"
        );

        // Removing the image lets containerd remove the snapshots: loop devices are released.
        stack.ctd.ctr(&["images", "rm", "--sync", &reference])?;
        wait_until("loop devices released", Duration::from_secs(30), || {
            Ok(loops_under(&root)?.is_empty())
        })?;
        // Mounting, reading, restarting and unmounting as intended is nothing to act on: no
        // warning (the kernel's fsync of the read-only disk, fuser's unmount of a detached
        // mount) may reach the log.
        let log = stack.daemon.log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        anyhow::ensure!(
            warnings.is_empty(),
            "warnings on a clean run: {warnings:#?}"
        );
        Ok(())
    })
}

/// The key of the one image's top committed snapshot in `snapshotter`: the committed
/// snapshot no other snapshot names as its parent.
fn top_snapshot(ctd: &Containerd, snapshotter: &str) -> Result<String> {
    let out = ctd.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    let parents: Vec<&str> = rows.iter().filter_map(|r| r.get(1).copied()).collect();
    let tops: Vec<&str> = rows
        .iter()
        .filter(|r| r.last() == Some(&"Committed") && !parents.contains(&r[0]))
        .map(|r| r[0])
        .collect();
    match tops.as_slice() {
        [only] => Ok((*only).to_owned()),
        _ => anyhow::bail!("expected one top snapshot in {snapshotter}: {out}"),
    }
}

/// Mounts a read-only view of `parent` from `snapshotter` on `views/<name>`.
fn mount_view(
    fixture: &Fixture,
    ctd: &Containerd,
    snapshotter: &str,
    parent: &str,
    name: &str,
) -> Result<std::path::PathBuf> {
    let out = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        snapshotter,
        "view",
        "--mounts",
        &format!("view-{name}"),
        parent,
    ])?;
    let parsed: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parse mounts {out}"))?;
    let text = |entry: &serde_json::Value, key: &str| {
        entry
            .get(key)
            .or_else(|| entry.get(key.to_ascii_lowercase()))
            .cloned()
            .unwrap_or_default()
    };
    let mounts = parsed
        .as_array()
        .with_context(|| format!("mounts are not a list: {out}"))?
        .iter()
        .map(|entry| {
            Ok(containerd_snapshots::api::types::Mount {
                r#type: text(entry, "Type").as_str().context("no type")?.to_owned(),
                source: text(entry, "Source")
                    .as_str()
                    .context("no source")?
                    .to_owned(),
                options: text(entry, "Options")
                    .as_array()
                    .map(|o| {
                        o.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let target = fixture.mkdir(&format!("views/{name}"))?;
    mount::mount_all(&mounts, &target)?;
    Ok(target)
}

/// `shoal convert --format <format> --plain-http SRC DST`: its stdout.
fn convert(format: &str, source: &str, destination: &str) -> Result<String> {
    convert_with(format, &[], source, destination)
}

fn convert_with(format: &str, extra: &[&str], source: &str, destination: &str) -> Result<String> {
    let mut command = Command::new(binary::cli()?);
    command
        .args(["convert", "--format", format, "--plain-http"])
        .args(extra)
        .args([source, destination]);
    process::run(&mut command, TOOL_TIMEOUT)
}

#[test]
fn converted_images_run_with_the_same_tree_as_the_original() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let mut layers = image::layered()?;
        layers[0].extend([
            tree::symlink("busybox", "/bin/sha256sum"),
            tree::dir("/opt", 0o755),
            tree::file("/opt/config", "version 1\n", 0o644),
            tree::file("/opt/doomed", "doomed\n", 0o644),
        ]);
        // A fourth layer overwriting and deleting files of the first.
        layers.push(vec![
            tree::file("/opt/config", "version 4\n", 0o640),
            tree::remove_all("/opt/doomed"),
            tree::dir("/srv", 0o750),
            tree::chown("/srv", 1000, 1000),
            tree::file("/srv/big", vec![0x5a; 3 << 20], 0o644),
        ]);
        let built = image::build(fixture, "roundtrip", &layers)?;
        let plain = built.push(&stack.registry.host(), "test/roundtrip")?;
        let converted = format!("{}/test/roundtrip:obd", stack.registry.host());
        let out = convert("overlaybd", &plain, &converted)?;
        anyhow::ensure!(out.contains("4 overlaybd layers"), "convert said: {out}");
        let lz4 = format!("{}/test/roundtrip:obd-lz4", stack.registry.host());
        convert("overlaybd-lz4", &plain, &lz4)?;

        // The reference: the original image pulled the ordinary way, onto overlayfs.
        stack.ctd.ctr(&["images", "pull", "--plain-http", &plain])?;
        let plain_top = top_snapshot(&stack.ctd, "overlayfs")?;
        let expected = mount_view(fixture, &stack.ctd, "overlayfs", &plain_top, "overlayfs")?;

        let out = stack.rpull(&converted)?;
        anyhow::ensure!(out.contains("4 layers, 4 lazy"), "not all lazy: {out}");
        let top = top_snapshot(&stack.ctd, "shoal")?;
        let lazy = mount_view(fixture, &stack.ctd, "shoal", &top, "shoal")?;
        let same = tree::assert_same(&expected, &lazy);
        mount::unmount(&lazy)?;
        same?;

        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &converted,
            "roundtrip",
            "sh",
            "-c",
            &format!("test ! -e /opt/doomed; {}", image::LAYERED_CHECK),
        ])?;
        anyhow::ensure!(out.trim() == "layered-ok", "layered check printed {out:?}");
        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &converted,
            "roundtrip-sums",
            "sha256sum",
            "/opt/config",
            "/srv/big",
            "/data/overwrite",
        ])?;
        let greeting = sha256_hex(b"version 4\n");
        let big = sha256_hex(&vec![0x5a; 3 << 20]);
        anyhow::ensure!(
            out.contains(&greeting) && out.contains(&big),
            "sums in the container: {out}"
        );

        // The LZ4 variant holds the same disk, in more bytes than the default (zstd).
        stack.ctd.ctr(&["images", "rm", "--sync", &converted])?;
        let out = stack.rpull(&lz4)?;
        anyhow::ensure!(out.contains("4 layers, 4 lazy"), "lz4 not all lazy: {out}");
        let layer_bytes = |reference| -> Result<u64> {
            Ok(manifest_layers(reference)?
                .iter()
                .map(|(_, size)| size)
                .sum())
        };
        let (default_bytes, lz4_bytes) = (layer_bytes(&converted)?, layer_bytes(&lz4)?);
        anyhow::ensure!(
            default_bytes < lz4_bytes,
            "the default overlaybd layers take {default_bytes} bytes, LZ4's {lz4_bytes}"
        );
        let top = top_snapshot(&stack.ctd, "shoal")?;
        let lazy = mount_view(fixture, &stack.ctd, "shoal", &top, "shoal-lz4")?;
        let same = tree::assert_same(&expected, &lazy);
        mount::unmount(&lazy)?;
        mount::unmount(&expected)?;
        same
    })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn random_bytes(len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(len);
    std::fs::File::open("/dev/urandom")
        .context("open /dev/urandom")?
        .take(len as u64)
        .read_to_end(&mut bytes)
        .context("read /dev/urandom")?;
    Ok(bytes)
}

/// A converted image: a busybox base, then `data` (path, bytes) files in a second layer.
pub(crate) fn publish_converted(
    fixture: &Fixture,
    stack: &Stack,
    name: &str,
    data: &[(&str, &[u8])],
) -> Result<String> {
    publish_converted_with(fixture, stack, name, data, &[])
}

/// [`publish_converted`] with `extra` arguments to `shoal convert`.
fn publish_converted_with(
    fixture: &Fixture,
    stack: &Stack,
    name: &str,
    data: &[(&str, &[u8])],
    extra: &[&str],
) -> Result<String> {
    let mut base = image::busybox_layer()?;
    base.push(tree::symlink("busybox", "/bin/sha256sum"));
    base.push(tree::file("/etc/greeting", "hello from shoal\n", 0o644));
    let mut files = vec![tree::dir("/data", 0o755)];
    for (path, bytes) in data {
        files.push(tree::file(*path, bytes.to_vec(), 0o644));
    }
    let built = image::build(fixture, name, &[base, files])?;
    let plain = built.push(&stack.registry.host(), &format!("test/{name}"))?;
    let converted = format!("{}/test/{name}:obd", stack.registry.host());
    convert_with("overlaybd", extra, &plain, &converted)?;
    Ok(converted)
}

#[test]
fn a_container_reading_a_few_megabytes_of_a_large_image_fetches_little() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        let settings = format!("[metrics]\naddress = \"{address}\"\n");
        let stack = Stack(lazy::Stack::start(fixture, &settings)?);
        let unread: Vec<Vec<u8>> = (0..8)
            .map(|_| random_bytes(24 << 20))
            .collect::<Result<_>>()?;
        let small = random_bytes(3 << 20)?;
        let mut data: Vec<(String, &[u8])> = unread
            .iter()
            .enumerate()
            .map(|(i, bytes)| (format!("/data/unread-{i}"), bytes.as_slice()))
            .collect();
        data.push(("/data/small".to_owned(), &small));
        let data: Vec<(&str, &[u8])> = data.iter().map(|(p, b)| (p.as_str(), *b)).collect();
        let reference = publish_converted(fixture, &stack, "large", &data)?;
        let total: u64 = manifest_layers(&reference)?.iter().map(|l| l.1).sum();
        anyhow::ensure!(total > 190 << 20, "the image is only {total} bytes");

        stack.registry.proxy().reset();
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(out.contains("2 layers, 2 lazy"), "not all lazy: {out}");
        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "large",
            "sha256sum",
            "/data/small",
        ])?;
        anyhow::ensure!(out.contains(&sha256_hex(&small)), "wrong sum: {out}");
        let fetched = stack.blob_bytes();
        eprintln!(
            "fetched {fetched} of {total} layer bytes ({:.1}%)",
            fetched as f64 * 100.0 / total as f64
        );
        anyhow::ensure!(
            fetched * 10 < total,
            "fetched {fetched} of {total} layer bytes, not under 10%"
        );
        // The disk's FUSE reads are timed with the eStargz trees'.
        let reads =
            crate::metrics::Scrape::take(address)?.value("shoal_fuse_read_duration_seconds_count");
        anyhow::ensure!(reads > 0.0, "no overlaybd FUSE read was timed");
        Ok(())
    })
}

#[test]
fn a_block_tampered_in_the_registry_never_reaches_a_container() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let victim = random_bytes(6 << 20)?;
        let reference = publish_converted(fixture, &stack, "tamper", &[("/data/victim", &victim)])?;
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(out.contains("2 layers, 2 lazy"), "not all lazy: {out}");

        // The layer is mounted; now the registry's copy of a block in its middle (file data,
        // far from the metadata read so far) goes bad.
        let layers = manifest_layers(&reference)?;
        let (digest, size) = layers.last().context("no layers")?;
        let blob = stack.registry.blob_path(digest)?;
        let mut bytes = std::fs::read(&blob)?;
        let middle = usize::try_from(size / 2)?;
        for byte in &mut bytes[middle..middle + 64] {
            *byte ^= 0xff;
        }
        std::fs::write(&blob, bytes)?;

        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "victim",
            "sh",
            "-c",
            "sha256sum /data/victim; echo victim-rc=$?; sha256sum /etc/greeting; echo fine-rc=$?",
        ])?;
        anyhow::ensure!(
            !out.contains(&sha256_hex(&victim)) && !out.contains("victim-rc=0"),
            "the tampered file was read: {out}"
        );
        anyhow::ensure!(
            out.contains(&sha256_hex(b"hello from shoal\n")) && out.contains("fine-rc=0"),
            "the untouched layer failed: {out}"
        );
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.contains("failed verification"),
            "the daemon log does not report the bad block"
        );
        // The daemon is still serving: a new container starts.
        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "after",
            "cat",
            "/etc/greeting",
        ])?;
        anyhow::ensure!(out.contains("hello from shoal"), "after: {out}");
        Ok(())
    })
}

#[test]
fn a_damaged_overlaybd_layer_fails_the_pull_with_a_clear_error() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        // Without a block digest table, which would refuse the damaged bytes before the
        // format's own checks see them (the error would name the table's digest instead).
        let reference = publish_converted_with(
            fixture,
            &stack,
            "damaged",
            &[("/data/file", b"content\n")],
            &["--no-block-digests"],
        )?;
        let layers = manifest_layers(&reference)?;
        let (digest, _) = layers.last().context("no layers")?;
        // The ZFile trailer is the payload's last 512 bytes; the payload (after the PAX header,
        // its `size=` record, and the entry header) starts at byte 1536. Flip a byte of the
        // trailer's jump-table offset, so the trailer's digest no longer matches.
        let blob = stack.registry.blob_path(digest)?;
        let mut bytes = std::fs::read(&blob)?;
        let pax = String::from_utf8_lossy(&bytes[512..1024]).into_owned();
        let payload_len: usize = pax
            .split("size=")
            .nth(1)
            .and_then(|rest| rest.split('\n').next())
            .context("no size record in the pax header")?
            .parse()?;
        let trailer = 1536 + payload_len - 512;
        anyhow::ensure!(
            &bytes[trailer..trailer + 5] == b"ZFile",
            "no trailer at {trailer}"
        );
        bytes[trailer + 40] ^= 0x01;
        std::fs::write(&blob, bytes)?;

        let err = stack
            .rpull(&reference)
            .err()
            .context("the pull of a damaged layer succeeded")?;
        let text = format!("{err:#}");
        eprintln!("rpull of the damaged image: {text}");
        anyhow::ensure!(
            text.contains("cannot be mounted") && text.contains("zfile trailer digest"),
            "unclear error: {text}"
        );
        // The daemon keeps serving: the fixture's own image still runs.
        let layout = fixture_layout(fixture)?;
        let hello = stack.push_layout(&layout, FIXTURE_TAG, "obd-hello")?;
        stack.rpull(&hello)?;
        let out = stack.run_default(&hello, "still-serving")?;
        anyhow::ensure!(out.contains(GREETING), "no greeting: {out}");
        Ok(())
    })
}
