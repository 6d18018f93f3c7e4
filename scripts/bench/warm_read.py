#!/usr/bin/python3
"""Warm and cold FUSE reads of one large file of a lazily mounted eStargz layer, against the
same file on local disk. Prints the numbers and writes warm-read-<commit>.json to the results
folder.

    scripts/bench/warm-read.sh                       # builds release binaries, then runs this
    scripts/bench/warm_read.py --bin-dir target/release --out bench-results

One image holding /data/000 (--size-mb of random, incompressible bytes) is converted to eStargz
by `shoal convert` and pushed to a docker-registry on loopback (no shaping). Then, per
repetition, on a fresh daemon with an empty cache (and, with --baseline-bin-dir, once more
with other binaries, back to back, so that a before/after comparison shares the load):

- cold: one 4 KiB read at an offset in a chunk nothing has read yet (page cache dropped first),
  timed from the read call to its return; several such reads, each in a different chunk;
- warm: the whole file read once (the chunk cache is then warm), then sequential 1 MiB reads
  and random 4 KiB reads (fixed seed) through FUSE and of the local copy, the page cache
  dropped before each run.

Shoal keeps decoded chunks in memory (`cache.memory`, 256 MiB by default, which holds the
whole default file): `--memory 16MiB` makes warm reads decode from the disk chunk cache
instead. Every figure is the median over the repetitions (MB/s, or ms for the cold read); the spread is
written beside it. The machine's load average is recorded before and after, for the reader to
judge noise. Runs as root: mounts, drop_caches.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import images  # noqa: E402
import node  # noqa: E402

FILE_IN_IMAGE = "data/000"
# `shoal convert`'s chunk size: cold reads are placed one per chunk.
CHUNK = 4 * images.MIB
# Prefetch would warm what the cold reads must find cold.
SHOAL_EXTRA = "[fetch]\nprefetch = false\n"


def log(message):
    print(f"warm-read: {message}", flush=True)


def commit():
    try:
        rev = node.run("git", "-C", HERE, "rev-parse", "--short=12", "HEAD").strip()
        dirty = node.run("git", "-C", HERE, "status", "--porcelain", "--untracked-files=no")
        return rev + ("-dirty" if dirty.strip() else "")
    except (RuntimeError, OSError):
        return "unknown"


def load():
    return Path("/proc/loadavg").read_text().split()[:3]


def mounted_file(run_dir: Path) -> Path:
    """The file inside the Shoal FUSE mount under `run_dir` that holds it."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point, source = fields[4], fields[fields.index("-") + 2]
            if source.startswith("shoal:") and point.startswith(f"{run_dir}/") \
                    and Path(point, FILE_IN_IMAGE).exists():
                return Path(point, FILE_IN_IMAGE)
    raise RuntimeError(f"no Shoal FUSE mount under {run_dir} holds /{FILE_IN_IMAGE}")


def cold_reads(path: Path, chunks: list) -> list:
    """Milliseconds of one 4 KiB read in each of `chunks`, none of which was read before."""
    took = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for chunk in chunks:
            bench.drop_caches()
            offset = chunk * CHUNK + 4096 * 5
            started = time.monotonic()
            got = os.pread(fd, 4096, offset)
            took.append((time.monotonic() - started) * 1e3)
            if len(got) != 4096:
                raise RuntimeError(f"short cold read at {offset}: {len(got)} bytes")
    finally:
        os.close(fd)
    return took


