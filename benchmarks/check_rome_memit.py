"""Measure ROME / MEMIT efficacy on CounterFact and the cost of the second-moment statistics.

efficacy_sum: share of requests with log P(" " + target_new | prompt) > log P(" " + ground_truth |
prompt), each summed over the answer's tokens. Also reported: the official ROME scores of
mixsd_edit.evaluation.counterfact (ES/PS/NS, mean per-token NLL). ROME: single edits, weights
restored after each. MEMIT: one batch of all cases.

    python benchmarks/check_rome_memit.py rome  --start 0 --n 100
    python benchmarks/check_rome_memit.py memit --start 0 --n 100
    python benchmarks/check_rome_memit.py stats --fresh      # time: compute once, then reuse
    python benchmarks/check_rome_memit.py rome --start 500 --n 40 --set layers=[3]   # tuning
    python benchmarks/check_rome_memit.py memit --start 500 --n 40 --sweep "mom2_update_weight=5.0e2;1.5e3"

Shared data root: $MIXSD_EDIT_SHARED_DATA (default ../shared/data next to the repo).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MIXSD_EDIT_SHARED_DATA", str(REPO.parent / "shared" / "data"))

from mixsd_edit.data.loaders import load_counterfact
from mixsd_edit.evaluation.counterfact import COUNTERFACT_PROTOCOLS, counterfact_scores
from mixsd_edit.methods.locate import stats as stats_module
from mixsd_edit.methods.locate.stats import layer_second_moments
from mixsd_edit.methods.memit import MEMITHyperParams, apply_memit_to_model
from mixsd_edit.methods.rome import ROMEHyperParams, apply_rome_to_model
from mixsd_edit.models import load_model_and_tokenizer
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right
from mixsd_edit.weights import restore_weights

OFFICIAL = ("efficacy_score", "paraphrase_score", "neighborhood_score")


@torch.no_grad()
def answer_log_probs(model, tok, prompts, answers, batch_size=32) -> list[float]:
    """Summed log P(" " + answer | prompt) over the answer tokens, one per (prompt, answer)."""
    fmt = PromptFormat()
    seqs, spans = [], []
    for p, a in zip(prompts, answers):
        c, t = fmt.context_ids(tok, p), fmt.answer_ids(tok, a)
        seqs.append(c + t)
        spans.append((len(c), t))
    out = []
    dev = next(model.parameters()).device
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[s:s + batch_size], pad_id_of(tok))
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
        for j, (start, t) in enumerate(spans[s:s + batch_size]):
            pos = torch.arange(start - 1, start - 1 + len(t))
            out.append(float(logp[j, pos, torch.tensor(t)].sum()))
    return out


def efficacy(model, tok, cases) -> list[bool]:
    """Per case: summed log P(target_new) > summed log P(ground_truth) after the prompt."""
    prompts = [c["prompt"] for c in cases]
    new = answer_log_probs(model, tok, prompts, [c["target_new"] for c in cases])
    true = answer_log_probs(model, tok, prompts, [c["ground_truth"] for c in cases])
    return [a > b for a, b in zip(new, true)]


def scores(model, tok, cases) -> list[dict]:
    """Per case: ``efficacy_sum`` (above) and the official ROME scores (mean per-token NLL)."""
    official = counterfact_scores(model, tok, PromptFormat(), cases)
    return [{"efficacy_sum": float(e), **{k: r[k] for k in OFFICIAL}} for e, r in zip(efficacy(model, tok, cases), official)]


def load_hparams(cls, path, overrides):
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    for item in overrides:
        k, v = item.split("=", 1)
        data[k] = yaml.safe_load(v)
    return cls.from_dict(data, source=str(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rome", "memit", "stats"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hparams", default=None, help="default hparams/<ALG>/<model>.yaml")
    ap.add_argument("--data", default=None, help="default $MIXSD_EDIT_SHARED_DATA/counterfact_easyedit/counterfact-edit-1k.json")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], help="override an hparam: key=yaml-value")
    ap.add_argument("--sweep", default=None, help='one hparam over ;-separated values, e.g. "layers=[4];[6]"')
    ap.add_argument("--fresh", action="store_true", help="stats: use an empty temporary cache dir")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    ap.add_argument("-v", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.v else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    alg = "ROME" if args.what == "rome" else "MEMIT"
    cls = ROMEHyperParams if alg == "ROME" else MEMITHyperParams
    hp_path = args.hparams or REPO / "hparams" / alg / f"{args.model}.yaml"
    hp = load_hparams(cls, hp_path, args.set)
    model, tok = load_model_and_tokenizer(args.model)

    if args.what == "stats":
        # ROME's and MEMIT's layers together, as a user running both would need them.
        rome = load_hparams(ROMEHyperParams, REPO / "hparams" / "ROME" / f"{args.model}.yaml", [])
        layers = sorted(set(hp.layers) | set(rome.layers))
        cache = tempfile.mkdtemp(prefix="mixsd_stats_") if args.fresh else None
        t0 = time.perf_counter()
        layer_second_moments(model, tok, hp, layers, cache_dir=cache)
        t1 = time.perf_counter()
        stats_module._RECENT.clear()  # as in a new process: read and verify the files on disk
        layer_second_moments(model, tok, hp, layers, cache_dir=cache, progress=False)
        t2 = time.perf_counter()
        layer_second_moments(model, tok, hp, layers, cache_dir=cache, progress=False)
        t3 = time.perf_counter()
        print(json.dumps({"model": args.model, "layers": layers, "n_tokens": hp.mom2_n_samples,
                          "seq_len": hp.mom2_seq_len, "threads": torch.get_num_threads(),
                          "first_call_s": round(t1 - t0, 2), "from_disk_cache_s": round(t2 - t1, 2),
                          "same_process_again_s": round(t3 - t2, 3), "cache_dir": cache or "default"}))
        return

    data = Path(args.data or Path(os.environ["MIXSD_EDIT_SHARED_DATA"]) / "counterfact_easyedit" / "counterfact-edit-1k.json")
    cases = load_counterfact(data, n=args.n, start=args.start)
    pre = scores(model, tok, cases)
    settings = [[]]
    if args.sweep:
        key, values = args.sweep.split("=", 1)
        settings = [[f"{key}={v}"] for v in values.split(";")]
        memoize_values()
    for extra in settings:
        run = load_hparams(cls, hp_path, args.set + extra)
        stats = layer_second_moments(model, tok, run, run.layers) if run.mom2_adjustment else None
        post, dt = edit_and_score(model, tok, cases, run, stats)
        report(alg, args, cases, pre, post, dt, args.set + extra)


def edit_and_score(model, tok, cases, hp, stats):
    """ROME: one edit at a time, restored after scoring. MEMIT: all cases in one batch."""
    t0 = time.perf_counter()
    if isinstance(hp, ROMEHyperParams):
        post = []
        for c in cases:
            _, orig = apply_rome_to_model(model, tok, [c], hp, return_orig_weights=True, stats=stats, progress=False)
            post.extend(scores(model, tok, [c]))
            restore_weights(model, orig)
    else:
        _, orig = apply_memit_to_model(model, tok, cases, hp, return_orig_weights=True, stats=stats)
        post = scores(model, tok, cases)
        restore_weights(model, orig)
    return post, time.perf_counter() - t0


def memoize_values():
    """For sweeps of settings that do not change the value optimisation (λ, lower layers): compute each
    request's value target once. Benchmark-only shortcut; the library always recomputes."""
    import mixsd_edit.methods.memit.core as memit_core

    real, memo = memit_core.optimize_value, {}

    def cached(model, tok, inputs, hp, module_name):
        key = (module_name, str(inputs.seqs), hp.v_lr, hp.v_num_grad_steps, hp.v_weight_decay,
               hp.clamp_norm_factor, hp.kl_factor)
        if key not in memo:
            memo[key] = real(model, tok, inputs, hp, module_name)
        return memo[key]

    memit_core.optimize_value = cached


def report(alg, args, cases, pre, post, dt, overrides):
    def mean(rows, key):
        return round(sum(r[key] for r in rows) / len(rows), 3)

    keys = ("efficacy_sum",) + OFFICIAL
    print(json.dumps({"method": alg, "model": args.model, "cases": f"{args.start}..{args.start + len(cases) - 1}",
                      "n": len(cases), "pre": {k: mean(pre, k) for k in keys}, "post": {k: mean(post, k) for k in keys},
                      "edit_seconds": round(dt, 1), "threads": torch.get_num_threads(), "overrides": overrides,
                      "protocols": {"efficacy_sum": "share with summed log P(target_new) > summed log P(ground_truth) "
                                                    "after the prompt (answer tokens after a space)",
                                    **{k: COUNTERFACT_PROTOCOLS[k] for k in OFFICIAL}}}), flush=True)


if __name__ == "__main__":
    main()
