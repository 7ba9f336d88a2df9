"""General-capability retention: what a model still does after editing, compared with before.

Suites here work on any (model, tokenizer) pair and return a dict with ``score``, ``n`` (items or
tokens used), ``protocol`` (from ``RETENTION_PROTOCOLS``), ``higher_is_better`` and cheap
per-item details:

- known-fact recall (ROME ``known_1000``): ``select_known_facts`` keeps the facts the base model
  answers under greedy decoding; ``known_fact_recall`` is the share still answered after editing.
- WikiText-2 perplexity over a fixed token budget in fixed non-overlapping windows.
- mean KL(base || edited) of next-token distributions on held-out text: ``capture_reference_logprobs``
  stores the base model's top-k log-probs on CPU, ``mean_kl`` compares a later model against them.

MMLU and GSM8K live in ``retention_tasks``; ``retention_suite.RetentionSuite`` runs them all.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from mixsd_edit.evaluation.metrics import generation_match, greedy_generate, normalize_answer
from mixsd_edit.lm_utils import coarse_kl, rest_logp
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right

logger = logging.getLogger(__name__)

RETENTION_PROTOCOLS = {
    "known_facts": "share of known_1000 facts the base model answered (greedy continuation of the prompt starts "
                   "with the attribute, normalised; or contains it with match='contains') that the model still "
                   "answers; edited subjects excluded",
    "perplexity": "exp(mean token NLL) on WikiText-2 test, fixed token budget, non-overlapping windows "
                  "scored independently (BOS prepended if the tokenizer adds one)",
    "kl": "mean over positions of KL(base || model) in nats of next-token distributions on held-out WikiText-2 "
          "windows, over the base's top-k tokens plus one bucket for the rest (exact when k = vocab size, "
          "otherwise a lower bound)",
    "mmlu": "MMLU subset accuracy, fixed few-shot examples, answer = argmax of the logits of ' A'..' D' "
            "after 'Answer:'",
    "gsm8k": "GSM8K test accuracy, fixed few-shot chain-of-thought examples from train, greedy, final number "
             "('The answer is N' or the last number) equal to the gold answer",
}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def retention_ratio(pre: float | Mapping[str, Any] | None, post: float | Mapping[str, Any] | None) -> float | None:
    """post / pre (either a number or a suite result dict with ``score``). None when pre is 0 or
    either is missing. For a lower-is-better suite (perplexity) a ratio above 1 means worse."""
    pre = pre.get("score") if isinstance(pre, Mapping) else pre
    post = post.get("score") if isinstance(post, Mapping) else post
    if pre is None or post is None or pre == 0:
        return None
    return float(post) / float(pre)


# ----------------------------------------------------------------------------- known facts

def load_known_facts(path: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` records of ROME's known_1000.json (prompt, attribute, subject, ...)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    for i, r in enumerate(records[: n if n is not None else len(records)]):
        for key in ("prompt", "attribute", "subject"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"{path}: record {i} has no usable '{key}'")
    return records[:n] if n is not None else records


def fact_answered(continuation: str, attribute: str, match: str = "prefix") -> bool:
    """``prefix``: the normalised continuation starts with the normalised attribute (word-aligned);
    ``contains``: the normalised attribute occurs anywhere in the normalised continuation."""
    if match == "prefix":
        return bool(generation_match(continuation, attribute))
    if match == "contains":
        a = normalize_answer(attribute)
        return bool(a) and f" {a} " in f" {normalize_answer(continuation)} "
    raise ValueError(f"match must be 'prefix' or 'contains', got {match!r}")


def _answers_fact(model, tok, fmt, facts, max_new_tokens, batch_size, match) -> tuple[list[bool], list[str]]:
    texts = greedy_generate(model, tok, fmt, [f["prompt"] for f in facts], max_new_tokens, batch_size)
    return [fact_answered(t, f["attribute"], match) for t, f in zip(texts, facts)], texts


def select_known_facts(model, tok, path: str, n: int = 200, fmt: PromptFormat = PromptFormat(),
                       max_new_tokens: int = 8, batch_size: int = 16, match: str = "prefix") -> dict[str, Any]:
    """Greedy-decode the first ``n`` known_1000 prompts with the (base) model and keep the facts whose
    continuation starts with the attribute (``metrics.generation_match``; ``match="contains"``
    accepts it anywhere in the ``max_new_tokens`` continuation, see :func:`fact_answered`).

    Returns ``{"facts": [known records], "n": n, "score": share known, "protocol", ...}``.
    """
    facts = load_known_facts(path, n)
    ok, texts = _answers_fact(model, tok, fmt, facts, max_new_tokens, batch_size, match)
    known = [dict(f, base_continuation=t) for f, t, k in zip(facts, texts, ok) if k]
    logger.info("known facts: base answers %d of %d", len(known), len(facts))
    return {"facts": known, "n": len(facts), "n_known": len(known), "score": len(known) / max(len(facts), 1),
            "max_new_tokens": max_new_tokens, "match": match, "protocol": "share of known_1000 prompts answered "
            f"by greedy decoding (attribute match '{match}', normalised)", "higher_is_better": True}


def _norm_subject(s: str) -> str:
    return " ".join(s.casefold().split())


def known_fact_recall(model, tok, facts: Sequence[Mapping[str, Any]], exclude_subjects: Iterable[str] = (),
                      fmt: PromptFormat = PromptFormat(), max_new_tokens: int = 8, batch_size: int = 16,
                      match: str = "prefix") -> dict[str, Any]:
    """Share of ``facts`` (from ``select_known_facts``, same ``match``) still answered, leaving out
    facts whose subject equals an edited subject (case- and white-space-insensitive). ``lost`` lists
    the facts no longer answered, each with the model's greedy continuation now; ``by_relation`` counts,
    per known_1000 ``relation_id`` ("?" when a record has none), the facts scored and the facts lost."""
    excluded = {_norm_subject(s) for s in exclude_subjects if s}
    kept = [f for f in facts if _norm_subject(f["subject"]) not in excluded]
    ok, texts = _answers_fact(model, tok, fmt, kept, max_new_tokens, batch_size, match) if kept else ([], [])
    lost = [{"known_id": f.get("known_id"), "relation_id": f.get("relation_id"), "subject": f["subject"],
             "prompt": f["prompt"], "attribute": f["attribute"], "continuation": t}
            for f, t, k in zip(kept, texts, ok) if not k]
    by_relation: dict[str, dict[str, int]] = {}
    for f, k in zip(kept, ok):
        counts = by_relation.setdefault(str(f.get("relation_id") or "?"), {"known": 0, "lost": 0})
        counts["known"] += 1
        counts["lost"] += not k
    return {"score": (sum(ok) / len(ok)) if ok else None, "n": len(kept), "n_excluded": len(facts) - len(kept),
            "correct": ok, "known_ids": [f.get("known_id") for f in kept], "lost": lost,
            "by_relation": dict(sorted(by_relation.items())),
            "protocol": RETENTION_PROTOCOLS["known_facts"], "higher_is_better": True}


# ----------------------------------------------------------------------------- WikiText perplexity

def wikitext_windows(tok, path: str, n_windows: int, window: int, offset_tokens: int = 0,
                     from_end: bool = False) -> list[list[int]]:
    """``n_windows`` consecutive, non-overlapping windows of ``window`` token ids from the raw
    WikiText file (tokenised as one string), starting ``offset_tokens`` tokens in; with ``from_end``
    the windows end ``offset_tokens`` tokens before the end of the file instead."""
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    need = offset_tokens + n_windows * window
    if need > len(ids):
        raise ValueError(f"{path}: {len(ids)} tokens, but {need} requested")
    start = len(ids) - need if from_end else offset_tokens
    return [ids[start + i * window: start + (i + 1) * window] for i in range(n_windows)]


def _bos(tok) -> list[int]:
    """[bos] if the tokenizer prepends it to ordinary text, else []."""
    bos = tok.bos_token_id
    if bos is None:
        return []
    return [bos] if tok("a")["input_ids"][:1] == [bos] else []


@torch.no_grad()
def perplexity(model, tok, windows: Sequence[Sequence[int]], batch_size: int = 4) -> dict[str, Any]:
    """Perplexity over token windows scored independently. Without a BOS the first token of each
    window has no context and is not scored, so ``n`` = tokens scored."""
    bos = _bos(tok)
    seqs = [bos + list(w) for w in windows]
    pad = pad_id_of(tok)
    per_window: list[float] = []
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_right(chunk, pad)
        logits = model(input_ids=ids.to(_device(model)), attention_mask=mask.to(_device(model))).logits
        for j, seq in enumerate(chunk):
            tgt = torch.tensor(seq[1:], device=logits.device)
            nll = -logits[j, : len(seq) - 1].float().log_softmax(-1).gather(-1, tgt[:, None]).sum().item()
            per_window.append(nll / len(tgt))
            total, count = total + nll, count + len(tgt)
    return {"score": math.exp(total / count), "mean_nll": total / count, "n": count,
            "window_nll": per_window, "protocol": RETENTION_PROTOCOLS["perplexity"], "higher_is_better": False}


# ----------------------------------------------------------------------------- KL to the base model

@dataclass
class ReferenceLogprobs:
    """The base model's next-token distributions on some windows, kept compactly on CPU.

    Per window ``w`` (length ``L_w`` incl. any BOS): ``top_idx[w]`` [L_w, k] int32 token ids,
    ``top_logp[w]`` [L_w, k] float32 log-probs, ``rest_logp[w]`` [L_w] log of the remaining mass.
    """
    input_ids: list[list[int]]
    top_idx: list[torch.Tensor]
    top_logp: list[torch.Tensor]
    rest_logp: list[torch.Tensor]
    top_k: int


def _window_logprobs(model, tok, windows, batch_size):
    """Yield (input ids, [L, V] float32 log-probs) per window, the tokenizer's BOS (if any) prepended."""
    bos = _bos(tok)
    return _sequence_logprobs(model, tok, [bos + list(w) for w in windows], batch_size)


