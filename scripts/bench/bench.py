#!/usr/bin/python3
"""Shoal's cold-start benchmark (HelloBench style): workload images pulled and started through
containerd with overlayfs, stargz-snapshotter and Shoal (alone, and beside a second Shoal node
with a warm cache as its peer), the registry in a network namespace behind a shaped link, every
cell the median of cold runs. Writes bench.md, bench.csv, bench.png and fuse-read.md to the
results folder.

    scripts/bench/bench.py --bin-dir target/release --out bench-results
    scripts/bench/bench.py --tiny --bin-dir target/debug --out /tmp/tiny   # smoke test

Runs as root: it creates a network namespace, mounts, and drops the page cache.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import debian  # noqa: E402
import images  # noqa: E402
import link  # noqa: E402
import node  # noqa: E402
import report  # noqa: E402

# Round trips before the first byte a container reads can arrive: TCP connect, manifest,
# config, then the first range (or blob) request.
LIMIT_ROUND_TRIPS = 4
# Loopback addresses of the warm-peer scenario's two nodes (the whole 127/8 is local).
MEASURED_PEER_HOST, WARM_PEER_HOST = "127.0.0.2", "127.0.0.3"
# After both nodes see each other: time for the warm node's full re-announcement (sent when
# its membership changes) to reach the measured node's index.
ANNOUNCE_GRACE_S = 1.0


def log(message):
    print(f"bench: {message}", flush=True)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


# Background completion unthrottled: the link is the limit being measured.
BACKGROUND = '[fetch]\nbackground = true\nbackground_rate = "10GiB"\n'
# Read-triggered completion (off by default) at half a layer.
READ_COMPLETION = '[fetch]\ncomplete_after_percent = 50\n'


class Scenario:
    """How one snapshotter pulls and starts an image. `image` is "plain", "esgz" or
    "overlaybd"; `daemon` is None, "stargz", "shoal", "shoal-learned" (Shoal, cold, with the
    traces an earlier start recorded) or "shoal-peer" (Shoal with a second,
    warm Shoal node as its peer)."""

    def __init__(self, name, snapshotter, image, daemon, note, shoal_extra=""):
        self.name, self.snapshotter, self.image, self.daemon, self.note = \
            name, snapshotter, image, daemon, note
        # More Shoal configuration (see `node.Node.start`).
        self.shoal_extra = shoal_extra

    def node_daemon(self):
        """The daemon the measured node runs."""
        return "shoal" if self.daemon in ("shoal-peer", "shoal-learned") else self.daemon


SCENARIOS = [
    Scenario("overlayfs", "overlayfs", "plain", None, "containerd's default, whole image"),
    Scenario("overlayfs-esgz", "overlayfs", "esgz", None, "eStargz image, unpacked whole"),
    Scenario("stargz", "stargz", "esgz", "stargz", "stargz-snapshotter 0.12 (Debian)"),
    Scenario("shoal", "shoal", "esgz", "shoal", "Shoal, lazy eStargz"),
    # Hooks for scenarios others are building: each is run when `available` finds what it
    # needs, and listed under "Not run" with the reason otherwise.
    Scenario("shoal-overlaybd", "shoal", "overlaybd", "shoal", "Shoal, lazy overlaybd"),
    Scenario("shoal-warm-peer", "shoal", "esgz", "shoal-peer",
             "Shoal, lazy eStargz, a warm peer on the same machine (unshaped loopback)"),
    Scenario("shoal-learned", "shoal", "esgz", "shoal-learned",
             "Shoal, lazy eStargz, cold cache with the learned trace of an earlier start"),
    Scenario("shoal-overlaybd-learned", "shoal", "overlaybd", "shoal-learned",
             "Shoal, lazy overlaybd, cold cache with the learned trace of an earlier start"),
    Scenario("shoal-background", "shoal", "esgz", "shoal",
             "Shoal, lazy eStargz, every layer completed in the background from its mount",
             shoal_extra=BACKGROUND),
    Scenario("shoal-read-completion", "shoal", "esgz", "shoal",
             "Shoal, lazy eStargz, a layer completed once reads brought in half of it",
             shoal_extra=READ_COMPLETION),
    Scenario("shoal-overlaybd-read-completion", "shoal", "overlaybd", "shoal",
             "Shoal, lazy overlaybd, a layer completed once reads brought in half of it",
             shoal_extra=READ_COMPLETION),
    Scenario("shoal-overlaybd-background", "shoal", "overlaybd", "shoal",
             "Shoal, lazy overlaybd, every layer completed in the background from its mount",
             shoal_extra=BACKGROUND),
]

# Learned-prefetch scenario: a recording ends this long after the last new chunk read.
LEARN_SETTLE_S = 2


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        if args.tiny:
            # Staged trees and layouts are reused by name: the tiny ones must not be the full
            # ones (or the other way round).
            self.work = self.work / "tiny"
        self.out = Path(args.out).resolve()
        self.bins = Path(args.bin_dir).resolve()
        self.netns = None
        self.registry = None
        self.proxy = None
        # The warm peer's own way to the registry, so that its bytes are not counted as the
        # measured node's (same shaped link, same delay).
        self.warm_proxy = None
        self.node = None
        self.warm = None
        # (host, port) of the warm-peer scenario's peer listeners: the measured node's, then
        # the warm node's.
        self.peer_ports = []
        self.stargz_bin = None
        # Whether images are also converted to overlaybd (for a scenario that uses them).
        self.overlaybd = False

    # -- registry and link -------------------------------------------------------------

    def start_registry(self):
        storage = self.work / "registry"
        if storage.exists():
            shutil.rmtree(storage)
        storage.mkdir(parents=True)
        if self.args.tiny:
            host, port, prefix = "127.0.0.1", node.free_port(), []
        else:
            self.netns = link.Netns()
            self.netns.create()
            host, port, prefix = link.NS_IP, 5000, self.netns.exec_prefix()
        config = storage / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {storage}/data\nhttp:\n  addr: {host}:{port}\n")
        self.registry = node.Process("docker-registry", prefix +
                                     ["docker-registry", "serve", config],
                                     self.work / "registry.log")
        self.proxy = link.DelayProxy((host, port), 0).start()
        self.warm_proxy = link.DelayProxy((host, port), 0).start()
        node.wait_until("the registry", lambda: node.http_ok(f"http://{self.proxy.address()}/v2/"),
                        self.registry)
        self.node = node.Node("measured", self.work / "run", self.bins, self.proxy.address())
        self.warm = node.Node("warm peer", self.work / "run-warm", self.bins,
                              self.warm_proxy.address())

    def shape(self):
        if self.args.tiny:
            return
        self.netns.shape(self.args.bandwidth_mbit)
        self.proxy.one_way = self.warm_proxy.one_way = self.args.rtt_ms / 2000.0

    def link_text(self):
        if self.args.tiny:
            return "unshaped loopback (tiny mode)"
        return f"{self.args.bandwidth_mbit:g} Mbit/s, {self.args.rtt_ms:g} ms RTT"

    def limit_seconds(self, needed):
        if self.args.tiny:
            return 0.0
        return needed * 8 / (self.args.bandwidth_mbit * 1e6) + \
            LIMIT_ROUND_TRIPS * self.args.rtt_ms / 1000.0

    # -- images ------------------------------------------------------------------------

    def publish(self, workload):
        """Pushes `workload` as built and as converted to eStargz by `shoal convert`."""
        layout = images.oci_layout(workload, self.work / "layouts" / workload.name)
        base = f"{self.proxy.address()}/bench/{workload.name}"
        node.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                 f"oci:{layout}:latest", f"docker://{base}:plain")
        node.run(self.bins / "shoal", "convert", "--plain-http", f"oci:{layout}:latest",
                 f"{base}:esgz")
        references = {"plain": f"{base}:plain", "esgz": f"{base}:esgz"}
        if self.overlaybd:
            node.run(self.bins / "shoal", "convert", "--plain-http", "--format", "overlaybd",
                     f"oci:{layout}:latest", f"{base}:obd")
            references["overlaybd"] = f"{base}:obd"
        return references, images.image_bytes(layout)

    # -- one cold run ------------------------------------------------------------------

    def stop_nodes(self):
        for n in (self.node, self.warm):
            if n is not None:
                n.stop()

    def warm_up(self, workload, scenario, reference):
        """Starts the warm peer fresh, pulls `reference` through its own proxy and runs the
        workload to ready, so that its chunk cache holds (and its index announces) the blocks
        the workload reads; then waits for its registry traffic to settle."""
        members = [f"{host}:{port}" for host, port in self.peer_ports]
        self.warm.start("shoal", peers=(members[1], members))
        warm_reference = reference.replace(self.proxy.address(), self.warm_proxy.address(), 1)
        before = self.warm_proxy.downstream_bytes
        self.warm.pull(warm_reference)
        self.warm.create(scenario.snapshotter, warm_reference)
        self.warm.start_and_wait(workload)
        self.warm.remove_container()
        # Prefetch may still be landing blocks: they would share the shaped link with the
        # measured run. Settled when a second passes without a byte.
        last, settled = self.warm_proxy.downstream_bytes, time.monotonic()
        deadline = settled + 60
        while time.monotonic() - settled < 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
            if self.warm_proxy.downstream_bytes != last:
                last, settled = self.warm_proxy.downstream_bytes, time.monotonic()
        log(f"{workload.name} warm peer ready: "
            f"{(self.warm_proxy.downstream_bytes - before) / 1e6:.1f} MB from the registry")

    def learn_up(self, workload, scenario, reference):
        """Starts the workload once on a fresh node so that Shoal records its trace, and
        keeps the traces (nothing else of that node) for the measured run."""
        self.node.start("shoal", shoal_extra=f"[fetch]\nlearn_settle_secs = {LEARN_SETTLE_S}\n")
        self.node.pull(reference)
        self.node.create(scenario.snapshotter, reference)
        self.node.start_and_wait(workload)
        self.node.remove_container()
        recorded = 'shoal_learn_traces_total{outcome="recorded"}'
        node.wait_until("a trace to be recorded", lambda: self.node.metric(recorded) > 0,
                        self.node.stack[0], timeout=120)
        # Layers whose reads settled together are recorded within the same settle time.
        time.sleep(LEARN_SETTLE_S + 1)
        kept = self.work / "traces-kept"
        if kept.exists():
            shutil.rmtree(kept)
        shutil.copytree(self.node.run_dir / "shoal" / "traces", kept)
        log(f"{workload.name}: {self.node.metric(recorded)} traces recorded")
        self.node.stop()
        return kept

    def start_measured(self, scenario, traces=None):
        if scenario.daemon == "shoal-learned":
            self.node.start("shoal")
            # A cold node, but for the traces an earlier start recorded (as if from a peer).
            shutil.copytree(traces, self.node.run_dir / "shoal" / "traces")
            return
        if scenario.daemon != "shoal-peer":
            self.node.start(scenario.node_daemon(), stargz_bin=self.stargz_bin,
                            shoal_extra=scenario.shoal_extra)
            return
        members = [f"{host}:{port}" for host, port in self.peer_ports]
        self.node.start("shoal", peers=(members[0], members))
        both = lambda: self.node.peers_live() == 2 and self.warm.peers_live() == 2  # noqa: E731
        node.wait_until("the two Shoal nodes to see each other live", both,
                        self.node.stack[0], timeout=30)
        time.sleep(ANNOUNCE_GRACE_S)

    def cold_run(self, workload, scenario, reference, number, needed):
        try:
            traces = None
            if scenario.daemon == "shoal-peer":
                self.peer_ports = [(MEASURED_PEER_HOST, node.free_port(MEASURED_PEER_HOST)),
                                   (WARM_PEER_HOST, node.free_port(WARM_PEER_HOST))]
                self.warm_up(workload, scenario, reference)
            if scenario.daemon == "shoal-learned":
                traces = self.learn_up(workload, scenario, reference)
            self.start_measured(scenario, traces)
            drop_caches()
            before, asked = self.proxy.downstream_bytes, self.proxy.requests
            t0 = time.monotonic()
            self.node.pull(reference)
            t1 = time.monotonic()
            self.node.create(scenario.snapshotter, reference)
            t2 = time.monotonic()
            ready = self.node.start_and_wait(workload)
            row = {
                "workload": workload.name, "scenario": scenario.name, "run": number,
                "pull_s": round(t1 - t0, 3), "create_s": round(t2 - t1, 3),
                "ready_s": round(ready - t2, 3), "total_s": round(ready - t0, 3),
                "registry_bytes": self.proxy.downstream_bytes - before,
                "peer_bytes": self.node.peer_bytes(),
                "needed_bytes": needed, "limit_s": round(self.limit_seconds(needed), 3),
                "requests": self.proxy.requests - asked,
            }
            process = self.node.daemon_process
            usage = process.usage() if process else None
            row["daemon_cpu_s"] = round(usage[0], 2) if usage else ""
            row["daemon_peak_rss_mb"] = round(usage[1] / 1e6, 1) if usage else ""
            prefetched = self.node.metric("shoal_learn_prefetched_bytes_total")
            if prefetched:
                log(f"{workload.name} {scenario.name} #{number}: the trace prefetched "
                    f"{prefetched / 1e6:.1f} MB")
        finally:
            self.stop_nodes()
        log(f"{workload.name} {scenario.name} #{number}: pull {row['pull_s']}s create "
            f"{row['create_s']}s ready {row['ready_s']}s total {row['total_s']}s, "
            f"{row['registry_bytes'] / 1e6:.1f} MB from the registry, "
            f"{row['peer_bytes'] / 1e6:.1f} MB from peers, {row['requests']} requests, "
            f"daemon {row['daemon_cpu_s']} CPU s, peak RSS {row['daemon_peak_rss_mb']} MB")
        return row

    # -- scenarios available here ----------------------------------------------------------

    def available(self, scenario):
        """None when `scenario` can run here, else why not."""
        if scenario.image == "overlaybd":
            help_text = node.run(self.bins / "shoal", "convert", "--help", check=False)
            if "overlaybd" not in help_text:
                return "shoal-overlaybd: `shoal convert` has no overlaybd output yet"
            self.overlaybd = True
        # Each runs the workload twice (a warm peer, or a recording start), or measures a
        # setting's effect: not a smoke test's.
        extra = scenario.daemon in ("shoal-peer", "shoal-learned") or scenario.shoal_extra
        if extra and self.args.tiny and scenario.name not in (self.args.scenarios or []):
            return (f"{scenario.name}: skipped in tiny mode (name it in --scenarios to "
                    "include it)")
        if scenario.daemon == "stargz":
            if self.args.tiny and not self.args.stargz_bin:
                return "stargz: skipped in tiny mode (pass --stargz-bin to include it)"
            self.stargz_bin = Path(self.args.stargz_bin or self.work / "bin/stargz-grpc")
            if not self.stargz_bin.exists():
                log("building stargz-grpc from Debian's Go sources")
                build = subprocess.run([HERE / "build-stargz-grpc.sh", self.stargz_bin],
                                       capture_output=True, text=True)
                if build.returncode != 0:
                    return f"stargz: the daemon did not build: {build.stderr.strip()[-400:]}"
        if scenario.name == "overlayfs-esgz" and self.args.tiny:
            return "overlayfs-esgz: skipped in tiny mode"
        return None

    # -- FUSE read throughput --------------------------------------------------------------

    def fuse_read(self, size_mb):
        """Sequential and random reads of one large file through Shoal's FUSE mount, its chunk
        cache warm and the page cache dropped, against the same file on local disk."""
        stage = self.work / "stage/fuse-read"
        w = images.Workload("fuse-read", "one large file", ["/bin/sh", "-c", "true"], None, "")
        if not (stage / ".staged.json").exists():
            if stage.exists():
                shutil.rmtree(stage)
            images.busybox_layer(stage / "layer0")
            images.random_files(stage / "layer1", "/data", 1, size_mb * images.MIB)
            (stage / ".staged.json").write_text("{}")
        w.layers = [str(stage / "layer0"), str(stage / "layer1")]
        local = stage / "layer1/data/000"
        references, _ = self.publish(w)
        self.node.start("shoal")
        try:
            self.node.pull(references["esgz"])
            mounted = None
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    point, source = fields[4], fields[fields.index("-") + 2]
                    if (source.startswith("shoal:") and point.startswith(f"{self.node.run_dir}/")
                            and Path(point, "data/000").exists()):
                        mounted = Path(point, "data/000")
            if mounted is None:
                raise RuntimeError("no Shoal FUSE mount holds /data/000")
            read_sequential(mounted)  # warms Shoal's chunk cache
            results = {}
            for pattern, measure in (("sequential 1 MiB", read_sequential),
                                     ("random 4 KiB", read_random)):
                drop_caches()
                fuse = measure(mounted)
                drop_caches()
                disk = measure(local)
                results[pattern] = (fuse, disk)
                log(f"fuse read {pattern}: {fuse:.1f} MB/s through Shoal, {disk:.1f} MB/s local")
        finally:
            self.node.stop()
        return results

    # -- the whole run -----------------------------------------------------------------------

    def main(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        skipped, rows = [], []
        scenarios = []
        for scenario in SCENARIOS:
            if self.args.scenarios and scenario.name not in self.args.scenarios:
                continue
            reason = self.available(scenario)
            if reason:
                log(f"not run: {reason}")
                skipped.append(reason)
            else:
                scenarios.append(scenario)
        workloads = images.workloads(self.work / "stage", self.args.tiny, self.args.large_mb,
                                     self.args.server_mb, self.args.readall_mb)
        if self.args.debian:
            workloads += debian.workloads(self.work / "stage",
                                          Path(self.args.debian_cache or self.work / "debian"),
                                          self.args.tiny)
        if self.args.workloads:
            workloads = [w for w in workloads if w.name in self.args.workloads]
        try:
            self.start_registry()
            published = []
            for w in workloads:
                log(f"building and pushing {w.name}")
                references, size = self.publish(w)
                published.append((w, references, images.needed_bytes(w), size))
            self.shape()
            for w, references, needed, size in published:
                for scenario in scenarios:
                    for number in range(1, self.args.runs + 1):
                        rows.append(self.cold_run(w, scenario, references[scenario.image],
                                                  number, needed))
            fuse = self.fuse_read(self.args.fuse_mb) if self.args.fuse_mb > 0 else {}
        finally:
            self.stop_nodes()
            for proxy in (self.proxy, self.warm_proxy):
                if proxy:
                    proxy.stop()
            if self.registry:
                self.registry.stop()
            if self.netns:
                self.netns.destroy()
        settings = {
            "link": self.link_text(), "runs": self.args.runs,
            "machine": machine(), "workloads": {w.name: w.description for w in workloads},
            "image_bytes": {w.name: size for w, _, _, size in published},
            "scenarios": {s.name: s.note for s in scenarios},
        }
        report.write_csv(rows, self.out / "bench.csv")
        report.write_markdown(rows, settings, skipped, self.out / "bench.md")
        report.write_chart(rows, settings, self.out / "bench.png")
        report.write_fuse(fuse, self.out / "fuse-read.md")
        (self.out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        log(f"results in {self.out}")
        print((self.out / "bench.md").read_text() + "\n" + (self.out / "fuse-read.md").read_text())


def read_sequential(path):
    started = time.monotonic()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(images.MIB):
            total += len(chunk)
    return total / 1e6 / (time.monotonic() - started)


def read_random(path, reads=2000):
    size = path.stat().st_size
    chooser = random.Random(7)
    offsets = [chooser.randrange(0, max(size - 4096, 1)) // 4096 * 4096 for _ in range(reads)]
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.monotonic()
        total = sum(len(os.pread(fd, 4096, offset)) for offset in offsets)
        return total / 1e6 / (time.monotonic() - started)
    finally:
        os.close(fd)


def machine():
    cpus = os.cpu_count()
    memory = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    kernel = os.uname().release
    return f"{cpus} CPUs, {int(memory) // 1024} MiB RAM, Linux {kernel}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results", help="results folder")
    parser.add_argument("--work", default="/var/tmp/shoal-bench",
                        help="images, registry and run state (reused between invocations)")
    parser.add_argument("--bin-dir", default="target/release",
                        help="where shoal and shoal-snapshotter are")
    parser.add_argument("--runs", type=int, default=3, help="cold runs per cell")
    parser.add_argument("--bandwidth-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--large-mb", type=int, default=200, help="the large image's data")
    parser.add_argument("--server-mb", type=int, default=100, help="the server's assets")
    parser.add_argument("--readall-mb", type=int, default=100,
                        help="readall's assets, beside python's stdlib")
    parser.add_argument("--fuse-mb", type=int, default=256,
                        help="the FUSE read file (0: no FUSE read benchmark)")
    parser.add_argument("--stargz-bin", help="a built stargz-grpc (else built into --work)")
    parser.add_argument("--scenarios", nargs="*", help="only these scenarios")
    parser.add_argument("--workloads", nargs="*",
                        help="only these workloads (echo-large, python, server, readall, and "
                        "with --debian deb-python, deb-http, deb-cc, deb-readall)")
    parser.add_argument("--debian", action="store_true",
                        help="add the workloads on a debootstrapped Debian bookworm image "
                        "(needs Debian's package registry the first time)")
    parser.add_argument("--debian-cache",
                        help="where the debootstrapped rootfs are kept (default: WORK/debian)")
    parser.add_argument("--tiny", action="store_true",
                        help="one 8 MB workload, one run, no shaping, no stargz: a smoke test")
    args = parser.parse_args()
    if args.tiny:
        args.runs, args.fuse_mb = 1, 16
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: run as root (network namespace, mounts, drop_caches)")
    # SIGTERM unwinds like Ctrl-C, so that processes, mounts and the namespace are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Bench(parse_args()).main()
