"""Efficacy vs retention from benchmark summaries (MixSD λ sweep joined, other methods as fixed points).

    python benchmarks/plot_tradeoff.py results/bench/sweep/summary.json --out tradeoff.png
    python benchmarks/plot_tradeoff.py curve n1/summary.json n10/summary.json n100/summary.json --out curve.png

Same as ``mixsd-edit bench plot tradeoff|curve ...``; without a leading ``tradeoff``/``curve`` it
draws the trade-off plot.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsd_edit.cli import bench_plot_main as main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("tradeoff", "curve", "-h", "--help"):
        argv = ["tradeoff", *argv]
    sys.exit(main(argv))
