//! stargz-snapshotter reads what `shoal convert` writes: each converted layer is opened by
//! stargz-snapshotter's own Go library (Debian's `golang-github-containerd-stargz-snapshotter-dev`)
//! through a small verifier in `integration/go/estargz-verify`, which checks the TOC digest and
//! every chunk digest and lists each regular file's sha256 for comparison with the original layer.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::convert::{
    convert, layer_digests, layout_blob, layout_manifest, sha256_hex, skopeo, untar, TOC_DIGEST,
};
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;

const GO_TIMEOUT: Duration = Duration::from_secs(300);
/// Where Debian installs Go libraries for GOPATH builds.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";
/// Entries the eStargz builder adds to every layer; not part of the original tree.
const BUILDER_ENTRIES: [&str; 2] = ["/.prefetch.landmark", "/.no.prefetch.landmark"];

/// Builds the verifier with Debian's Go in GOPATH mode (no network); returns its path.
fn build_verifier(fixture: &Fixture) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/estargz-verify/main.go");
    let gopath = fixture.mkdir("gopath")?;
    let package = gopath.join("src/shoal.dev/estargz-verify");
    fs::create_dir_all(&package).with_context(|| format!("create {}", package.display()))?;
    fs::copy(&source, package.join("main.go"))
        .with_context(|| format!("copy {}", source.display()))?;
    let output = fixture.path("estargz-verify");
    let mut go = Command::new("go");
    go.args(["build", "-o"])
        .arg(&output)
        .arg("shoal.dev/estargz-verify")
        .current_dir(&gopath)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPATH", format!("{}:{DEBIAN_GOPATH}", gopath.display()))
        // Shared between runs so the library compiles once per machine.
        .env("GOCACHE", std::env::temp_dir().join("shoal-test-gocache"));
    process::run(&mut go, GO_TIMEOUT).context(
        "build the verifier against stargz-snapshotter's library \
         (scripts/install-deps.sh installs golang-go and golang-github-containerd-stargz-snapshotter-dev)",
    )?;
    Ok(output)
}

/// `path sha256` of every regular file under `root`, as the verifier prints them.
fn tree_sums(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut sums = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let bytes = fs::read(entry.path())?;
                let relative = entry.path().strip_prefix(root)?.to_owned();
                sums.insert(format!("/{}", relative.display()), sha256_hex(&bytes));
            }
        }
    }
    Ok(sums)
}

fn parse_sums(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(path, _)| !BUILDER_ENTRIES.contains(path))
        .map(|(path, sum)| (path.to_owned(), sum.to_owned()))
        .collect()
}

#[test]
fn stargz_snapshotter_reads_and_verifies_converted_layers() {
    privileged!();
    Fixture::run(|fixture| {
        let verifier = build_verifier(fixture)?;
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        built.push(&registry.host(), "test/layered")?;
        let original = fixture.path("images/layered");
        let destination = format!("{}/test/layered-esgz:v1", registry.host());
        convert(
            fixture,
            &[],
            &format!("oci:{}:latest", original.display()),
            &destination,
        )?;
        let converted = fixture.path("images/converted");
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{destination}"),
            &format!("oci:{}:v1", converted.display()),
        ])?;

        let originals = layer_digests(&layout_manifest(&original)?)?;
        let manifest = layout_manifest(&converted)?;
        let layers = manifest["layers"].as_array().context("no layers")?;
        anyhow::ensure!(
            layers.len() == originals.len(),
            "{} converted layers for {} original ones",
            layers.len(),
            originals.len()
        );
        for (position, (layer, original_digest)) in layers.iter().zip(&originals).enumerate() {
            let digest = layer["digest"].as_str().context("layer without digest")?;
            let toc = layer["annotations"][TOC_DIGEST]
                .as_str()
                .with_context(|| format!("layer {position} has no TOC digest annotation"))?;
            let mut verify = Command::new(&verifier);
            verify.arg(layout_blob(&converted, digest)).arg(toc);
            let read = parse_sums(&process::run(&mut verify, GO_TIMEOUT)?);
            let unpacked = untar(
                fixture,
                &layout_blob(&original, original_digest),
                &format!("original-{position}"),
            )?;
            let expected = tree_sums(&unpacked)?;
            anyhow::ensure!(
                !expected.is_empty() || position > 0,
                "the base layer has no files"
            );
            anyhow::ensure!(
                read == expected,
                "layer {position}: stargz-snapshotter's library read {read:#?}, \
                 the original layer holds {expected:#?}"
            );
        }

        // A wrong expected TOC digest is refused by the same library.
        let first = layers[0]["digest"]
            .as_str()
            .context("layer without digest")?;
        let wrong = format!("sha256:{}", "0".repeat(64));
        let mut verify = Command::new(&verifier);
        verify.arg(layout_blob(&converted, first)).arg(&wrong);
        let refused = process::run(&mut verify, GO_TIMEOUT);
        anyhow::ensure!(refused.is_err(), "the verifier accepted TOC digest {wrong}");
        Ok(())
    });
}
