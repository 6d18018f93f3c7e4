//! Prepares of remote layers run side by side. Each of eight Prepares behind a distant
//! registry (eight images, eStargz or overlaybd) spends its time in registry round trips:
//! finding the layer and reading its index; none may wait for another's, so eight together
//! take about as long as one. And a Prepare whose mount hangs (a loop mount held in mount(8))
//! holds up no other Prepare: its snapshot is only reserved while it mounts, and nothing that
//! others need (the metadata write transaction, a mounter lock) is held across the mount.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use containerd_snapshots::tonic::Code;

use crate::client::{Labels, Snapshots};
use crate::convert::{convert, inspect_raw};
use crate::fixture::{privileged, wait_until, Fixture};
use crate::image;
use crate::lazy::{self, Stack};
use crate::proxy::Fault;
use crate::tree;

/// Added to every registry request: a registry in another region. Long enough that round
/// trips, not the cores eight mounts share, are what a Prepare waits for.
const LATENCY: Duration = Duration::from_millis(500);
/// Prepares run together.
const TOGETHER: usize = 8;
/// Layer annotations containerd passes on to a snapshotter as Prepare labels.
const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

#[test]
fn eight_estargz_prepares_behind_a_slow_registry_take_about_as_long_as_one() {
    privileged!();
    Fixture::run(|fixture| prepares_overlap(fixture, &[]))
}

#[test]
fn eight_overlaybd_prepares_behind_a_slow_registry_take_about_as_long_as_one() {
    privileged!();
    Fixture::run(|fixture| prepares_overlap(fixture, &["--format", "overlaybd"]))
}

/// Publishes `TOGETHER + 2` one-layer images converted with `convert_flags`, then behind
/// [`LATENCY`]: one Prepare to open the daemon's connections, one timed alone, and
/// [`TOGETHER`] timed together, each from a client of its own.
fn prepares_overlap(fixture: &Fixture, convert_flags: &[&str]) -> Result<()> {
    let stack = Stack::start(fixture, "")?;
    let requests = (0..TOGETHER + 2)
        .map(|i| publish(fixture, &stack, convert_flags, i))
        .collect::<Result<Vec<_>>>()?;
    stack.registry.proxy().inject("/v2/", Fault::Delay(LATENCY));

    let (warm, rest) = requests.split_first().context("no images")?;
    let (alone, together) = rest.split_first().context("one image")?;
    prepare_remote(&stack, warm)?;
    let started = Instant::now();
    prepare_remote(&stack, alone)?;
    let one = started.elapsed();

    let started = Instant::now();
    std::thread::scope(|scope| {
        let prepares: Vec<_> = together
            .iter()
            .map(|request| scope.spawn(|| prepare_remote(&stack, request)))
            .collect();
        prepares
            .into_iter()
            .try_for_each(|prepare| prepare.join().expect("a Prepare thread panicked"))
    })?;
    let eight = started.elapsed();
    eprintln!("one Prepare {one:?}, {TOGETHER} together {eight:?}");

    // The injected latency is in the measurement: a Prepare makes at least one request.
    anyhow::ensure!(
        one >= LATENCY,
        "one Prepare took {one:?}, under {LATENCY:?}"
    );
    // Queued behind one another's mounts they would take well over three times as long
    // (an overlaybd mount alone reads its superblock through the registry); side by side,
    // the ones that got a core late add little to the round trips they all wait for.
    anyhow::ensure!(
        eight * 2 < one * 5,
        "{TOGETHER} Prepares together took {eight:?}, one alone {one:?}: they queue"
    );
    Ok(())
}

/// How long a Prepare that must not wait may take, on a loaded machine.
const UNHINDERED: Duration = Duration::from_secs(60);

#[test]
fn a_prepare_whose_mount_hangs_holds_up_no_other_prepare() {
    privileged!();
    Fixture::run(|fixture| {
        let shim_dir = fixture.mkdir("shim")?;
        let (started, release) = (fixture.path("mount-held"), fixture.path("mount-release"));
        gated_mount_shim(&shim_dir, &started, &release)?;
        let stack = Stack::start_with(fixture, "", |daemon| {
            daemon.set_path_prefix(Some(shim_dir));
        })?;
        let held = publish(fixture, &stack, &["--format", "overlaybd"], 0)?;
        let free = publish(fixture, &stack, &[], 1)?;

        std::thread::scope(|scope| -> Result<()> {
            let held_prepare = scope.spawn(|| prepare_remote(&stack, &held));
            let outcome = (|| -> Result<()> {
                wait_until("the overlaybd Prepare's loop mount", UNHINDERED, || {
                    anyhow::ensure!(!held_prepare.is_finished(), "the held Prepare ended");
                    Ok(started.exists())
                })?;
                // Its own thread, so that a Prepare that waits is a bounded failure.
                let (done, finished) = mpsc::channel();
                let free = &free;
                let stack = &stack;
                scope.spawn(move || done.send(prepare_remote(stack, free)));
                finished.recv_timeout(UNHINDERED).map_err(|_| {
                    anyhow::anyhow!(
                        "an eStargz Prepare waited {UNHINDERED:?} behind an overlaybd \
                             Prepare whose mount hangs"
                    )
                })??;
                let names = Snapshots::connect(stack.daemon.socket())?
                    .list_names(&[])
                    .map_err(|status| anyhow::anyhow!("list: {}", status.message()))?;
                anyhow::ensure!(
                    !names.contains(&held.target),
                    "a snapshot whose mount has not finished is visible: {names:?}"
                );
                Ok(())
            })();
            // Released whatever happened, so no thread outlives the test.
            fs::write(&release, b"")?;
            let held_outcome = held_prepare.join().expect("the held Prepare panicked");
            outcome?;
            held_outcome.context("the held Prepare, once its mount was released")
        })
    })
}

