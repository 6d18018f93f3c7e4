"""Workload images of the benchmark, built locally as OCI layouts (no network, no builder).

Each workload is a list of layers (staged directory trees), an entrypoint, how its readiness
shows (exit, or a line on stdout) and the files its entrypoint actually reads: the "needed"
bytes behind the physical limit printed beside each result.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ["sh", "echo", "cat", "sleep", "ls", "head", "find"]
PYTHON = Path("/usr/bin/python3.11")
PYTHON_IMPORTS = "json, decimal, email.parser, http.client, asyncio, argparse, logging"
# Parts of the stdlib no import here touches and that only make the image slower to build.
PYTHON_SKIP = {"test", "idlelib", "tkinter", "ensurepip", "lib2to3", "site-packages",
               "dist-packages", "turtledemo"}
MIB = 1 << 20


@dataclass
class Workload:
    name: str
    description: str
    entrypoint: list
    # None: ready when the entrypoint exits; else ready when this line appears on stdout.
    ready_line: str | None
    # Text the entrypoint's output must contain, so that a broken run is not timed as a fast one.
    expect: str
    layers: list = field(default_factory=list)
    # Paths (inside the image) the entrypoint reads.
    needed: list = field(default_factory=list)


def busybox_layer(stage: Path) -> None:
    (stage / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, stage / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        link = stage / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for directory in ("etc", "tmp", "proc", "sys", "dev"):
        (stage / directory).mkdir(exist_ok=True)


def random_files(stage: Path, directory: str, count: int, size: int) -> list:
    """`count` files of `size` random (incompressible) bytes: what a large image's data is like
    after compression anyway. Returns their paths inside the image."""
    target = stage / directory.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        with open(target / f"{i:03}", "wb") as out:
            left = size
            while left:
                piece = min(left, 4 * MIB)
                out.write(os.urandom(piece))
                left -= piece
        paths.append(f"{directory}/{i:03}")
    return paths


def python_layer(stage: Path) -> list:
    """The host's python3.11 with the libraries it links and its stdlib. Returns the files the
    workload's imports load, as the interpreter itself reports them."""
    libs = subprocess.run(["ldd", str(PYTHON)], check=True, capture_output=True, text=True)
    needed = [str(PYTHON)]
    for line in libs.stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if not path.startswith("/"):
            continue
        # Libraries keep the path ldd prints (/lib/... on merged /usr); copy the real file.
        dest = stage / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dest)
        needed.append(path)
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON, stage / "usr/bin/python3.11")
    (stage / "usr/bin/python3").symlink_to("python3.11")
    stdlib = Path("/usr/lib/python3.11")
    shutil.copytree(stdlib, stage / "usr/lib/python3.11", symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in PYTHON_SKIP])
    probe = (f"import {PYTHON_IMPORTS}, sys\n"
             "for m in list(sys.modules.values()):\n"
             "    f = getattr(m, '__file__', None)\n"
             "    if f: print(f)\n"
             "    c = getattr(m, '__cached__', None)\n"
             "    if c: print(c)\n")
    loaded = subprocess.run([str(PYTHON), "-c", probe], check=True, capture_output=True,
                            text=True).stdout.split()
    needed += [p for p in loaded if p.startswith(str(stdlib)) and Path(p).exists()]
    return needed