@torch.no_grad()
def _sequence_logprobs(model, tok, seqs, batch_size):
    """Yield (input ids, [L, V] float32 log-probs) per sequence, scored exactly as given."""
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_right(chunk, pad_id_of(tok))
        logits = model(input_ids=ids.to(_device(model)), attention_mask=mask.to(_device(model))).logits
        for j, seq in enumerate(chunk):
            yield seq, logits[j, : len(seq)].float().log_softmax(-1)


def capture_reference_logprobs(model, tok, windows: Sequence[Sequence[int]], top_k: int | None = 1000,
                               batch_size: int = 4) -> ReferenceLogprobs:
    """Store the (base) model's top-k next-token log-probs at every position of every window
    (``top_k=None``: the full vocabulary, exact KL; memory = positions x vocab x 8 bytes)."""
    ref = ReferenceLogprobs([], [], [], [], 0)
    for seq, logp in _window_logprobs(model, tok, windows, batch_size):
        k = logp.shape[-1] if top_k is None else min(top_k, logp.shape[-1])
        vals, idx = logp.topk(k, dim=-1)
        ref.input_ids.append(seq)
        ref.top_idx.append(idx.to(torch.int32).cpu())
        ref.top_logp.append(vals.cpu())
        ref.rest_logp.append(rest_logp(vals).cpu())
        ref.top_k = k
    return ref


def mean_kl(model, tok, reference: ReferenceLogprobs, batch_size: int = 4) -> dict[str, Any]:
    """Mean over all positions of KL(reference || model) of next-token distributions (nats)."""
    per_window: list[float] = []
    total, count = 0.0, 0
    # reference.input_ids already hold any BOS: score them as stored, not as fresh windows
    for w, (seq, logp) in enumerate(_sequence_logprobs(model, tok, reference.input_ids, batch_size)):
        q_top = logp.gather(-1, reference.top_idx[w].to(logp.device).long()).cpu()
        kl = coarse_kl(reference.top_logp[w], reference.rest_logp[w], q_top, rest_logp(q_top))
        per_window.append(kl.mean().item())
        total, count = total + kl.sum().item(), count + kl.numel()
    return {"score": total / count, "n": count, "window_kl": per_window, "top_k": reference.top_k,
            "protocol": RETENTION_PROTOCOLS["kl"], "higher_is_better": False}