/// Stands in for mount(8): marks `started`, waits (at most two minutes) for `release` to
/// exist, then runs the real mount with the same arguments.
fn gated_mount_shim(dir: &Path, started: &Path, release: &Path) -> Result<()> {
    let real = ["/usr/bin/mount", "/bin/mount"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .context("no mount(8) on this machine")?;
    let shim = dir.join("mount");
    let script = format!(
        "#!/bin/sh\n: > '{started}'\ni=0\nwhile [ ! -e '{release}' ] && [ $i -lt 1200 ]; do \
         sleep 0.1; i=$((i+1)); done\nexec {real} \"$@\"\n",
        started = started.display(),
        release = release.display(),
    );
    fs::write(&shim, script).with_context(|| format!("write {}", shim.display()))?;
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", shim.display()))
}

/// A Prepare of an image's only layer as containerd's unpacker sends it for a remote snapshot.
struct RemotePrepare {
    key: String,
    target: String,
    labels: Labels,
}

/// Builds image `i` (one layer with a file of its own), converts it and returns the Prepare
/// of its layer.
fn publish(
    fixture: &Fixture,
    stack: &Stack,
    convert_flags: &[&str],
    i: usize,
) -> Result<RemotePrepare> {
    let name = format!("concurrent-{i}");
    let content = lazy::random_bytes(256 << 10)?;
    let layer = vec![
        tree::dir("/data", 0o755),
        tree::file(format!("/data/{name}"), content, 0o644),
    ];
    let built = image::build(fixture, &name, &[layer])?;
    let plain = built.push(&stack.registry.host(), &format!("test/{name}"))?;
    let converted = format!("{}/test/{name}:lazy", stack.registry.host());
    convert(fixture, convert_flags, &plain, &converted)?;

    let manifest = inspect_raw(&converted, false)?;
    let layer = manifest["layers"]
        .as_array()
        .and_then(|layers| layers.first())
        .with_context(|| format!("no layer in {converted}"))?;
    let digest = layer["digest"].as_str().context("a layer without digest")?;
    let mut labels: Labels = layer["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.starts_with(SNAPSHOT_LABEL_PREFIX))
        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
        .collect::<HashMap<_, _>>();
    let target = format!("chain-{i}");
    labels.insert("containerd.io/snapshot.ref".into(), target.clone());
    labels.insert("containerd.io/snapshot/cri.image-ref".into(), converted);
    labels.insert(
        "containerd.io/snapshot/cri.layer-digest".into(),
        digest.into(),
    );
    Ok(RemotePrepare {
        key: format!("extract-{i}"),
        target,
        labels,
    })
}

/// Sends `request` on a connection of its own; succeeds when the daemon mounted the layer
/// remotely (ALREADY_EXISTS, and the target committed with Shoal's remote label).
fn prepare_remote(stack: &Stack, request: &RemotePrepare) -> Result<()> {
    let api = Snapshots::connect(stack.daemon.socket())?;
    match api.prepare_labeled(&request.key, "", request.labels.clone()) {
        Err(status) if status.code() == Code::AlreadyExists => {}
        Err(status) => anyhow::bail!(
            "prepare {}: {:?}: {}",
            request.key,
            status.code(),
            status.message()
        ),
        Ok(_) => anyhow::bail!(
            "prepare {} made an ordinary snapshot, not a remote one",
            request.key
        ),
    }
    let info = api
        .stat(&request.target)
        .map_err(|status| anyhow::anyhow!("stat {}: {}", request.target, status.message()))?;
    anyhow::ensure!(
        info.labels
            .get("containerd.io/snapshot/remote")
            .map(String::as_str)
            == Some("shoal"),
        "{} is not a remote snapshot: {:?}",
        request.target,
        info.labels
    );
    Ok(())
}
