"""``mixsd-edit bench``: the memorisation-retention benchmark (top layer, next to the CLI).

    mixsd-edit bench [run] --methods MixSD,ROME,MEMIT,FT-M,SFT --data PATH --n 100 --mode batch \\
                           --retention --out results/bench/cf-batch-100
    mixsd-edit bench --methods ROME,MEMIT,FT-M,SFT --sweep-lambda 0,0.1,0.3,0.5,0.7,1.0 ...
    mixsd-edit bench plot tradeoff DIR/summary.json [...] --out tradeoff.png
    mixsd-edit bench plot curve n1/summary.json n10/summary.json [...] --out edits_curve.png

The runner lives in :mod:`mixsd_edit.bench.runner`, the per-method variants in
:mod:`mixsd_edit.bench.spec`, aggregation and the Markdown table in :mod:`mixsd_edit.bench.report`,
the plots (matplotlib, the ``bench`` extra) in :mod:`mixsd_edit.bench.plot`. The command-line entry
points (argument parsing, printing) are ``mixsd_edit.cli.bench_main``; nothing else in the package
imports this one.
"""
from __future__ import annotations
