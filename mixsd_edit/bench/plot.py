"""Plots from benchmark ``summary.json`` files (matplotlib, Agg backend; the ``bench`` extra).

* ``tradeoff``: efficacy vs retention, one point per row. MixSD rows are joined in order of their
  ``mix_lambda`` and labelled with it (the λ sweep); other methods are fixed, marked points; the
  unedited model is a grey star. Several summaries can be drawn together (their mode and n tag the
  labels when they differ).
* ``curve``: efficacy, locality and retention against the number of edits, one line per row label
  and mode, from summaries of runs with different ``--n`` (sequential runs dashed). A ``single``-mode
  run is its label's point at one edit on the batch line (each model there holds one edit; its scores
  are means over the run's cases, not one case).

Efficacy: ROME's ES (share of requests with P(new) > P(true)) when the summaries have CounterFact
scores, else rewrite_acc. Retention: known-fact retention (post/pre), else WikiText-2 perplexity
retention (pre/post, so higher is better), else exp(-KL(base||edited)). The axis labels say which.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

MARKERS = {"ROME": "s", "MEMIT": "^", "FT-M": "D", "FT-L": "v", "SFT": "X"}
EFFICACY_LABELS = {"es": "ES: share of requests with P(new) > P(true)",
                   "rewrite_acc": "rewrite_acc (teacher-forced token accuracy)"}
RETENTION_LABELS = {"known_facts": "known-fact retention (post/pre)",
                    "perplexity": "WikiText-2 perplexity retention (pre/post ppl)",
                    "kl": "exp(-KL(base || edited)), nats/token"}


class PlotError(ValueError):
    """Nothing to plot, or an unreadable summary."""


def load_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """Read summary.json files (a folder means its summary.json)."""
    out = []
    for p in map(Path, paths):
        f = p / "summary.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"benchmark summary not found: {f}")
        s = json.loads(f.read_text())
        if "rows" not in s or "labels" not in s:
            raise PlotError(f"{f} is not a benchmark summary (no 'rows'/'labels')")
        out.append(s)
    return out


def _mean(agg: Mapping[str, Any] | None) -> float | None:
    return None if not agg else agg.get("mean")


def efficacy(row: Mapping[str, Any], key: str) -> float | None:
    if row.get("status") != "ok":
        return None
    stage = "pre" if row["kind"] == "unedited" else "post"
    if key == "es":
        return _mean(((row.get("counterfact") or {}).get(stage) or {}).get("efficacy_score"))
    return _mean((row.get(stage) or {}).get(key))


def locality(row: Mapping[str, Any]) -> float | None:
    if row.get("status") != "ok":
        return None
    if row["kind"] == "unedited":
        return 1.0
    return _mean((row.get("post") or {}).get("locality"))


def retention(row: Mapping[str, Any], suite: str) -> float | None:
    """Higher is better for every suite: known facts post/pre, ppl pre/post, exp(-KL)."""
    if row.get("status") != "ok":
        return None
    r = (row.get("retention") or {}).get(suite)
    if r is None:
        return None
    if row["kind"] == "unedited":
        return 1.0
    if suite == "kl":
        kl = _mean(r.get("post"))
        return None if kl is None else math.exp(-kl)
    ratio = _mean(r.get("ratio"))
    if ratio is None:
        return None
    return 1.0 / ratio if suite == "perplexity" and ratio > 0 else ratio


def _method_rows(summaries) -> list[tuple[dict, dict]]:
    return [(s, s["rows"][label]) for s in summaries for label in s["labels"]]


def choose(kind: str, wanted: str, summaries) -> str:
    """The first candidate metric that at least one method row has (or ``wanted`` if given)."""
    candidates = list(EFFICACY_LABELS if kind == "efficacy" else RETENTION_LABELS)
    get: Callable = efficacy if kind == "efficacy" else retention
    if wanted != "auto":
        if wanted not in candidates:
            raise PlotError(f"unknown {kind} metric '{wanted}'; choose auto or one of {candidates}")
        return wanted
    for key in candidates:
        if any(get(row, key) is not None for _, row in _method_rows(summaries) if row["kind"] == "method"):
            return key
    raise PlotError(f"no method row of the summaries has a {kind} metric ({candidates}); "
                    + ("run the benchmark with --retention" if kind == "retention" else "nothing was scored"))


def _tags(summaries) -> list[str]:
    tags = [f"{s['mode']}, n={s['n']}" for s in summaries]
    return tags if len(set(tags)) > 1 else [""] * len(summaries)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(summaries: Sequence[dict], out: str | Path, efficacy_metric: str = "auto",
                  retention_metric: str = "auto", swap_axes: bool = False, title: str | None = None) -> dict:
    """Efficacy vs retention (x = retention unless ``swap_axes``). Returns what was drawn."""
    eff_key = choose("efficacy", efficacy_metric, summaries)
    ret_key = choose("retention", retention_metric, summaries)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    xy = (lambda e, r: (e, r)) if swap_axes else (lambda e, r: (r, e))
    tags = _tags(summaries)
    names = sorted({row["method"] for _, row in _method_rows(summaries) if row["kind"] == "method"})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    drawn, on_lines, unedited_done = 0, 0, False
    for s, tag in zip(summaries, tags):
        suffix = f" ({tag})" if tag else ""
        sweep = []
        for label in s["labels"]:
            row = s["rows"][label]
            e, r = efficacy(row, eff_key), retention(row, ret_key)
            if e is None or r is None:
                continue
            x, y = xy(e, r)
            if row["kind"] == "unedited":
                ax.scatter([x], [y], marker="*", s=160, color="grey", zorder=3,
                           label=None if unedited_done else "unedited model")
                unedited_done = True
            elif row["method"] == "MixSD" and row.get("sweep", {"param": "mix_lambda"}) is not None \
                    and "mix_lambda" in (row.get("hparams") or {}):  # λ-sweep points (older summaries lack "sweep")
                sweep.append((row["hparams"]["mix_lambda"], x, y))
            else:
                ax.scatter([x], [y], marker=MARKERS.get(row["method"], "P"), s=70, color=colors[row["method"]],
                           zorder=3, label=label + suffix)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
            drawn += 1
        if sweep:
            on_lines += len(sweep)
            sweep.sort()
            ax.plot([p[1] for p in sweep], [p[2] for p in sweep], "-o", color=colors.get("MixSD", "C0"), zorder=2,
                    label="MixSD, λ = P(naive token)" + suffix)
            for lam, x, y in sweep:
                ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if not drawn:
        raise PlotError(f"no row has both {eff_key} and {ret_key}")
    ex, rx = EFFICACY_LABELS[eff_key] + " ↑", RETENTION_LABELS[ret_key] + " ↑"
    ax.set_xlabel(ex if swap_axes else rx)
    ax.set_ylabel(rx if swap_axes else ex)
    s0 = summaries[0]
    ax.set_title(title or f"Efficacy vs retention · {s0['model']} · {Path(str(s0['data'])).name}"
                 + ("" if tags[0] else f" · {s0['mode']}, n={s0['n']}"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return {"efficacy": eff_key, "retention": ret_key, "points": drawn, "sweep_points": on_lines, "out": str(out)}


def plot_edit_curve(summaries: Sequence[dict], out: str | Path, efficacy_metric: str = "auto",
                    retention_metric: str = "auto", title: str | None = None) -> dict:
    """Efficacy, locality and retention vs number of edits, one line per (row label, mode)."""
    eff_key = choose("efficacy", efficacy_metric, summaries)
    try:
        ret_key = choose("retention", retention_metric, summaries)
    except PlotError:
        ret_key = None  # the retention panel stays empty and says why
    series: dict[tuple[str, str], list[tuple[int, Any, Any, Any]]] = {}
    for s, row in _method_rows(summaries):
        if row["kind"] != "method" or row.get("status") != "ok":
            continue
        single = row["mode"] == "single"
        series.setdefault((row["label"], "batch" if single else row["mode"]), []).append(
            (1 if single else s["n"], efficacy(row, eff_key), locality(row),
             retention(row, ret_key) if ret_key else None))
    if not series:
        raise PlotError("no method row to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [EFFICACY_LABELS[eff_key], "locality (argmax agreement with base)",
              RETENTION_LABELS[ret_key] if ret_key else "retention (not measured: run with --retention)"]
    ns = sorted({p[0] for pts in series.values() for p in pts})
    colors = {label: f"C{i % 10}" for i, label in enumerate(sorted({k[0] for k in series}))}
    for (label, mode), pts in sorted(series.items()):
        pts.sort()
        for k, ax in enumerate(axes, start=1):
            xs = [p[0] for p in pts if p[k] is not None]
            ys = [p[k] for p in pts if p[k] is not None]
            if xs:
                ax.plot(xs, ys, "--" if mode == "sequential" else "-", marker=MARKERS.get(label, "o"),
                        color=colors[label], label=f"{label} ({mode})")
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("number of edits")
        if ns and ns[-1] / max(ns[0], 1) >= 10:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    s0 = summaries[0]
    fig.suptitle(title or f"Number of edits · {s0['model']} · {Path(str(s0['data'])).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return {"efficacy": eff_key, "retention": ret_key, "series": len(series), "n": ns, "out": str(out),
            "table": curve_table(series, ns)}


def curve_table(series: Mapping[tuple[str, str], list[tuple]], ns: Sequence[int]) -> str:
    """The plotted points as Markdown: one row per (label, mode), one column per number of edits, each cell
    'efficacy / locality / retention' ('-' where a value is missing, empty where the run has no point)."""
    def cell(p):
        return " / ".join("-" if v is None else f"{v:.2f}" for v in p[1:])
    lines = ["| method (mode) | " + " | ".join(f"{n} edit{'s' if n > 1 else ''}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for (label, mode), pts in sorted(series.items()):
        at = {p[0]: p for p in pts}
        lines.append(f"| {label} ({mode}) | " + " | ".join(cell(at[n]) if n in at else "" for n in ns) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixsd-edit bench plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    for kind, helptext in (("tradeoff", "efficacy vs retention, MixSD λ points joined"),
                           ("curve", "efficacy / locality / retention vs number of edits")):
        sp = sub.add_parser(kind, help=helptext)
        sp.add_argument("summaries", nargs="+", help="summary.json files or benchmark output folders")
        sp.add_argument("--out", required=True, help="PNG file to write")
        sp.add_argument("--efficacy", default="auto", help=f"auto or one of {list(EFFICACY_LABELS)}")
        sp.add_argument("--retention", default="auto", help=f"auto or one of {list(RETENTION_LABELS)}")
        sp.add_argument("--title", default=None)
        if kind == "tradeoff":
            sp.add_argument("--swap-axes", action="store_true", help="efficacy on x, retention on y")
    return p
