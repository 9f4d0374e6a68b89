"""The chart of `pydron bench --plot`: speed-up over sequential per workload and system,
and per-task time against graph size for the scale workload."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .peers import SYSTEMS  # noqa: E402


def plot(doc: dict, path: str) -> None:
    results = doc["results"]
    scale = [r for r in results if r["workload"] == "scale"]
    other = [r for r in results if r["workload"] != "scale"]
    workloads = list(dict.fromkeys(r["workload"] for r in other))
    systems = [s for s in SYSTEMS
               if any(r["system"] == s and r.get("median_s") for r in results)]
    fig, axes = plt.subplots(1, 2 if scale else 1, figsize=(14 if scale else 9, 5.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            r = next((r for r in other if r["workload"] == w and r["system"] == system), None)
            if r and r.get("speedup_vs_sequential"):
                xs.append(j + i * width)
                ys.append(r["speedup_vs_sequential"])
        bars = ax.bar(xs, ys, width, label=system,
                      edgecolor="black" if system == "pydron" else None)
        del bars
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over sequential (log)")
    ax.set_title(f"pydron bench — {doc['workers']} workers, "
                 f"{doc['machine'].get('cpu', doc['machine'].get('machine', ''))}"[:80],
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    if scale:
        ax2 = axes[0][1]
        for system in systems:
            pts = sorted((r["tasks"], r["us_per_task"]) for r in scale
                         if r["system"] == system and r.get("us_per_task"))
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=system,
                         linewidth=2.5 if system == "pydron" else 1.2)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("tasks in the graph")
        ax2.set_ylabel("µs per task (log)")
        ax2.set_title("scale: per-task time against graph size", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
