//! Hostile eStargz layers: each one's tar is harmless, but its TOC (with a `toc.digest`
//! annotation that matches it, as a publisher controls both) is crafted to crash the daemon,
//! make it serve what the blob cannot hold, or serve bytes nobody verified. `shoal rpull` must
//! refuse every such TOC with its reason, have the layer downloaded instead, keep the daemon
//! up, and the image must run with the tar's real files.

use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::binary;
use crate::convert::sha256_hex;
use crate::fixture::{privileged, Fixture};
use crate::lazy::{self, Stack};
use crate::process;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const SOME_DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// One crafted layer: its name (also the real file it holds, `/hostile/<name>`), the TOC
/// entries it claims beyond the real ones, and what the refusal must say.
struct Case {
    name: &'static str,
    /// Entries added to the TOC; `data` is the blob offset of the real file's data member.
    lies: fn(data: u64) -> Vec<Value>,
    /// Whether the real file's own TOC entry carries its chunk digest.
    honest_digest: bool,
    reason: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            // What overflowed the daemon's stack: one file under 6,000 directories.
            name: "deep",
            lies: |_| {
                vec![json!({"name": format!("{}/f", vec!["d"; 6000].join("/")), "type": "reg"})]
            },
            honest_digest: true,
            reason: "path of 12001 bytes",
        },
        Case {
            name: "nested",
            lies: |_| {
                vec![json!({"name": format!("{}/f", vec!["d"; 1100].join("/")), "type": "reg"})]
            },
            honest_digest: true,
            reason: "path of 1101 components",
        },
        Case {
            name: "longname",
            lies: |_| vec![json!({"name": format!("hostile/{}", "n".repeat(300)), "type": "reg"})],
            honest_digest: true,
            reason: "name component of 300 bytes",
        },
        Case {
            // A 128 GiB file whose 64 MiB chunks all point at the few bytes of one member.
            name: "huge",
            lies: |data| {
                let chunk: u64 = 64 << 20;
                let count = (128u64 << 30) / chunk;
                (0..count)
                    .map(|i| {
                        let kind = if i == 0 { "reg" } else { "chunk" };
                        json!({"name": "huge", "type": kind, "size": count * chunk,
                               "offset": data, "chunkOffset": i * chunk, "chunkSize": chunk,
                               "chunkDigest": SOME_DIGEST})
                    })
                    .collect()
            },
            honest_digest: true,
            // Refused as more than the member can hold or as overlapping the real file's chunk,
            // whichever of the two claims on that member is looked at first.
            reason: "huge: chunk",
        },
        Case {
            name: "selflink",
            lies: |_| {
                vec![json!({"name": "hostile/me", "type": "hardlink", "linkName": "hostile/me"})]
            },
            honest_digest: true,
            reason: "hardlink hostile/me points at itself",
        },
        Case {
            // Nothing false at all, but nothing to verify the file's bytes against.
            name: "nodigest",
            lies: |_| Vec::new(),
            honest_digest: false,
            reason: "hostile/nodigest: chunk at file offset 0 has no chunkDigest",
        },
    ]
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

