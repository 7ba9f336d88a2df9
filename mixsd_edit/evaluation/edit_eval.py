"""Per-request evaluation of an edit (pre or post), and the summary over cases.

``evaluate_requests`` scores a batch of canonical requests on a model as it is now. Locality needs
the unedited model's argmax tokens: pass ``pre_records`` (the "pre" dicts computed on the untouched
model) when scoring "post", and locality becomes their agreement. All teacher-forced work is batched.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from mixsd_edit.evaluation.metrics import (PROTOCOLS, agreement, generation_match, greedy_generate, ngram_entropy,
                                           teacher_forced_predictions, token_accuracy)
from mixsd_edit.prompting import PromptFormat


def _flatten_qa(requests, field):
    """-> list of (request index, name, prompt, answer) for locality/portability blocks."""
    out = []
    for i, r in enumerate(requests):
        for name, qa in r[field].items():
            for p, a in zip(qa["prompt"], qa["ground_truth"]):
                out.append((i, name, p, a))
    return out


def evaluate_requests(model, tok, requests: Sequence[dict], fmt: PromptFormat, *, pre_records: Sequence[dict] | None = None,
                      generation: bool = True, fluency: bool = False, gen_extra_tokens: int = 3,
                      fluency_tokens: int = 64, batch_size: int = 16) -> list[dict]:
    """Score each request. Returns one dict per request (EasyEdit's pre/post shape)."""
    n = len(requests)
    recs: list[dict] = [{"locality": {}, "portability": {}} for _ in range(n)]

    # teacher-forced: rewrite, rephrase(s), portability, locality in one batched pass
    jobs = []  # (kind, request index, name, prompt, answer)
    for i, r in enumerate(requests):
        jobs.append(("rewrite", i, None, r["prompt"], r["target_new"]))
        jobs.extend(("rephrase", i, None, p, r["target_new"]) for p in r["rephrase_prompt"])
    jobs.extend(("portability", i, name, p, a) for i, name, p, a in _flatten_qa(requests, "portability"))
    jobs.extend(("locality", i, name, p, a) for i, name, p, a in _flatten_qa(requests, "locality"))
    preds = teacher_forced_predictions(model, tok, fmt, [j[3] for j in jobs], [j[4] for j in jobs], batch_size)

    acc: dict[tuple, list[float]] = {}
    loc_ids: dict[tuple, list[list[int]]] = {}
    for (kind, i, name, _, _), pl in zip(jobs, preds):
        if kind == "locality":
            loc_ids.setdefault((i, name), []).append(pl[0])
        else:
            acc.setdefault((kind, i, name), []).append(token_accuracy(pl))
    for i in range(n):
        recs[i]["rewrite_acc"] = statistics.fmean(acc[("rewrite", i, None)])
        reph = acc.get(("rephrase", i, None))
        recs[i]["rephrase_acc"] = statistics.fmean(reph) if reph else None
        for name in requests[i]["portability"]:
            recs[i]["portability"][f"{name}_acc"] = statistics.fmean(acc[("portability", i, name)])
        for name in requests[i]["locality"]:
            ids = loc_ids[(i, name)]
            if pre_records is None:
                recs[i]["locality"][f"{name}_output"] = ids
            else:
                before = pre_records[i]["locality"][f"{name}_output"]
                recs[i]["locality"][f"{name}_acc"] = statistics.fmean(agreement(b, a) for b, a in zip(before, ids))

    if generation:
        gjobs = []
        for i, r in enumerate(requests):
            gjobs.append(("rewrite", i, r["prompt"], r["target_new"]))
            gjobs.extend(("rephrase", i, p, r["target_new"]) for p in r["rephrase_prompt"])
        if gjobs:
            max_new = max(len(fmt.answer_ids(tok, j[3])) for j in gjobs) + gen_extra_tokens
            texts = greedy_generate(model, tok, fmt, [j[2] for j in gjobs], max_new, batch_size)
            hits: dict[tuple, list[float]] = {}
            for (kind, i, _, ans), text in zip(gjobs, texts):
                hits.setdefault((kind, i), []).append(generation_match(text, ans))
                if kind == "rewrite":
                    recs[i]["rewrite_gen_text"] = text
            for i in range(n):
                recs[i]["rewrite_gen_em"] = statistics.fmean(hits[("rewrite", i)])
                h = hits.get(("rephrase", i))
                recs[i]["rephrase_gen_em"] = statistics.fmean(h) if h else None
    if fluency:
        texts = greedy_generate(model, tok, fmt, [r["prompt"] for r in requests], fluency_tokens, batch_size)
        for i, t in enumerate(texts):
            recs[i]["fluency"] = ngram_entropy(t)
    return recs


def _mean_ci(values: list[float]) -> dict:
    """Mean with a normal-approximation 95% interval half-width."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    m = statistics.fmean(vals)
    ci = 1.96 * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return {"mean": m, "ci95": ci, "n": len(vals)}


def _scalar_metrics(stage: dict) -> dict[str, float]:
    out = {}
    for k, v in stage.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif k in ("locality", "portability") and isinstance(v, dict):
            vals = [x for name, x in v.items() if name.endswith("_acc")]
            if vals:
                out[k] = statistics.fmean(vals)
    return out


def summarize(records: Sequence[dict]) -> dict:
    """Means (± 95% CI) over cases of every pre/post scalar metric, plus MixSD fallback share."""
    summary: dict = {"n_cases": len(records)}
    for stage in ("pre", "post"):
        per_metric: dict[str, list[float]] = {}
        for r in records:
            for k, v in _scalar_metrics(r.get(stage, {})).items():
                per_metric.setdefault(k, []).append(v)
        summary[stage] = {k: _mean_ci(v) for k, v in sorted(per_metric.items())}
    metas = [r["method_meta"] for r in records if r.get("method_meta")]
    if metas and "fallback" in metas[0]:
        fb = [m["fallback"] for m in metas]
        summary["mixsd"] = {
            "fallback_share": sum(f is not None for f in fb) / len(fb),
            "fallback_counts": {k: fb.count(k) for k in sorted({f for f in fb if f})},
            "mean_naive_fraction": statistics.fmean(m["naive_fraction"] for m in metas),
            "mean_attempts": statistics.fmean(m["attempts"] for m in metas),
            "mean_target_tokens": statistics.fmean(m["target_tokens"] for m in metas),
        }
        ups = [(m["train_updates"], m["train_steps"]) for m in metas if m.get("train_updates") is not None]
        if ups:  # how many of its call's steps trained each request (fewer when batches exceed train_batch_size)
            summary["mixsd"].update(min_train_updates=min(u for u, _ in ups),
                                    mean_train_updates=statistics.fmean(u for u, _ in ups),
                                    mean_train_steps=statistics.fmean(s for _, s in ups))
    times = [r["time"] for r in records if r.get("time") is not None]
    if times:
        summary["edit_time_s"] = _mean_ci(times)
    summary["protocols"] = {k: v for k, v in PROTOCOLS.items()}
    return summary
