//! OCI test images built locally with umoci (one layer per list of changes) from the host's
//! static busybox, pushed to the loopback registry with skopeo.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::Fixture;
use crate::process;
use crate::tree::{self, Op};

const BUSYBOX: &str = "/bin/busybox";
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The busybox applets the test images link.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "test", "readlink", "stat", "id", "sleep", "mkdir", "rm", "touch",
    "wc", "grep", "sync", "true", "head",
];

/// A built image in an OCI layout inside the fixture.
pub struct OciImage {
    layout: PathBuf,
    tag: String,
}

/// Builds `layers` (each a list of changes on top of the previous ones) into an image whose
/// command is `/bin/sh`.
pub fn build(fixture: &Fixture, name: &str, layers: &[Vec<Op>]) -> Result<OciImage> {
    let layout = fixture.path(&format!("images/{name}"));
    let tag = "latest".to_owned();
    let image = format!("{}:{tag}", layout.display());
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    for (index, changes) in layers.iter().enumerate() {
        let bundle = fixture.path(&format!("images/{name}-bundle-{index}"));
        let bundle_arg = bundle.to_string_lossy().into_owned();
        umoci(&["unpack", "--image", &image, &bundle_arg])?;
        tree::apply(&bundle.join("rootfs"), changes)
            .with_context(|| format!("layer {index} of image {name}"))?;
        umoci(&["repack", "--image", &image, &bundle_arg])?;
        fs::remove_dir_all(&bundle).with_context(|| format!("remove {}", bundle.display()))?;
    }
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/bin",
    ])?;
    Ok(OciImage { layout, tag })
}

impl OciImage {
    /// The image as `shoal convert` and skopeo name a layout's image: `oci:<dir>:<tag>`.
    pub fn oci(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }

    /// Pushes to `registry_host` (plain HTTP) as `<repository>:<tag>`; returns the reference.
    pub fn push(&self, registry_host: &str, repository: &str) -> Result<String> {
        let reference = format!("{registry_host}/{repository}:{}", self.tag);
        let mut command = Command::new("skopeo");
        command
            .arg("copy")
            .arg("--dest-tls-verify=false")
            .arg(format!("oci:{}:{}", self.layout.display(), self.tag))
            .arg(format!("docker://{reference}"));
        process::run(&mut command, TOOL_TIMEOUT).context("push the image with skopeo")?;
        Ok(reference)
    }
}

fn umoci(args: &[&str]) -> Result<String> {
    process::run(Command::new("umoci").args(args), TOOL_TIMEOUT)
}

/// A first layer: the host's static busybox with its applets, and the usual top directories.
pub fn busybox_layer() -> Result<Vec<Op>> {
    let binary = fs::read(BUSYBOX)
        .with_context(|| format!("read {BUSYBOX} (install the busybox-static package)"))?;
    let mut ops = vec![
        tree::dir("/bin", 0o755),
        tree::dir("/etc", 0o755),
        tree::dir("/tmp", 0o1777),
        tree::file("/bin/busybox", binary, 0o755),
        tree::file("/etc/passwd", "root:x:0:0:root:/:/bin/sh\n", 0o644),
        tree::file("/etc/group", "root:x:0:\n", 0o644),
    ];
    for applet in APPLETS {
        ops.push(tree::symlink("busybox", format!("/bin/{applet}")));
    }
    Ok(ops)
}

/// The standard three-layer test image: overwrites, file and directory deletions (whiteouts),
/// an opaque re-created directory, symlinks, hardlinks and an xattr.
pub fn layered() -> Result<Vec<Vec<Op>>> {
    let mut base = busybox_layer()?;
    base.extend([
        tree::file("/etc/greeting", "hello from shoal\n", 0o644),
        tree::dir("/data", 0o755),
        tree::file("/data/overwrite", "version 1\n", 0o644),
        tree::file("/data/remove-me", "doomed\n", 0o644),
        tree::dir("/data/dir-remove", 0o755),
        tree::file("/data/dir-remove/old", "old\n", 0o644),
        tree::dir("/data/replaced", 0o755),
        tree::file("/data/replaced/old", "old\n", 0o644),
    ]);
    let second = vec![
        tree::file("/data/overwrite", "version 2\n", 0o600),
        tree::remove_all("/data/remove-me"),
        tree::remove_all("/data/dir-remove"),
        tree::symlink("overwrite", "/data/link"),
        tree::file("/data/hard1", "linked\n", 0o644),
        tree::link("/data/hard1", "/data/hard2"),
        tree::file("/data/xattr", "has an xattr\n", 0o644),
        tree::xattr("/data/xattr", "user.shoal", "layer-2"),
    ];
    let third = vec![
        tree::remove_all("/data/replaced"),
        tree::dir("/data/replaced", 0o750),
        tree::file("/data/replaced/new", "new\n", 0o644),
        tree::file("/data/third", "layer 3\n", 0o644),
    ];
    Ok(vec![base, second, third])
}

/// A shell script that checks, inside a container of [`layered`], everything the layers set
/// up; it prints `layered-ok` only if all checks pass.
pub const LAYERED_CHECK: &str = "set -e; \
    test \"$(cat /etc/greeting)\" = 'hello from shoal'; \
    test \"$(cat /data/overwrite)\" = 'version 2'; \
    test ! -e /data/remove-me; \
    test ! -e /data/dir-remove; \
    test \"$(ls /data/replaced)\" = new; \
    test \"$(readlink /data/link)\" = overwrite; \
    test \"$(cat /data/link)\" = 'version 2'; \
    test \"$(stat -c %i /data/hard1)\" = \"$(stat -c %i /data/hard2)\"; \
    test \"$(stat -c %a /data/overwrite)\" = 600; \
    test \"$(stat -c %a /data/replaced)\" = 750; \
    test \"$(cat /data/third)\" = 'layer 3'; \
    echo layered-ok";
