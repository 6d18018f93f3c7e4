"""One node of the benchmark: a snapshotter daemon (Shoal or stargz-snapshotter) when the
scenario has one, and containerd with its own root, state and sockets, everything under the
node's run folder so that each cold run starts from nothing. The warm-peer scenario runs two.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NAMESPACE = "bench"
CONTAINER = "bench-c"
STEP_TIMEOUT = 900


def run(*args, timeout=STEP_TIMEOUT, check=True, **kw):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result.stdout


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

    def usage(self):
        """(CPU seconds, peak RSS bytes) of the process so far, from /proc; None once gone."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        peak = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                     if line.startswith("VmHWM:")), 0)
        return cpu, peak

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


def free_port(host="127.0.0.1"):
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Node:
    """A containerd and its snapshotter daemon under `run_dir`, talking to the registry at
    `registry` (host:port, plain HTTP)."""

    def __init__(self, name, run_dir: Path, bins: Path, registry: str):
        self.name, self.run_dir, self.bins, self.registry = name, run_dir, bins, registry
        self.stack = []
        self.address = None
        self.metrics_port = None
        self.shoal_config = None
        self.daemon = None

    def start(self, daemon, stargz_bin=None, peers=None, shoal_extra=""):
        """`daemon`: None, "shoal" or "stargz". `peers`: (listen, [every member]) for a
        `[peers]` section in Shoal's configuration. `shoal_extra`: Shoal TOML placed right
        after `[cache]`'s capacity: more `[cache]` keys, then any sections not written here."""
        self.clear()
        self.run_dir.mkdir(parents=True)
        self.daemon = daemon
        # The snapshotter daemon's process (Shoal's or stargz's), for its CPU and memory.
        self.daemon_process = None
        proxies = ""
        if daemon == "shoal":
            self.metrics_port = free_port()
            self.shoal_config = self.run_dir / "shoal.toml"
            text = (f'root = "{self.run_dir}/shoal"\nsocket = "{self.run_dir}/shoal.sock"\n'
                    f'[cache]\ncapacity = "50GiB"\n{shoal_extra}'
                    f'[registry.hosts."{self.registry}"]\nplain_http = true\n'
                    f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n'
                    # Every run starts from nothing: no connection kept for the next one, and
                    # nothing left in (or taken from) the node's own fd holder.
                    f'[handover]\nenabled = false\n')
            if peers:
                listen, members = peers
                listed = ", ".join(f'"{m}"' for m in members)
                text += (f'[peers]\nlisten = "{listen}"\nstatic = [{listed}]\n'
                         f'probe_interval_ms = 200\n')
            self.shoal_config.write_text(text)
            process = Process(f"shoal-snapshotter ({self.name})",
                              [self.bins / "shoal-snapshotter", "--config", self.shoal_config],
                              self.run_dir / "shoal.log")
            self.stack.append(process)
            self.daemon_process = process
            socket = self.run_dir / "shoal.sock"
            wait_until("shoal-snapshotter", socket.exists, process)
            proxies = f'[proxy_plugins.shoal]\n  type = "snapshot"\n  address = "{socket}"\n'
        elif daemon == "stargz":
            socket = self.run_dir / "stargz.sock"
            process = Process("stargz-grpc", [stargz_bin, "--address", socket, "--root",
                                              self.run_dir / "stargz"],
                              self.run_dir / "stargz.log")
            self.stack.append(process)
            self.daemon_process = process
            wait_until("stargz-grpc", socket.exists, process)
            proxies = f'[proxy_plugins.stargz]\n  type = "snapshot"\n  address = "{socket}"\n'
        ctd = self.run_dir / "containerd"
        config = self.run_dir / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{ctd}/root"\nstate = "{ctd}/state"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{ctd}/c.sock"\n[ttrpc]\n  address = "{ctd}/t.sock"\n'
            + proxies)
        self.address = ctd / "c.sock"
        containerd = Process(f"containerd ({self.name})", ["containerd", "--config", config],
                             self.run_dir / "containerd.log")
        self.stack.append(containerd)
        wait_until("containerd", lambda: subprocess.run(
            ["ctr", "--address", self.address, "version"], capture_output=True).returncode == 0,
            containerd)

    def clear(self):
        unmount_under(self.run_dir)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)

    def stop(self):
        if self.stack and self.stack[-1].alive():
            self.remove_container()
        for process in reversed(self.stack):
            process.stop()
        self.stack = []
        unmount_under(self.run_dir)

    def remove_container(self):
        for args in (["tasks", "kill", "-s", "SIGKILL", CONTAINER],
                     ["tasks", "delete", CONTAINER], ["containers", "delete", CONTAINER]):
            subprocess.run(["ctr", "--address", self.address, "-n", NAMESPACE, *args],
                           capture_output=True, timeout=60)

    def ctr(self, *args, **kw):
        return run("ctr", "--address", self.address, "-n", NAMESPACE, *args, **kw)

    def pull(self, reference):
        if self.daemon == "shoal":
            run(self.bins / "shoal", "--config", self.shoal_config, "rpull", "--address",
                self.address, "-n", NAMESPACE, "--plain-http", reference)
        elif self.daemon == "stargz":
            run("ctr-remote", "--address", self.address, "-n", NAMESPACE, "images", "rpull",
                "--plain-http", "--snapshotter", "stargz", reference)
        else:
            self.ctr("images", "pull", "--plain-http", reference)

    def create(self, snapshotter, reference):
        self.ctr("containers", "create", "--snapshotter", snapshotter, reference, CONTAINER)

    def start_and_wait(self, workload):
        """`ctr tasks start` until ready: the entrypoint's exit or its ready line.

        The task's output goes to a file (`--log-uri`), not through ctr's FIFOs: a task that
        exits at once can lose what it printed on the FIFO path, which reads as a workload
        that printed nothing."""
        log = self.run_dir / "task-output.log"
        log.unlink(missing_ok=True)
        task = subprocess.Popen(["ctr", "--address", str(self.address), "-n", NAMESPACE,
                                 "tasks", "start", "--log-uri", f"file://{log}", CONTAINER],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        read = lambda: log.read_text(errors="replace") if log.exists() else ""
        try:
            if workload.ready_line is None:
                task.communicate(timeout=STEP_TIMEOUT)
                ready = time.monotonic()
            else:
                deadline = time.monotonic() + STEP_TIMEOUT
                ready = None
                while time.monotonic() < deadline:
                    if workload.ready_line in (line.strip() for line in read().splitlines()):
                        ready = time.monotonic()
                        break
                    if task.poll() is not None:
                        break
                    time.sleep(0.005)
                self.ctr("tasks", "kill", "-s", "SIGKILL", CONTAINER, check=False)
                task.wait(60)
                if ready is None:
                    raise RuntimeError(f"{workload.name} never printed its ready line: {read()!r}")
        finally:
            if task.poll() is None:
                task.kill()
                task.wait()
        text = read()
        if workload.expect not in text:
            raise RuntimeError(f"{workload.name} printed {text!r}, not {workload.expect!r}")
        return ready

    def metric(self, series):
        """The value of one series (name with its labels) on Shoal's `/metrics`, 0 if absent."""
        if self.daemon != "shoal":
            return 0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(series + " "):
                    return int(float(line.split()[-1]))
        return 0

    def peer_bytes(self):
        return self.metric('shoal_read_bytes_total{source="peer"}')

    def peers_live(self):
        """Members answering their probes, this node itself included (0 while the metrics
        endpoint is not up yet)."""
        try:
            return self.metric('shoal_peer_members{state="live"}')
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit("node.py is a module of bench.py")
