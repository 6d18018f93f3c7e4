"""The benchmark's outputs: per-run CSV, a Markdown summary (median, min, max of every
measure, with the physical limit beside it) and a PNG chart, all in the results folder."""

import csv
import statistics
from pathlib import Path

FIELDS = ["workload", "scenario", "run", "pull_s", "create_s", "ready_s", "total_s",
          "registry_bytes", "peer_bytes", "needed_bytes", "limit_s", "requests",
          "daemon_cpu_s", "daemon_peak_rss_mb"]
MEASURES = [("pull_s", "pull s"), ("create_s", "create s"), ("ready_s", "start→ready s"),
            ("total_s", "total s")]


def write_csv(rows: list, path: Path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in FIELDS})


def groups(rows: list) -> list:
    """Rows grouped by (workload, scenario), in first-seen order."""
    seen = {}
    for row in rows:
        seen.setdefault((row["workload"], row["scenario"]), []).append(row)
    return list(seen.items())


def spread(values: list, scale: float = 1.0, digits: int = 2) -> str:
    values = [v / scale for v in values]
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write_markdown(rows: list, settings: dict, skipped: list, path: Path):
    lines = [f"Link: {settings['link']}. Runs per cell: {settings['runs']} cold runs "
             "(containerd content and snapshots, snapshotter state and caches, page cache "
             "dropped). Cells: median (min–max).", ""]
    header = ["workload", "scenario"] + [label for _, label in MEASURES] + \
        ["registry MB", "peer MB", "requests", "daemon CPU s", "daemon peak RSS MB",
         "limit s (needed MB)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for (workload, scenario), runs in groups(rows):
        cells = [workload, scenario]
        cells += [spread([r[key] for r in runs]) for key, _ in MEASURES]
        cells.append(spread([r["registry_bytes"] for r in runs], 1e6, 1))
        cells.append(spread([r["peer_bytes"] for r in runs], 1e6, 1))
        cells.append(spread([r["requests"] for r in runs], 1, 0))
        for key in ("daemon_cpu_s", "daemon_peak_rss_mb"):
            measured = [r[key] for r in runs if r[key] != ""]
            cells.append(spread(measured, 1, 2 if key == "daemon_cpu_s" else 1)
                         if measured else "")
        first = runs[0]
        cells.append(f"{first['limit_s']:.2f} ({first['needed_bytes'] / 1e6:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    path.write_text("\n".join(lines) + "\n")


def write_chart(rows: list, settings: dict, path: Path):
    """Stacked medians (pull, create, start→ready) per workload and scenario, min–max of the
    total as error bars, the physical limit as a marker. Skipped, saying so, without
    matplotlib: the tables are the results, the chart a view of them."""
    try:
        import matplotlib
    except ImportError:
        print(f"bench: no chart ({path.name}): matplotlib is not installed", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(rows)
    workloads = list(dict.fromkeys(w for (w, _), _ in grouped))
    scenarios = list(dict.fromkeys(s for (_, s), _ in grouped))
    width = 0.8 / max(len(scenarios), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(workloads)), 4.5), dpi=110)
    colors = {"pull_s": "#4c72b0", "create_s": "#dd8452", "ready_s": "#55a868"}
    for si, scenario in enumerate(scenarios):
        for wi, workload in enumerate(workloads):
            runs = dict(grouped).get((workload, scenario))
            if not runs:
                continue
            x = wi + (si - (len(scenarios) - 1) / 2) * width
            bottom = 0.0
            for key in ("pull_s", "create_s", "ready_s"):
                value = statistics.median(r[key] for r in runs)
                ax.bar(x, value, width * 0.9, bottom=bottom, color=colors[key],
                       label=key if si == 0 and wi == 0 else None)
                bottom += value
            totals = [r["total_s"] for r in runs]
            med = statistics.median(totals)
            ax.errorbar(x, med, yerr=[[med - min(totals)], [max(totals) - med]],
                        color="black", capsize=3, linewidth=1)
            ax.text(x, max(totals), scenario, rotation=90, ha="center", va="bottom",
                    fontsize=7)
            ax.plot(x, runs[0]["limit_s"], marker="_", markersize=14, color="red",
                    label="physical limit" if si == 0 and wi == 0 else None)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads)
    ax.set_ylabel("seconds (median; bars: min–max total)")
    ax.set_title(f"Cold start: {settings['link']}")
    ax.margins(y=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_fuse(results: dict, path: Path):
    lines = ["| read pattern | Shoal FUSE MB/s | local disk MB/s | ratio |", "|---|---|---|---|"]
    for pattern, (fuse, local) in results.items():
        lines.append(f"| {pattern} | {fuse:.1f} | {local:.1f} | {fuse / local:.2f} |")
    path.write_text("\n".join(lines) + "\n")
