"""CCC against sampling steps, from an ``ltdiffpp evaluate`` run whose candidates are named "<CURVE>[,] <N> steps".

    .venv/bin/python bench/plot_ccc_vs_steps.py RUN_DIR/results.json OUT.png

One line per solver: mean CCC over all features, and per paper class as thin lines. The default step
count of a model is chosen from this curve (docs/RESULTS.md).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main() -> None:
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    methods = json.loads(results.read_text())["methods"]
    curves: dict[str, list[tuple[int, dict]]] = {}
    for name, m in methods.items():
        hit = re.fullmatch(r"(.+?),? (\d+) steps", name)
        if hit:
            curves.setdefault(hit.group(1), []).append((int(hit.group(2)), m["summary"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, pts in sorted(curves.items()):
        pts.sort()
        steps = [s for s, _ in pts]
        ax.plot(steps, [summ["all"]["all"]["mean"] for _, summ in pts], "o-", lw=2, label=f"{solver}: all features")
        for cls in pts[0][1]["paper"]:
            ax.plot(steps, [summ["paper"][cls]["mean"] for _, summ in pts], lw=0.8, alpha=0.6,
                    label=f"{solver}: {cls}" if len(pts) > 1 else None)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("Lin's CCC (mean over features)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({s for pts in curves.values() for s, _ in pts}), minor=False)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, ncol=2, loc="lower center")
    fig.tight_layout(rect=(0, 0.1 + 0.03 * len(curves), 1, 1))
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