def workloads(stage_root: Path, tiny: bool, large_mb: int, server_mb: int,
              readall_mb: int = 100) -> list:
    """Stages every workload's layers under `stage_root` (once; reused when present)."""
    chosen = []

    echo = Workload("echo-large", f"{8 if tiny else large_mb} MB image, `sh -c echo`",
                    ["/bin/sh", "-c", "echo hello from a large image"], None,
                    "hello from a large image")
    echo.needed = ["/bin/busybox"]
    chosen.append(echo)
    if not tiny:
        chosen.append(Workload("python", "python3.11 + stdlib, imports and prints",
                               ["/usr/bin/python3", "-c",
                                f"import {PYTHON_IMPORTS}; print('python ready')"],
                               None, "python ready"))
        # Its entrypoint names the assets it reads (the first 40%), so it is set when staged.
        chosen.append(Workload("server", f"{server_mb} MB of assets, reads 40% then ready",
                               [], "ready", "ready"))
        # Reads every file of the image: where a lazy snapshotter must not lose to a pull.
        chosen.append(Workload("readall", f"python3 + stdlib and {readall_mb} MB of assets, "
                               "reads every file", ["/bin/sh", "-c",
                                                    "find /usr /srv -type f -exec cat {} + "
                                                    ">/dev/null; echo read all"],
                               None, "read all"))

    for w in chosen:
        base = stage_root / w.name
        done = base / ".staged.json"
        if done.exists():
            saved = json.loads(done.read_text())
            w.layers, w.needed, w.entrypoint = saved["layers"], saved["needed"], saved["entrypoint"]
            continue
        if base.exists():
            shutil.rmtree(base)
        if w.name == "echo-large":
            bb = base / "layer0"
            busybox_layer(bb)
            data = base / "layer1"
            total = (8 if tiny else large_mb) * MIB
            random_files(data, "/data", max(total // (4 * MIB), 1), 4 * MIB)
            w.layers = [str(bb), str(data)]
        elif w.name == "python":
            py = base / "layer0"
            w.needed = python_layer(py)
            w.layers = [str(py)]
        elif w.name == "server":
            bb = base / "layer0"
            busybox_layer(bb)
            data = base / "layer1"
            count = max(server_mb // 4, 5)
            paths = random_files(data, "/srv/assets", count, 4 * MIB)
            read = paths[: max(count * 2 // 5, 1)]
            w.entrypoint = ["/bin/sh", "-c",
                            f"cat {' '.join(read)} >/dev/null; echo ready; exec sleep 600"]
            w.needed = ["/bin/busybox"] + read
            w.layers = [str(bb), str(data)]
        elif w.name == "readall":
            bb, py, data = base / "layer0", base / "layer1", base / "layer2"
            busybox_layer(bb)
            python_layer(py)
            random_files(data, "/srv/assets", max(readall_mb // 4, 1), 4 * MIB)
            w.layers = [str(bb), str(py), str(data)]
            w.needed = ["/bin/busybox"] + [
                "/" + str(f.relative_to(layer)) for layer in (py, data)
                for f in sorted(layer.rglob("*")) if f.is_file() and not f.is_symlink()]
        done.write_text(json.dumps({"layers": w.layers, "needed": w.needed,
                                    "entrypoint": w.entrypoint}))
    return chosen


def needed_bytes(w: Workload) -> int:
    """Compressed (gzip) size of the files the entrypoint reads, found in the staged layers:
    the least a lazy puller must move over the link for this workload."""
    total = 0
    for path in w.needed:
        source = None
        for layer in reversed(w.layers):
            candidate = Path(layer) / path.lstrip("/")
            if candidate.is_file():
                source = candidate
                break
        if source is None:
            continue
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        with open(source, "rb") as f:
            while chunk := f.read(4 * MIB):
                total += len(compressor.compress(chunk))
        total += len(compressor.flush())
    return total


def _blob(layout: Path, data_path: Path = None, data: bytes = None) -> tuple:
    """Moves or writes a blob into the layout; returns (digest, size)."""
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if data is not None:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)
    h = hashlib.sha256()
    with open(data_path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    digest = h.hexdigest()
    size = data_path.stat().st_size
    os.replace(data_path, blobs / digest)
    return f"sha256:{digest}", size


def _layer_blob(layout: Path, stage: Path) -> tuple:
    """Tars and gzips one staged layer; returns (descriptor, diff_id)."""
    tar_path = layout / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(stage.rglob("*")):
            if entry.name == ".staged.json":
                continue
            tar.add(entry, arcname=str(entry.relative_to(stage)), recursive=False)
    diff = hashlib.sha256()
    gz_path = layout / "layer.tar.gz"
    with open(tar_path, "rb") as raw, open(gz_path, "wb") as out:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            while chunk := raw.read(4 * MIB):
                diff.update(chunk)
                gz.write(chunk)
    tar_path.unlink()
    digest, size = _blob(layout, data_path=gz_path)
    return ({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": digest, "size": size}, f"sha256:{diff.hexdigest()}")


def oci_layout(w: Workload, layout: Path, tag: str = "latest") -> Path:
    """Writes `w` as an OCI image layout (once; reused when present)."""
    if (layout / "index.json").exists():
        return layout
    layout.mkdir(parents=True, exist_ok=True)
    descriptors, diff_ids = [], []
    for stage in w.layers:
        descriptor, diff_id = _layer_blob(layout, Path(stage))
        descriptors.append(descriptor)
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": w.entrypoint,
                   "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = _blob(layout, data=json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": csize},
        "layers": descriptors,
    }
    mdigest, msize = _blob(layout, data=json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
        "size": msize, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def image_bytes(layout: Path) -> int:
    """Compressed bytes of an OCI layout's layers."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return sum(layer["size"] for layer in manifest["layers"])


if __name__ == "__main__":
    sys.exit("images.py is a module of bench.py")
