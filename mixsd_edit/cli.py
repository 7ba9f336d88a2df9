"""``mixsd-edit``: edit a model with a registered method and report EasyEdit metrics.

With no arguments it edits the shipped hand-written CounterFact sample on the offline SmolLM2 with
MixSD (single edits, restored after each) and prints a summary table.

Benchmarks (methods x data x mode, retention, lambda sweep, plots): ``mixsd-edit bench --help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

DEFAULT_MODEL = "smollm2-135m-instruct"


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects key=value, got '{it}'")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixsd-edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="MixSD", help="registered method (alg_name), default MixSD")
    p.add_argument("--model", default=None, help=f"offline alias, local path or hub name (default: the hparams' "
                                                  f"model_name, else {DEFAULT_MODEL})")
    p.add_argument("--hparams", default=None, help="hparams YAML (default: hparams/<method>/<model>.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override hparams fields")
    p.add_argument("--data", default=os.environ.get("MIXSD_EDIT_DATA", "sample"),
                   help="requests file (CounterFact EasyEdit/ROME form, ZsRE MEND form) or 'sample' "
                        "(default; env MIXSD_EDIT_DATA)")
    p.add_argument("--format", default="auto", help="data format: auto|counterfact|counterfact_rome|zsre")
    p.add_argument("--n", type=int, default=None, help="number of requests (default: all)")
    p.add_argument("--start", type=int, default=0, help="index of the first request")
    p.add_argument("--mode", choices=("single", "batch", "sequential"), default="single",
                   help="single: one edit at a time, restored after each; batch: chunks of hparams.batch_size; "
                        "sequential: edits accumulate")
    p.add_argument("--out", default=None, help="write one JSON per case, summary.json and hparams.yaml here")
    p.add_argument("--no-generation", action="store_true", help="skip generation-based exact match")
    p.add_argument("--fluency", action="store_true", help="also score n-gram entropy of generated text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MIXSD_EDIT_THREADS", "1")),
                   help="torch CPU threads (default 1, env MIXSD_EDIT_THREADS: on a small shared CPU one "
                        "thread was several times faster than two for these short sequences)")
    return p


def _resolve_hparams(args):
    from mixsd_edit.hparams import resolve_hparams_path
    from mixsd_edit.methods import get_method

    method = get_method(args.method)
    path = Path(args.hparams) if args.hparams else resolve_hparams_path(args.method, args.model or DEFAULT_MODEL)
    hp = method.hparams_cls.from_hparams(path)
    overrides = _parse_set(args.set)
    if overrides:
        hp = method.hparams_cls.from_dict({**hp.to_dict(), **overrides}, source=f"{path} with --set")
    return hp, path


def format_summary(summary: dict) -> str:
    """A plain-text table: metric | pre | post (mean ± 95% CI), then MixSD target statistics."""
    keys = sorted(set(summary.get("pre", {})) | set(summary.get("post", {})))
    rows = [("metric", "pre", "post")]

    def cell(d):
        if not d or d.get("mean") is None:
            return "-"
        return f"{d['mean']:.3f} ± {d['ci95']:.3f}"

    for k in keys:
        rows.append((k, cell(summary["pre"].get(k)), cell(summary["post"].get(k))))
    w = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [" | ".join(r[c].ljust(w[c]) for c in range(3)) for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    head = f"{summary.get('method')} · mode={summary.get('mode')} · n={summary['n_cases']}"
    out = [head, *lines]
    if "mixsd" in summary:
        m = summary["mixsd"]
        out.append(f"MixSD targets: fallback share {m['fallback_share']:.3f} {m['fallback_counts']}, "
                   f"mean naive fraction {m['mean_naive_fraction']:.3f}, mean attempts {m['mean_attempts']:.2f}, "
                   f"mean target tokens {m['mean_target_tokens']:.1f}")
    if "edit_time_s" in summary:
        out.append(f"edit time per apply call: {summary['edit_time_s']['mean']:.2f} s")
    out.append(f"model state: {summary.get('model_state')}")
    out.append("protocols: " + "; ".join(f"{k}: {v}" for k, v in summary["protocols"].items()
                                          if k in keys))
    return "\n".join(out)


def run_edit(args) -> dict:
    import torch

    from mixsd_edit.data.loaders import load_requests
    from mixsd_edit.editor import BaseEditor
    from mixsd_edit.models import load_model_and_tokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hp, hp_path = _resolve_hparams(args)
    requests = load_requests(args.data, n=args.n, start=args.start, fmt=args.format)
    model, tok = load_model_and_tokenizer(args.model or hp.model_name, device=hp.device)
    editor = BaseEditor(model, tok, hp, generation_eval=not args.no_generation, fluency=args.fluency,
                        progress=not args.quiet)
    if args.mode == "batch":
        records, _, _ = editor.batch_edit(requests)
    else:
        records, _, _ = editor.edit_requests(requests, sequential_edit=args.mode == "sequential")
    summary = dict(editor.last_summary)
    summary.update(data=str(args.data), start=args.start, hparams_file=str(hp_path),
                   hparams_fingerprint=hp.fingerprint())
    if args.out:
        out = Path(args.out)
        (out / "cases").mkdir(parents=True, exist_ok=True)
        for r in records:
            (out / "cases" / f"case_{r['case_id']:05d}.json").write_text(json.dumps(r, indent=1, default=str))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "hparams.yaml").write_text(hp.to_yaml())
    print(format_summary(summary))
    if args.out:
        print(f"wrote {len(records)} case files, summary.json and hparams.yaml to {args.out}")
    return summary


def bench_plot_main(argv: list[str]) -> int:
    """``mixsd-edit bench plot tradeoff|curve SUMMARY... --out PNG``."""
    from mixsd_edit.bench.plot import PlotError, build_parser as plot_parser, load_summaries, plot_edit_curve, \
        plot_tradeoff

    args = plot_parser().parse_args(argv)
    try:
        summaries = load_summaries(args.summaries)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if args.kind == "tradeoff":
            info = plot_tradeoff(summaries, args.out, args.efficacy, args.retention, args.swap_axes, args.title)
        else:
            info = plot_edit_curve(summaries, args.out, args.efficacy, args.retention, args.title)
    except (PlotError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"mixsd-edit bench plot: error: {e}", file=sys.stderr)
        return 2
    if "table" in info:  # the curve's points, efficacy / locality / retention per cell
        print(info["table"])
    print(f"wrote {info['out']} (efficacy: {info['efficacy']}, retention: {info['retention']})")
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """``mixsd-edit bench [run] ...`` and ``mixsd-edit bench plot ...``: parse, run, print the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        return bench_plot_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    from mixsd_edit.bench import report
    from mixsd_edit.bench.runner import BenchError, build_parser as bench_parser, run_bench
    from mixsd_edit.bench.spec import SpecError
    from mixsd_edit.data.loaders import DatasetError
    from mixsd_edit.hparams import HyperParamsError

    args = bench_parser().parse_args(argv)
    try:
        summary = run_bench(args, argv)
    except (SpecError, HyperParamsError, DatasetError, FileNotFoundError, BenchError, KeyError, ValueError) as e:
        print(f"mixsd-edit bench: error: {e}", file=sys.stderr)
        return 2
    print(report.render_table(summary))
    print(f"wrote {summary['out']}/summary.json, table.md, cases/<label>/ and hparams/<label>.yaml")
    failed = [r for r in summary["rows"].values() if r.get("status") != "ok"]
    for r in failed:
        print(f"{r['label']}: n/a: {r['reason']}", file=sys.stderr)
    methods = [r for r in summary["rows"].values() if r["kind"] == "method"]
    return 1 if methods and len(failed) == len(methods) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if argv and argv[0] == "edit":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        run_edit(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mixsd-edit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
