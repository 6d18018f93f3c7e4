"""Workloads on a real distribution: a Debian bookworm rootfs made by debootstrap from Debian's
package registry, as three layers (minbase; python3, gcc and libc6-dev on top; 160 MiB of
incompressible assets), with the entrypoints real images have: an interpreter start, a web
server answering its first request, a compile, and a read of every file.

The files each entrypoint reads are found by running it once on the host, chrooted into the
rootfs on a strictatime mount in private mount and network namespaces, and listing the files
whose access time moved: the "needed" bytes behind the physical limit.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import images

ASSETS_MB = 160
PACKAGES = "python3,gcc,libc6-dev"
MIRROR_FILE = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

HTTP = ("python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 & "
        "for i in $(seq 200); do "
        "python3 -c 'import urllib.request as u; "
        "print(\"http\", u.urlopen(\"http://127.0.0.1:8080/\").status)' 2>/dev/null && exit 0; "
        "sleep 0.05; done; exit 1")
COMPILE = ("printf '#include <stdio.h>\\nint main(void) { puts(\"compiled\"); return 0; }\\n' "
           "> /tmp/hello.c && gcc -O1 -o /tmp/hello /tmp/hello.c && /tmp/hello")

WORKLOADS = [
    ("deb-python", "Debian python3, prints hello", ["/usr/bin/python3", "-c", "print('hello')"],
     "hello"),
    ("deb-http", "Debian python3 -m http.server, answers its first request",
     ["/bin/sh", "-c", HTTP], "http 200"),
    ("deb-cc", "Debian gcc compiles and runs hello.c", ["/bin/sh", "-c", COMPILE], "compiled"),
    ("deb-readall", "reads every file of the Debian image",
     ["/bin/sh", "-c", "find /usr /srv -type f -exec cat {} + >/dev/null; echo read all"],
     "read all"),
]


def mirror() -> str:
    if MIRROR_FILE.exists():
        for line in MIRROR_FILE.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return DEFAULT_MIRROR


def debootstrap(target: Path, include: str | None) -> None:
    """A minbase rootfs at `target` (kept between runs), without device nodes: a container's
    /dev comes from its runtime, and a layer must not carry the host's."""
    if (target / ".debootstrapped").exists():
        return
    if target.exists():
        shutil.rmtree(target)
    if not shutil.which("debootstrap"):
        subprocess.run(["apt-get", "install", "-y", "debootstrap"], check=True,
                       stdout=subprocess.DEVNULL)
    command = ["debootstrap", "--variant=minbase"]
    if include:
        command.append(f"--include={include}")
    command += ["bookworm", str(target), mirror()]
    log = target.with_suffix(".log")
    with open(log, "w") as out:
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"bench: debootstrap failed; see {log}")
    dev = target / "dev"
    shutil.rmtree(dev)
    dev.mkdir()
    (target / ".debootstrapped").touch()


def _signature(path: Path):
    st = path.lstat()
    link = os.readlink(path) if path.is_symlink() else None
    return (st.st_mode, st.st_size, int(st.st_mtime), st.st_uid, st.st_gid, link)


def diff_layer(base: Path, full: Path, stage: Path) -> None:
    """Stages at `stage` the layer that turns `base` into `full`: entries new or changed in
    `full` (files hard-linked, not copied) and whiteouts for entries `full` lacks."""
    stage.mkdir(parents=True)
    for root, dirs, files in os.walk(full):
        rel = Path(root).relative_to(full)
        for name in sorted(dirs + files):
            source = Path(root) / name
            if name == ".debootstrapped":
                continue
            old = base / rel / name
            changed = not old.exists() and not old.is_symlink()
            if not changed:
                changed = _signature(source) != _signature(old)
            if not changed:
                continue
            dest = stage / rel / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                dest.symlink_to(os.readlink(source))
            elif source.is_dir():
                dest.mkdir(exist_ok=True)
                shutil.copystat(source, dest)
            else:
                os.link(source, dest)
    for root, dirs, files in os.walk(base):
        rel = Path(root).relative_to(base)
        for name in dirs + files:
            if name == ".debootstrapped":
                continue
            if not (full / rel / name).exists() and not (full / rel / name).is_symlink():
                whiteout = stage / rel / f".wh.{name}"
                whiteout.parent.mkdir(parents=True, exist_ok=True)
                whiteout.touch()
        dirs[:] = [d for d in dirs if (full / rel / d).is_dir()]


def files_read(full: Path, assets: Path, entrypoint: list) -> list:
    """Runs `entrypoint` once chrooted into `full` with `assets` at /srv/assets, on strictatime
    mounts in new mount and network namespaces, and returns the image paths whose access time
    moved."""
    roots = {"": full, "/srv/assets": assets}

    def atimes():
        seen = {}
        for prefix, root in roots.items():
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    rel = str(path.relative_to(root))
                    if prefix == "" and rel.startswith("srv/assets/"):
                        continue
                    seen[f"{prefix}/{rel}"] = path.stat().st_atime_ns
        return seen

    before = atimes()
    (full / "srv/assets").mkdir(parents=True, exist_ok=True)
    script = (
        "set -e; ip link set lo up; "
        f"mount --bind {full} {full}; mount -o remount,bind,strictatime {full}; "
        f"mount --bind {assets} {full}/srv/assets; "
        f"mount -o remount,bind,strictatime {full}/srv/assets; "
        f"mount -t proc proc {full}/proc; mount --rbind /dev {full}/dev; "
        f"exec chroot {full} /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin \"$@\"")
    subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "sh", "-c", script,
                    "probe"] + entrypoint, check=True, stdout=subprocess.DEVNULL, timeout=600)
    for leftover in ("tmp/hello", "tmp/hello.c"):
        (full / leftover).unlink(missing_ok=True)
    after = atimes()
    # The probe's own `env` is not part of the workload.
    return sorted(p for p, t in after.items() if before.get(p) != t and p != "/usr/bin/env")


def workloads(stage_root: Path, cache: Path, tiny: bool) -> list:
    """The Debian workloads, sharing one three-layer image staged under `stage_root`."""
    base, full = cache / "base", cache / "full"
    debootstrap(base, None)
    debootstrap(full, PACKAGES)
    stage = stage_root / "debian"
    done = stage / ".staged.json"
    if not done.exists():
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        layer0, layer1, layer2 = stage / "layer0", stage / "layer1", stage / "layer2"
        shutil.copytree(base, layer0, symlinks=True, copy_function=os.link,
                        ignore=lambda d, names: [".debootstrapped"] if d == str(base) else [])
        diff_layer(base, full, layer1)
        assets_mb = 16 if tiny else ASSETS_MB
        images.random_files(layer2, "/srv/assets", assets_mb // 4, 4 * images.MIB)
        needed = {name: files_read(full, layer2 / "srv/assets", entrypoint)
                  for name, _, entrypoint, _ in WORKLOADS}
        done.write_text(json.dumps({"layers": [str(layer0), str(layer1), str(layer2)],
                                    "needed": needed}))
    saved = json.loads(done.read_text())
    chosen = []
    for name, description, entrypoint, expect in WORKLOADS:
        w = images.Workload(name, description, entrypoint, None, expect)
        w.layers, w.needed = saved["layers"], saved["needed"][name]
        chosen.append(w)
    return chosen