def same_bytes(a: Path, b: Path):
    """The FUSE file must be the local file, or the numbers measure nothing."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * images.MIB), fb.read(4 * images.MIB)
            if x != y:
                raise RuntimeError(f"{a} differs from {b}")
            if not x:
                return


class WarmRead:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.bins = Path(args.bin_dir).resolve()
        self.out = Path(args.out).resolve()
        self.registry = None
        self.node = None

    def start_registry(self):
        storage = self.work / "registry"
        storage.mkdir(parents=True, exist_ok=True)
        port = node.free_port()
        config = storage / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {storage}/data\nhttp:\n  addr: 127.0.0.1:{port}\n")
        self.registry = node.Process("docker-registry", ["docker-registry", "serve", config],
                                     self.work / "registry.log")
        address = f"127.0.0.1:{port}"
        node.wait_until("the registry", lambda: node.http_ok(f"http://{address}/v2/"),
                        self.registry)
        return address

    def stage(self) -> tuple:
        """The image's layout and the local copy of its file (built once, reused)."""
        size = self.args.size_mb * images.MIB
        stage = self.work / f"stage-{self.args.size_mb}"
        local = stage / "layer" / FILE_IN_IMAGE
        if not (stage / ".staged.json").exists():
            node.run("rm", "-rf", stage, self.work / f"layout-{self.args.size_mb}")
            images.random_files(stage / "layer", "/data", 1, size)
            (stage / ".staged.json").write_text("{}")
        w = images.Workload("warm-read", "one large file", ["/bin/true"], None, "",
                            layers=[str(stage / "layer")])
        layout = images.oci_layout(w, self.work / f"layout-{self.args.size_mb}")
        return layout, local

    def repetition(self, reference, local, number, label=""):
        memory = f'memory = "{self.args.memory}"\n' if self.args.memory else ""
        self.node.start("shoal", shoal_extra=memory + SHOAL_EXTRA)
        try:
            self.node.pull(reference)
            mounted = mounted_file(self.node.run_dir)
            chunks = random.Random(number).sample(range(self.args.size_mb * images.MIB // CHUNK),
                                                  self.args.cold_reads)
            cold = cold_reads(mounted, chunks)
            bench.read_sequential(mounted)  # warms the chunk cache
            # Reads may be answered before their blocks are cached: the daemon's /status
            # answers once what was read has landed, so that those writes do not run into
            # the measurements.
            status = f"http://127.0.0.1:{self.node.metrics_port}/status"
            with urllib.request.urlopen(status, timeout=node.STEP_TIMEOUT) as response:
                response.read()
            if number == 1:
                same_bytes(mounted, local)
            row = {"cold_4k_ms": cold}
            random_reads = lambda path: bench.read_random(path, self.args.random_reads)  # noqa: E731
            for pattern, measure in (("sequential_1m", bench.read_sequential),
                                     ("random_4k", random_reads)):
                bench.drop_caches()
                fuse = measure(mounted)
                bench.drop_caches()
                disk = measure(local)
                row[pattern] = {"fuse_mb_s": fuse, "local_mb_s": disk}
            log(f"{label}#{number}: sequential {row['sequential_1m']['fuse_mb_s']:.0f} MB/s fuse, "
                f"{row['sequential_1m']['local_mb_s']:.0f} local; random 4 KiB "
                f"{row['random_4k']['fuse_mb_s']:.0f} fuse, "
                f"{row['random_4k']['local_mb_s']:.0f} local; cold 4 KiB "
                + ", ".join(f"{ms:.1f}" for ms in cold) + " ms")
            return row
        finally:
            self.node.stop()

    def main(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        revision = self.args.commit or commit()
        load_before = load()
        try:
            registry = self.start_registry()
            layout, local = self.stage()
            reference = f"{registry}/bench/warm-read:esgz"
            node.run(self.bins / "shoal", "convert", "--plain-http", f"oci:{layout}:latest",
                     reference)
            nodes = {"current": node.Node("warm-read", self.work / "run", self.bins, registry)}
            if self.args.baseline_bin_dir:
                nodes["baseline"] = node.Node("warm-read", self.work / "run",
                                              Path(self.args.baseline_bin_dir).resolve(),
                                              registry)
            rows = {label: [] for label in nodes}
            for n in range(1, self.args.reps + 1):
                # Back to back, the order alternating, so that both see the same load.
                order = list(nodes) if n % 2 else list(reversed(nodes))
                for label in order:
                    self.node = nodes[label]
                    rows[label].append(self.repetition(reference, local, n, f"{label} "))
        finally:
            if self.node:
                self.node.stop()
            if self.registry:
                self.registry.stop()
        result = summarise(rows["current"])
        result.update({
            "commit": revision, "machine": bench.machine(), "file_mb": self.args.size_mb,
            "repetitions": self.args.reps, "cache_memory": self.args.memory or "default",
            "random_reads": self.args.random_reads, "load_before": load_before, "load_after": load(),
            "runs": rows["current"],
        })
        if "baseline" in rows:
            result["baseline"] = summarise(rows["baseline"])
            result["baseline"].update({"bin_dir": self.args.baseline_bin_dir,
                                       "runs": rows["baseline"]})
        suffix = f"-memory-{self.args.memory}" if self.args.memory else ""
        path = self.out / f"warm-read-{revision}{suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result)
        if "baseline" in result:
            print("baseline, the same repetitions interleaved:")
            print_summary({**result["baseline"], "commit": self.args.baseline_bin_dir,
                           "machine": result["machine"], "load_before": load_before,
                           "load_after": result["load_after"],
                           "repetitions": self.args.reps})
        log(f"results in {path}")


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows):
    result = {}
    for pattern in ("sequential_1m", "random_4k"):
        fuse = [row[pattern]["fuse_mb_s"] for row in rows]
        disk = [row[pattern]["local_mb_s"] for row in rows]
        ratios = [f / d for f, d in zip(fuse, disk)]
        result[pattern] = {"fuse_mb_s": spread(fuse), "local_mb_s": spread(disk),
                           "ratio": spread(ratios)}
    # Each cold read is its own sample: they are independent misses.
    result["cold_4k_ms"] = spread([ms for row in rows for ms in row["cold_4k_ms"]])
    return result


def print_summary(result):
    print(f"\ncommit {result['commit']}, {result['machine']}, load {result['load_before']} "
          f"-> {result['load_after']}, median of {result['repetitions']}")
    print(f"{'read':<18} {'FUSE MB/s':>10} {'local MB/s':>11} {'ratio':>6}  (ratio min-max)")
    for pattern, name in (("sequential_1m", "sequential 1 MiB"), ("random_4k", "random 4 KiB")):
        r = result[pattern]
        print(f"{name:<18} {r['fuse_mb_s']['median']:>10.1f} {r['local_mb_s']['median']:>11.1f} "
              f"{r['ratio']['median']:>6.2f}  ({r['ratio']['min']:.2f}-{r['ratio']['max']:.2f})")
    c = result["cold_4k_ms"]
    print(f"cold 4 KiB read: {c['median']:.1f} ms median ({c['min']:.1f}-{c['max']:.1f})")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results", help="results folder")
    parser.add_argument("--work", default="/var/tmp/shoal-warm-read",
                        help="image, registry and run state (the image is reused)")
    parser.add_argument("--bin-dir", default="target/release",
                        help="where shoal and shoal-snapshotter are")
    parser.add_argument("--commit", help="names the binaries in the results (default: this "
                        "checkout's HEAD), for binaries built from another checkout")
    parser.add_argument("--baseline-bin-dir",
                        help="binaries to compare with, each repetition run beside the "
                        "measured one (written under \"baseline\" in the results)")
    parser.add_argument("--memory", help="Shoal's cache.memory (decoded chunks kept in "
                        "memory), e.g. 16MiB so that warm reads decode from the chunk cache")
    parser.add_argument("--random-reads", type=int, default=2000,
                        help="4 KiB reads per random run")
    parser.add_argument("--size-mb", type=int, default=256, help="the file's size")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (fresh daemon each)")
    parser.add_argument("--cold-reads", type=int, default=3,
                        help="cold 4 KiB reads per repetition, each in its own chunk")
    args = parser.parse_args()
    if args.reps < 1 or args.cold_reads < 1:
        parser.error("--reps and --cold-reads must be at least 1")
    if args.cold_reads > args.size_mb * images.MIB // CHUNK:
        parser.error("--cold-reads: more than the file has chunks")
    return args


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("warm-read: run as root (mounts, drop_caches)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    WarmRead(parse_args()).main()
