#!/usr/bin/python3
"""The medians table of a bench run, made from its log (the `bench: <workload> <scenario> #N:`
lines bench.py prints per cold run): for a run that stopped before writing bench.md, or to
compare runs of several invocations.

    scripts/bench/log_table.py RUN.log [RUN2.log ...] [--needed deb-python=4.32 ...]
                               [--bandwidth-mbit 100] [--rtt-ms 20]
"""

import argparse
import re
import statistics

RUN = re.compile(r"bench: (\S+) (\S+) #(\d+): pull ([\d.]+)s create ([\d.]+)s ready ([\d.]+)s "
                 r"total ([\d.]+)s, ([\d.]+) MB from the registry")
# Round trips before the first byte a container reads can arrive (as in bench.py).
LIMIT_ROUND_TRIPS = 4


def runs(paths):
    """(workload, scenario) -> [(pull, create, ready, total, registry MB)], in first-seen order."""
    found = {}
    for path in paths:
        with open(path) as log:
            for line in log:
                m = RUN.match(line)
                if m:
                    found.setdefault((m.group(1), m.group(2)), []).append(
                        tuple(float(m.group(i)) for i in range(4, 9)))
    return found


def cell(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--needed", nargs="*", default=[],
                        help="WORKLOAD=MB: gzip bytes its entrypoint reads (the limit column)")
    parser.add_argument("--bandwidth-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    args = parser.parse_args()
    needed = {k: float(v) for k, v in (item.split("=", 1) for item in args.needed)}
    rate = args.bandwidth_mbit / 8
    found = runs(args.logs)
    total = {key: statistics.median(v[3] for v in values) for key, values in found.items()}
    print("| workload | scenario | runs | pull s | start→ready s | total s | registry MB "
          "| x overlayfs | x stargz | limit s (needed MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (workload, scenario), values in found.items():
        ratio = {base: (f"{total[(workload, scenario)] / total[(workload, base)]:.2f}"
                        if (workload, base) in total else "") for base in ("overlayfs", "stargz")}
        limit = ""
        if workload in needed:
            seconds = needed[workload] / rate + LIMIT_ROUND_TRIPS * args.rtt_ms / 1000
            limit = f"{seconds:.2f} ({needed[workload]:.1f})"
        print(f"| {workload} | {scenario} | {len(values)} | {cell([v[0] for v in values])} "
              f"| {cell([v[2] for v in values])} | {cell([v[3] for v in values])} "
              f"| {statistics.median(v[4] for v in values):.1f} | {ratio['overlayfs']} "
              f"| {ratio['stargz']} | {limit} |")


if __name__ == "__main__":
    main()
