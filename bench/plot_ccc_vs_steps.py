"""CCC against sampling steps, from an ``ltdiffpp evaluate`` run whose candidates are named "<CURVE>[,] <N> steps".

    .venv/bin/python bench/plot_ccc_vs_steps.py RUN_DIR/results.json OUT.png

One line per solver (and precision): mean CCC over all features; per paper class as thin lines for the
curve with the most points. The default step
count of a model is chosen from this curve (docs/RESULTS.md).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def plot(methods: dict, out: Path) -> Path:
    """The curves of the ``methods`` of a results.json named "<CURVE>[,] <N> steps" into ``out`` (PNG)."""
    curves: dict[str, list[tuple[int, dict]]] = {}
    for name, m in methods.items():
        hit = re.fullmatch(r"(.+?),? (\d+) steps", name)
        if hit:
            curves.setdefault(hit.group(1), []).append((int(hit.group(2)), m["summary"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    # the mean over all features for every curve; per paper class (thin) for the curve with most points
    main = max(curves, key=lambda c: (len(curves[c]), c == "DPM++(2M)")) if curves else None
    for solver, pts in sorted(curves.items()):
        pts.sort()
        steps = [s for s, _ in pts]
        ax.plot(steps, [summ["all"]["all"]["mean"] for _, summ in pts], "o-", lw=2, label=f"{solver}: all features")
        if solver == main:
            for cls in pts[0][1]["paper"]:
                ax.plot(steps, [summ["paper"][cls]["mean"] for _, summ in pts], lw=0.8, alpha=0.6,
                        label=f"{solver}: {cls}")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("Lin's CCC (mean over features)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({s for pts in curves.values() for s, _ in pts}), minor=False)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    print(plot(json.loads(results.read_text())["methods"], out))


if __name__ == "__main__":
    main()
