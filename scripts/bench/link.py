"""The benchmark's network link: a registry in its own network namespace behind a veth pair
shaped with `tc tbf` (this kernel has no netem), and a delaying TCP proxy in front of it that
adds the round-trip time and counts the bytes the registry sends.
"""

import asyncio
import subprocess
import threading
import time

NETNS = "shoalbench"
HOST_DEV, NS_DEV = "sb-host", "sb-reg"
HOST_IP, NS_IP = "10.231.0.1", "10.231.0.2"


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Netns:
    """A namespace with a veth pair to the host, both ends' egress limited to `mbit`."""

    def __init__(self):
        self.up = False

    def create(self):
        self.destroy()
        sh("ip", "netns", "add", NETNS)
        self.up = True
        sh("ip", "link", "add", HOST_DEV, "type", "veth", "peer", "name", NS_DEV)
        sh("ip", "link", "set", NS_DEV, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_DEV)
        sh("ip", "link", "set", HOST_DEV, "up")
        sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/30", "dev", NS_DEV)
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", NS_DEV, "up")
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")

    def shape(self, mbit: float):
        """Token-bucket limits on both directions; the registry's egress is what matters."""
        rate_bytes = mbit * 1e6 / 8
        # A burst of at least one timer tick's worth of bytes, or tbf cannot reach the rate.
        burst = max(int(rate_bytes / 100), 32 * 1024)
        tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]
        sh("tc", "qdisc", "replace", "dev", HOST_DEV, *tbf)
        sh("ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", NS_DEV, *tbf)

    def exec_prefix(self):
        return ["ip", "netns", "exec", NETNS]

    def destroy(self):
        sh("ip", "link", "del", HOST_DEV, check=False)
        sh("ip", "netns", "del", NETNS, check=False)
        self.up = False


class DelayProxy:
    """Forwards 127.0.0.1:<port> to `upstream`, delaying each direction by half the RTT without
    limiting throughput (chunks are timestamped on arrival and released when due), and counts
    the bytes coming back from upstream."""

    def __init__(self, upstream: tuple, rtt_ms: float):
        self.upstream = upstream
        self.one_way = rtt_ms / 2000.0
        self.downstream_bytes = 0
        # HTTP requests sent to the registry (request lines seen going up).
        self.requests = 0
        self.port = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay proxy did not start")
        return self

    def stop(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def address(self):
        return f"127.0.0.1:{self.port}"

    def _run(self):
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r, client_w):
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, asyncio.TimeoutError):
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, up_w, False),
                             self._pipe(up_r, client_w, True), return_exceptions=True)

    async def _pipe(self, reader, writer, downstream):
        queue = asyncio.Queue()

        async def release():
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(release())
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                if downstream:
                    self.downstream_bytes += len(data)
                else:
                    self.requests += sum(data.count(m) for m in (b"GET /", b"HEAD /"))
                await queue.put((time.monotonic() + self.one_way, data))
        except ConnectionError:
            pass
        finally:
            await queue.put((0, None))
            try:
                await sender
            except ConnectionError:
                pass