fn tar_header(name: &str, size: u64, kind: tar::EntryType, mode: u32) -> Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(mode);
    header.set_entry_type(kind);
    header.set_cksum();
    Ok(header.as_bytes().to_vec())
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(512) * 512, 0);
    out
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field points at the TOC.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut out = vec![
        0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    out.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

/// A crafted layer: the blob, its diff ID (sha256 of what it decompresses to) and the digest
/// of its TOC JSON.
struct Crafted {
    blob: Vec<u8>,
    diff_id: String,
    toc_digest: String,
}

fn craft(case: &Case) -> Result<Crafted> {
    let content = format!("{}\n", case.name);
    let path = format!("hostile/{}", case.name);
    let mut tar = tar_header("hostile/", 0, tar::EntryType::Directory, 0o755)?;
    tar.extend(tar_header(
        &path,
        content.len() as u64,
        tar::EntryType::Regular,
        0o644,
    )?);
    let mut blob = gzip(&tar)?;
    let data_offset = blob.len() as u64;
    let data = padded(content.as_bytes());
    tar.extend(&data);
    blob.extend(gzip(&data)?);

    let mut file = json!({"name": path, "type": "reg", "size": content.len(),
                          "mode": 0o644, "offset": data_offset});
    if case.honest_digest {
        file["chunkDigest"] = format!("sha256:{}", sha256_hex(content.as_bytes())).into();
    }
    let mut entries = vec![
        json!({"name": "hostile/", "type": "dir", "mode": 0o755}),
        file,
    ];
    entries.extend((case.lies)(data_offset));
    let toc = serde_json::to_vec(&json!({"version": 1, "entries": entries}))?;

    let toc_offset = blob.len() as u64;
    let mut toc_tar = tar_header(
        "stargz.index.json",
        toc.len() as u64,
        tar::EntryType::Regular,
        0o644,
    )?;
    toc_tar.extend(padded(&toc));
    toc_tar.extend([0u8; 1024]);
    tar.extend(&toc_tar);
    blob.extend(gzip(&toc_tar)?);
    blob.extend(footer(toc_offset));
    Ok(Crafted {
        blob,
        diff_id: format!("sha256:{}", hex::encode(Sha256::digest(&tar))),
        toc_digest: format!("sha256:{}", hex::encode(Sha256::digest(&toc))),
    })
}

/// Copies `source` into a `dir:` layout, adds `layers` on top, and pushes it as `target`.
fn push_with_layers(
    fixture: &Fixture,
    source: &str,
    target: &str,
    layers: &[Crafted],
) -> Result<()> {
    let copy = fixture.path("hostile-dir");
    let mut pull = Command::new("skopeo");
    pull.args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{source}"))
        .arg(format!("dir:{}", copy.display()));
    process::run(&mut pull, TOOL_TIMEOUT)?;
    let manifest_path = copy.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&fs::read(&manifest_path)?)?;
    let hex_of = |digest: &str| digest.trim_start_matches("sha256:").to_owned();
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("no config")?
        .to_owned();
    let mut config: Value = serde_json::from_slice(&fs::read(copy.join(hex_of(&config_digest)))?)?;
    for layer in layers {
        let digest = format!("sha256:{}", sha256_hex(&layer.blob));
        fs::write(copy.join(hex_of(&digest)), &layer.blob)?;
        manifest["layers"]
            .as_array_mut()
            .context("manifest without layers")?
            .push(
                json!({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": layer.blob.len(),
                         "annotations": {TOC_DIGEST: layer.toc_digest}}),
            );
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .context("config without diff_ids")?
            .push(layer.diff_id.clone().into());
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    fs::write(copy.join(hex_of(&config_digest)), &config)?;
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config.len().into();
    fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
    let mut push = Command::new("skopeo");
    push.args(["copy", "--dest-tls-verify=false"])
        .arg(format!("dir:{}", copy.display()))
        .arg(format!("docker://{target}"));
    process::run(&mut push, TOOL_TIMEOUT)?;
    Ok(())
}

#[test]
fn hostile_tocs_are_refused_with_their_reason_and_the_layers_downloaded() {
    privileged!();
    Fixture::run(|fixture| {
        // `/status` for `shoal status`, which learns the address from the same configuration.
        let metrics = crate::fixture::loopback_addr(9464);
        let mut stack = Stack::start(fixture, &format!("[metrics]\naddress = \"{metrics}\"\n"))?;
        let (layers, mut expected) = lazy::data_image(&[("seed", 1 << 20)])?;
        let image = stack.publish(fixture, "hostile", &layers)?;
        let cases = cases();
        let crafted: Vec<Crafted> = cases.iter().map(craft).collect::<Result<_>>()?;
        let reference = format!("{}/test/hostile:crafted", stack.registry.host());
        push_with_layers(fixture, &image.estargz, &reference, &crafted)?;

        let total = 2 + cases.len();
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(
            out.contains(&format!("{total} layers, 2 lazy, {} fetched", cases.len())),
            "the crafted layers were not all downloaded: {out}"
        );
        anyhow::ensure!(
            stack.daemon.is_running()?,
            "the daemon died during the pull"
        );

        let log = stack.daemon.log();
        for case in &cases {
            anyhow::ensure!(
                log.lines()
                    .any(|line| line.contains("TOC refused") && line.contains(case.reason)),
                "no refusal of the {} layer saying {:?} in the daemon log",
                case.name,
                case.reason
            );
        }
        let mut status = Command::new(binary::cli()?);
        status
            .arg("--config")
            .arg(stack.daemon.config())
            .args(["status", "--json"]);
        let status: Value =
            serde_json::from_str(&process::run(&mut status, Duration::from_secs(30))?)?;
        anyhow::ensure!(
            status["daemon"]["lazy_fallbacks"]["refused_index"].as_u64()
                == Some(cases.len() as u64),
            "refusals are not counted: {status:#}"
        );

        // The image runs: the lazy layers read back, and each downloaded layer holds its tar's
        // real file, not what its TOC claimed.
        for case in &cases {
            let file = format!("/hostile/{}", case.name);
            expected.insert(file, sha256_hex(format!("{}\n", case.name).as_bytes()));
        }
        expected.insert("/etc/greeting".into(), sha256_hex(b"hello from shoal\n"));
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let script = format!(
            "sha256sum {}; for p in /huge /hostile/me /d; do test -e $p && echo claimed $p; done; true",
            paths.join(" ")
        );
        let out = stack.run(&reference, "hostile", &script)?;
        let got = lazy::sums(&out);
        anyhow::ensure!(got == expected, "{got:#?}, expected {expected:#?}");
        anyhow::ensure!(
            !out.contains("claimed"),
            "a file only the TOC claimed exists: {out}"
        );
        anyhow::ensure!(
            stack.daemon.is_running()?,
            "the daemon died running the image"
        );
        Ok(())
    });
}
