#!/usr/bin/python3
"""Shoal's cold-start benchmark (HelloBench style): workload images pulled and started through
containerd with overlayfs, stargz-snapshotter and Shoal, the registry in a network namespace
behind a shaped link, every cell the median of cold runs. Writes bench.md, bench.csv,
bench.png and fuse-read.md to the results folder.

    sudo scripts/bench/bench.py --bin-dir target/release --out bench-results
    sudo scripts/bench/bench.py --tiny --bin-dir target/debug --out /tmp/tiny   # smoke test

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
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
import link  # noqa: E402
import report  # noqa: E402

NAMESPACE = "bench"
CONTAINER = "bench-c"
STEP_TIMEOUT = 900
# Round trips before the first byte a container reads can arrive: TCP connect, manifest,
# config, then the first range (or blob) request.
LIMIT_ROUND_TRIPS = 4


def log(message):
    print(f"bench: {message}", flush=True)


def run(*args, timeout=STEP_TIMEOUT, check=True, **kw):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result.stdout


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


class Process:
    """A background process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


def wait_until(what, probe, process=None, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}; log "
                               f"{process.log_path}:\n{Path(process.log_path).read_text()[-3000:]}")
        if probe():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except OSError:
        return False


def unmount_under(prefix: Path):
    """Lazily unmounts whatever is still mounted below `prefix`, deepest first."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(prefix) or point.startswith(f"{prefix}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


class Scenario:
    """How one snapshotter pulls and starts an image. `image` is "plain" or "esgz"."""

    def __init__(self, name, snapshotter, image, daemon, note):
        self.name, self.snapshotter, self.image, self.daemon, self.note = \
            name, snapshotter, image, daemon, note


SCENARIOS = [
    Scenario("overlayfs", "overlayfs", "plain", None, "containerd's default, whole image"),
    Scenario("overlayfs-esgz", "overlayfs", "esgz", None, "eStargz image, unpacked whole"),
    Scenario("stargz", "stargz", "esgz", "stargz", "stargz-snapshotter 0.12 (Debian)"),
    Scenario("shoal", "shoal", "esgz", "shoal", "Shoal, lazy eStargz"),
    # Hooks for scenarios others are building: each is run when `available` finds what it
    # needs, and listed under "Not run" with the reason otherwise.
    Scenario("shoal-overlaybd", "shoal", "overlaybd", "shoal", "Shoal, lazy overlaybd"),
    Scenario("shoal-warm-peer", "shoal", "esgz", "shoal-peer", "Shoal, a warm peer"),
]


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.bins = Path(args.bin_dir).resolve()
        self.run_dir = self.work / "run"
        self.netns = None
        self.registry = None
        self.proxy = None
        self.stack = []
        self.metrics_port = None
        self.shoal_config = None
        # Whether images are also converted to overlaybd (for a scenario that uses them).
        self.overlaybd = False

    # -- registry and link -------------------------------------------------------------

    def start_registry(self):
        storage = self.work / "registry"
        if storage.exists():
            shutil.rmtree(storage)
        storage.mkdir(parents=True)
        if self.args.tiny:
            host, port, prefix = "127.0.0.1", free_port(), []
        else:
            self.netns = link.Netns()
            self.netns.create()
            host, port, prefix = link.NS_IP, 5000, self.netns.exec_prefix()
        config = storage / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {storage}/data\nhttp:\n  addr: {host}:{port}\n")
        self.registry = Process("docker-registry", prefix +
                                ["docker-registry", "serve", config],
                                self.work / "registry.log")
        self.proxy = link.DelayProxy((host, port), 0).start()
        wait_until("the registry", lambda: http_ok(f"http://{self.proxy.address()}/v2/"),
                   self.registry)

    def shape(self):
        if self.args.tiny:
            return
        self.netns.shape(self.args.bandwidth_mbit)
        self.proxy.one_way = self.args.rtt_ms / 2000.0

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
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
            f"docker://{base}:plain")
        run(self.bins / "shoal", "convert", "--plain-http", f"oci:{layout}:latest",
            f"{base}:esgz")
        references = {"plain": f"{base}:plain", "esgz": f"{base}:esgz"}
        if self.overlaybd:
            run(self.bins / "shoal", "convert", "--plain-http", "--format", "overlaybd",
                f"oci:{layout}:latest", f"{base}:obd")
            references["overlaybd"] = f"{base}:obd"
        return references, images.image_bytes(layout)

    # -- one cold run ------------------------------------------------------------------

    def start_stack(self, scenario):
        unmount_under(self.run_dir)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        proxies = ""
        if scenario.daemon == "shoal":
            self.metrics_port = free_port()
            self.shoal_config = self.run_dir / "shoal.toml"
            self.shoal_config.write_text(
                f'root = "{self.run_dir}/shoal"\nsocket = "{self.run_dir}/shoal.sock"\n'
                f'[cache]\ncapacity = "50GiB"\n'
                f'[registry.hosts."{self.proxy.address()}"]\nplain_http = true\n'
                f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n')
            daemon = Process("shoal-snapshotter", [self.bins / "shoal-snapshotter", "--config",
                                                   self.shoal_config],
                             self.run_dir / "shoal.log")
            self.stack.append(daemon)
            socket = self.run_dir / "shoal.sock"
            wait_until("shoal-snapshotter", socket.exists, daemon)
            proxies = f'[proxy_plugins.shoal]\n  type = "snapshot"\n  address = "{socket}"\n'
        elif scenario.daemon == "stargz":
            socket = self.run_dir / "stargz.sock"
            daemon = Process("stargz-grpc", [self.stargz_bin, "--address", socket, "--root",
                                             self.run_dir / "stargz"],
                             self.run_dir / "stargz.log")
            self.stack.append(daemon)
            wait_until("stargz-grpc", socket.exists, daemon)
            proxies = f'[proxy_plugins.stargz]\n  type = "snapshot"\n  address = "{socket}"\n'
        ctd = self.run_dir / "containerd"
        config = self.run_dir / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{ctd}/root"\nstate = "{ctd}/state"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{ctd}/c.sock"\n[ttrpc]\n  address = "{ctd}/t.sock"\n'
            + proxies)
        self.address = ctd / "c.sock"
        containerd = Process("containerd", ["containerd", "--config", config],
                             self.run_dir / "containerd.log")
        self.stack.append(containerd)
        wait_until("containerd", lambda: subprocess.run(
            ["ctr", "--address", self.address, "version"], capture_output=True).returncode == 0,
            containerd)

    def stop_stack(self):
        if self.stack and self.stack[-1].alive():
            for args in (["tasks", "kill", "-s", "SIGKILL", CONTAINER],
                         ["tasks", "delete", CONTAINER], ["containers", "delete", CONTAINER]):
                subprocess.run(["ctr", "--address", self.address, "-n", NAMESPACE, *args],
                               capture_output=True, timeout=60)
        for process in reversed(self.stack):
            process.stop()
        self.stack = []
        unmount_under(self.run_dir)

    def ctr(self, *args, **kw):
        return run("ctr", "--address", self.address, "-n", NAMESPACE, *args, **kw)

    def pull(self, scenario, reference):
        if scenario.daemon == "shoal":
            run(self.bins / "shoal", "--config", self.shoal_config, "rpull", "--address",
                self.address, "-n", NAMESPACE, "--plain-http", reference)
        elif scenario.daemon == "stargz":
            run("ctr-remote", "--address", self.address, "-n", NAMESPACE, "images", "rpull",
                "--plain-http", "--snapshotter", "stargz", reference)
        else:
            self.ctr("images", "pull", "--plain-http", reference)

    def start_and_wait(self, workload):
        """`ctr tasks start` until ready: the entrypoint's exit or its ready line."""
        task = subprocess.Popen(["ctr", "--address", str(self.address), "-n", NAMESPACE,
                                 "tasks", "start", CONTAINER], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output = []
        try:
            if workload.ready_line is None:
                out, _ = task.communicate(timeout=STEP_TIMEOUT)
                output.append(out)
                ready = time.monotonic()
            else:
                deadline = time.monotonic() + STEP_TIMEOUT
                ready = None
                for line in task.stdout:
                    output.append(line)
                    if line.strip() == workload.ready_line:
                        ready = time.monotonic()
                        break
                    if time.monotonic() > deadline:
                        break
                self.ctr("tasks", "kill", "-s", "SIGKILL", CONTAINER, check=False)
                task.wait(60)
                if ready is None:
                    raise RuntimeError(f"{workload.name} never printed its ready line")
        finally:
            if task.poll() is None:
                task.kill()
                task.wait()
        text = "".join(output)
        if workload.expect not in text:
            raise RuntimeError(f"{workload.name} printed {text!r}, not {workload.expect!r}")
        return ready

    def peer_bytes(self, scenario):
        if scenario.daemon != "shoal":
            return 0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith('shoal_read_bytes_total{source="peer"}'):
                    return int(float(line.split()[-1]))
        return 0

    def cold_run(self, workload, scenario, reference, number, needed):
        self.start_stack(scenario)
        try:
            drop_caches()
            before = self.proxy.downstream_bytes
            t0 = time.monotonic()
            self.pull(scenario, reference)
            t1 = time.monotonic()
            self.ctr("containers", "create", "--snapshotter", scenario.snapshotter, reference,
                     CONTAINER)
            t2 = time.monotonic()
            ready = self.start_and_wait(workload)
            row = {
                "workload": workload.name, "scenario": scenario.name, "run": number,
                "pull_s": round(t1 - t0, 3), "create_s": round(t2 - t1, 3),
                "ready_s": round(ready - t2, 3), "total_s": round(ready - t0, 3),
                "registry_bytes": self.proxy.downstream_bytes - before,
                "peer_bytes": self.peer_bytes(scenario),
                "needed_bytes": needed, "limit_s": round(self.limit_seconds(needed), 3),
            }
        finally:
            self.stop_stack()
        log(f"{workload.name} {scenario.name} #{number}: pull {row['pull_s']}s create "
            f"{row['create_s']}s ready {row['ready_s']}s total {row['total_s']}s, "
            f"{row['registry_bytes'] / 1e6:.1f} MB from the registry")
        return row

    # -- scenarios available here ----------------------------------------------------------

    def available(self, scenario):
        """None when `scenario` can run here, else why not."""
        if scenario.image == "overlaybd":
            help_text = run(self.bins / "shoal", "convert", "--help", check=False)
            if "overlaybd" not in help_text:
                return "shoal-overlaybd: `shoal convert` has no overlaybd output yet"
            self.overlaybd = True
        if scenario.daemon == "shoal-peer":
            return ("shoal-warm-peer: needs a second Shoal node with a warm cache as a peer, "
                    "which this single-node bench does not start yet")
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
        shoal = next(s for s in SCENARIOS if s.name == "shoal")
        self.start_stack(shoal)
        try:
            self.pull(shoal, references["esgz"])
            mounted = None
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    point, source = fields[4], fields[fields.index("-") + 2]
                    if (source.startswith("shoal:") and point.startswith(f"{self.run_dir}/")
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
            self.stop_stack()
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
                                     self.args.server_mb)
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
            fuse = self.fuse_read(self.args.fuse_mb)
        finally:
            self.stop_stack()
            if self.proxy:
                self.proxy.stop()
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


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    parser.add_argument("--fuse-mb", type=int, default=256, help="the FUSE read file")
    parser.add_argument("--stargz-bin", help="a built stargz-grpc (else built into --work)")
    parser.add_argument("--scenarios", nargs="*", help="only these scenarios")
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
