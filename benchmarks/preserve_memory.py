"""Peak memory and time of a MixSD batch apply with and without ``preserve_checkpoint`` (or, with
``--swaps-per-step M``, scoring every swapped prompt vs a random M of each request's per step), in one run.

The preservation term scores ``preserve_n_tokens`` of text and ``preserve_swaps`` swapped prompts per request
at every training step; without checkpointing the activations of all of them are held until backward, so
the peak grows with requests x swaps (BENCHMARKS.md §23: 16.6 GB for 200 edits with the batch YAML).
``preserve_checkpoint: true`` recomputes each forward pass (the text, one group of equal-length swapped
prompts) in backward instead.

Each variant runs in its own child process (a fresh high-water mark): load the model, apply the CounterFact
cases in --cases as ONE batch with the hparams file (``num_steps`` --steps, ``min_epochs`` 0 so both variants
take the same steps), and report the apply time, the process's peak RSS (``peak_memory``, as the bench runner reports it), the RSS after the
model load, and a hash of the edited weights (with checkpointing the two variants must agree bit for bit;
with ``--swaps-per-step`` they train on different subsets and need not).

    PYTHONPATH=. python3 benchmarks/preserve_memory.py --cases 500:550 --steps 3
    PYTHONPATH=. python3 benchmarks/preserve_memory.py --cases 500:540 --steps 5 --swaps-per-step 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import torch

    from mixsd_edit.data.loaders import load_counterfact
    from mixsd_edit.bench.runner import peak_memory
    from mixsd_edit.methods.mixsd import MixSDHyperParams, apply_mixsd_to_model
    from mixsd_edit.models import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    a, b = (int(x) for x in args.cases.split(":"))
    requests = load_counterfact(args.data, n=b - a, start=a)
    hp = replace(MixSDHyperParams.from_hparams(args.hparams), num_steps=args.steps, min_epochs=0.0,
                 preserve_checkpoint=args.checkpoint == "on", batch_size=len(requests),
                 preserve_swaps_per_step=args.variant_per_step)
    model, tok = load_model_and_tokenizer(hp.model_name)
    loaded = _rss_mb()
    meta: list[dict] = []
    t0 = time.perf_counter()
    model, wc = apply_mixsd_to_model(model, tok, requests, hp, return_orig_weights=True, metadata_out=meta)
    seconds = time.perf_counter() - t0
    peak = peak_memory()["peak_rss_mb"]
    h = hashlib.sha256()
    for name in sorted(wc):
        h.update(model.get_parameter(name).detach().cpu().contiguous().numpy().tobytes())
    return {"checkpoint": args.checkpoint, "swaps_per_step": args.variant_per_step,
            "swapped_prompts": len(requests) * hp.preserve_swaps, "requests": len(requests), "steps": meta[0]["train_steps"],
            "apply_s": seconds, "peak_rss_mb": peak, "rss_after_load_mb": loaded,
            "peak_above_load_mb": peak - loaded, "weights_sha256": h.hexdigest()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", default=str(ROOT / "hparams" / "MixSD" / "smollm2-135m-instruct-batch.yaml"))
    ap.add_argument("--data", default=str(DATA / "counterfact_easyedit" / "counterfact-edit-1k.json"))
    ap.add_argument("--cases", default="500:550", help="a:b, one batch (tuning cases by default)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--swaps-per-step", type=int, default=0,
                    help="compare every swapped prompt (preserve_swaps_per_step 0) with M of each request's per step, checkpointing off")
    ap.add_argument("--out", default=None, help="write both results as JSON here")
    ap.add_argument("--checkpoint", choices=("on", "off"), default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--variant-per-step", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.checkpoint:
        print(json.dumps(child(args)))
        return
    variants = ([("off", 0), ("off", args.swaps_per_step)] if args.swaps_per_step else [("off", 0), ("on", 0)])
    rows = []
    for mode, per_step in variants:
        cmd = [sys.executable, __file__, "--hparams", args.hparams, "--data", args.data, "--cases", args.cases,
               "--steps", str(args.steps), "--threads", str(args.threads), "--checkpoint", mode,
               "--variant-per-step", str(per_step)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base, other = rows
    what = "preserve_swaps_per_step" if args.swaps_per_step else "preserve_checkpoint"
    print(f"{Path(args.hparams).name}: cases {args.cases} ({base['requests']} requests, {base['swapped_prompts']} "
          f"swapped prompts, one batch), {base['steps']} steps")
    print(f"| {what} | apply s | peak RSS MB | peak above model load MB |")
    print("|---|---|---|---|")
    labels = [(r["swaps_per_step"] or "0 (all)") if args.swaps_per_step else r["checkpoint"] for r in rows]
    for label, r in zip(labels, rows):
        print(f"| {label} | {r['apply_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_above_load_mb']:.0f} |")
    print(f"ratios {labels[1]} / {labels[0]}: time x{other['apply_s'] / base['apply_s']:.2f}, "
          f"peak RSS x{other['peak_rss_mb'] / base['peak_rss_mb']:.2f}, "
          f"peak above load x{other['peak_above_load_mb'] / base['peak_above_load_mb']:.2f}; "
          f"edited weights identical: {other['weights_sha256'] == base['weights_sha256']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
