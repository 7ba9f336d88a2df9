"""Per-request edit metrics, as EasyEdit defines them, plus generation-based exact match.

Protocols (every reported score carries one of these labels, see ``PROTOCOLS``):
- teacher-forced token accuracy (EasyEdit "Reliability"/"Generalization"/"Portability"): the input
  is ``context(prompt) + " " + answer``; score = share of answer tokens where argmax of the logits
  at the previous position equals the answer token. Not exact match.
- locality: argmax token ids over ``loc_prompt + " " + loc_answer`` before and after the edit;
  score = share of positions that agree (agreement with the unedited model, not correctness).
- generation exact match: greedy decode from the prompt alone, normalised (case, punctuation,
  articles, whitespace), hit if the continuation begins with the normalised answer.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import torch

from mixsd_edit.lm_utils import step
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right

PROTOCOLS = {
    "rewrite_acc": "teacher-forced token accuracy of target_new after prompt (EasyEdit reliability)",
    "rephrase_acc": "teacher-forced token accuracy of target_new after rephrase_prompt (EasyEdit generalization)",
    "portability": "teacher-forced token accuracy of the portability answer (EasyEdit portability)",
    "locality": "share of argmax tokens over locality prompt+answer equal before and after the edit (EasyEdit locality)",
    "rewrite_gen_em": "greedy generation from prompt starts with target_new, normalised (exact match)",
    "rephrase_gen_em": "greedy generation from rephrase_prompt starts with target_new, normalised (exact match)",
    "fluency": "n-gram entropy (2/3*H2 + 4/3*H3)/2 in bits of greedy text generated from the prompt",
}


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced_predictions(model, tok, fmt: PromptFormat, prompts: Sequence[str], answers: Sequence[str],
                               batch_size: int = 16) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, answer): (argmax ids at the answer positions, the answer's token ids)."""
    assert len(prompts) == len(answers)
    seqs, spans = [], []
    for p, a in zip(prompts, answers):
        ctx = fmt.context_ids(tok, p)
        ans = fmt.answer_ids(tok, a)
        seqs.append(ctx + ans)
        spans.append((len(ctx), len(ans)))
    out: list[tuple[list[int], list[int]]] = []
    dev = _model_device(model)
    pad = pad_id_of(tok)
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_right(chunk, pad)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        argmax = logits.argmax(-1).cpu()
        for j, seq in enumerate(chunk):
            start, n = spans[s + j]
            preds = argmax[j, start - 1:start - 1 + n].tolist()
            out.append((preds, seq[start:start + n]))
    return out


def token_accuracy(pred_label: tuple[list[int], list[int]]) -> float:
    preds, labels = pred_label
    if not labels:
        return 0.0
    return sum(int(p == l) for p, l in zip(preds, labels)) / len(labels)


def teacher_forced_accuracy(model, tok, fmt: PromptFormat, prompts: Sequence[str], answers: Sequence[str],
                            batch_size: int = 16) -> list[float]:
    return [token_accuracy(x) for x in teacher_forced_predictions(model, tok, fmt, prompts, answers, batch_size)]


def agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """Locality: share of positions whose argmax token is unchanged."""
    if not before:
        return 0.0
    return sum(int(a == b) for a, b in zip(before, after)) / len(before)


@torch.no_grad()
def greedy_generate(model, tok, fmt: PromptFormat, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy continuations (text after the prompt), batched with left padding and a KV cache."""
    dev = _model_device(model)
    pad = pad_id_of(tok)
    eos = set(_eos_ids(tok, model))
    texts: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ctxs = [fmt.context_ids(tok, p) for p in prompts[s:s + batch_size]]
        L = max(map(len, ctxs))
        ids = torch.full((len(ctxs), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(ctxs):
            ids[i, L - len(c):] = torch.tensor(c)
            mask[i, L - len(c):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = step(model, ids, mask, pos)
        nxt = logits.argmax(-1)
        gen = [[] for _ in ctxs]
        done = [False] * len(ctxs)
        for _ in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in eos:
                        done[i] = True
                    else:
                        gen[i].append(t)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            logits, cache = step(model, nxt[:, None], mask, pos, cache)
            nxt = logits.argmax(-1)
        texts.extend(tok.decode(g, skip_special_tokens=True) for g in gen)
    return texts


def _eos_ids(tok, model) -> list[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None,
                tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, fold white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def generation_match(generated: str, answer: str) -> float:
    """1.0 if the normalised continuation begins with the normalised answer (word-aligned)."""
    g, a = normalize_answer(generated).split(), normalize_answer(answer).split()
    return float(bool(a) and g[: len(a)] == a)


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """EasyEdit/ROME fluency: weighted mean of n-gram entropies (bits) over word tokens."""
    words = text.split()
    ents = []
    for n in ns:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ents.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, ents)) / len(ns)
