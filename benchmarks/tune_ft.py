"""Tune a fine-tuning style method (MixSD, FT-L, FT-M, SFT) on a few CounterFact cases, single edits.

For each hyperparameter variant (the shipped YAML plus JSON overrides) every case is edited alone,
scored, and restored:
- rewrite_acc / rephrase_acc: teacher-forced token accuracy of target_new after prompt / rephrase;
- locality: agreement of argmax tokens over loc_prompt + " " + loc_answer before vs after the edit;
- rewrite_gen_em (with --gen-tokens N > 0): greedy continuation of the prompt starts with target_new;
- fallback (MixSD only): share of cases whose mixed target needed the declared fallback (forced_prefix/skip).
(Definitions: mixsd_edit/evaluation/metrics.py.) Use cases outside the first 200 of the 1k file:
those are the evaluation cases.

    PYTHONPATH=. python3 benchmarks/tune_ft.py --model smollm2-135m-instruct --alg FT-M --cases 500:515 \
        --grid '[{}, {"lr": 1.0e-3}, {"layers": [10]}]'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mixsd_edit.evaluation.metrics import (agreement, generation_match, greedy_generate,
                                           teacher_forced_accuracy, teacher_forced_predictions)
from mixsd_edit.models import load_model_and_tokenizer
from mixsd_edit.prompting import PromptFormat
from mixsd_edit.methods import get_method
from mixsd_edit.weights import restore_weights

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_DATA", ROOT.parent / "shared" / "data"))
CF_1K = DATA / "counterfact_easyedit" / "counterfact-edit-1k.json"


def parse_cases(spec: str) -> slice:
    a, b = spec.split(":")
    return slice(int(a), int(b))


@torch.no_grad()
def locality_preds(model, tok, fmt, cases):
    return [p for p, _ in teacher_forced_predictions(model, tok, fmt, [c["locality_prompt"] for c in cases],
                                                     [c["locality_ground_truth"] for c in cases])]


def evaluate_variant(model, tok, alg, hp, cases, loc_before, gen_tokens):
    fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
    apply_fn = get_method(alg).apply_fn
    rows = []
    for c, before in zip(cases, loc_before):
        req = {"prompt": c["prompt"], "target_new": c["target_new"], "ground_truth": c["ground_truth"],
               "subject": c["subject"], "case_id": c["case_id"]}  # no eval fields: nothing to leak
        meta: list[dict] = []  # per-request metadata; only MixSD fills it (as for the editor)
        t0 = time.perf_counter()
        _, wc = apply_fn(model, tok, [req], hp, return_orig_weights=True, metadata_out=meta)
        secs = time.perf_counter() - t0
        row = {"case_id": c["case_id"], "secs": secs,
               "rewrite_acc": teacher_forced_accuracy(model, tok, fmt, [c["prompt"]], [c["target_new"]])[0],
               "rephrase_acc": teacher_forced_accuracy(model, tok, fmt, [c["rephrase_prompt"]], [c["target_new"]])[0],
               "locality": agreement(before, locality_preds(model, tok, fmt, [c])[0])}
        if gen_tokens:
            g = greedy_generate(model, tok, fmt, [c["prompt"]], gen_tokens)[0]
            row["rewrite_gen_em"] = generation_match(g, c["target_new"])
            row["gen"] = g
        if meta:
            row["fallback"] = float(meta[0]["fallback"] is not None)
            row["target_text"] = meta[0]["target_text"]
        restore_weights(model, wc)
        rows.append(row)
    keys = [k for k in ("rewrite_acc", "rephrase_acc", "locality", "rewrite_gen_em", "fallback", "secs") if k in rows[0]]
    return {k: statistics.fmean(r[k] for r in rows) for k in keys}, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--alg", required=True, choices=["MixSD", "FT-L", "FT-M", "SFT"])
    ap.add_argument("--hparams", help="base YAML (default hparams/<alg>/<model>.yaml)")
    ap.add_argument("--cases", default="500:515", help="slice of counterfact-edit-1k.json, e.g. 500:515")
    ap.add_argument("--grid", default="[{}]", help="JSON list of override dicts, one variant each")
    ap.add_argument("--gen-tokens", type=int, default=0, help="also greedy-generate N tokens (0: off)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append JSON lines with every variant's result here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sl = parse_cases(args.cases)
    if sl.start < 200:
        raise SystemExit("the first 200 cases are evaluation cases: tune on others")
    cases = json.loads(CF_1K.read_text())[sl]
    cls = get_method(args.alg).hparams_cls
    base = cls.from_hparams(args.hparams or ROOT / "hparams" / args.alg / f"{args.model}.yaml")
    model, tok = load_model_and_tokenizer(args.model)  # offline alias, converted once into the user cache
    fmt = PromptFormat(base.use_chat_template, base.system_prompt)
    loc_before = locality_preds(model, tok, fmt, cases)
    pre = teacher_forced_accuracy(model, tok, fmt, [c["prompt"] for c in cases], [c["target_new"] for c in cases])
    print(f"{args.model} {args.alg} cases {args.cases} (n={len(cases)}); pre-edit rewrite_acc {statistics.fmean(pre):.3f}")
    for over in json.loads(args.grid):
        hp = base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})
        summary, rows = evaluate_variant(model, tok, args.alg, hp, cases, loc_before, args.gen_tokens)
        print(json.dumps(over), " ".join(f"{k}={v:.3f}" for k, v in summary.items()), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"model": args.model, "alg": args.alg, "cases": args.cases, "override": over,
                                     "summary": summary, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
