"""Retention on downstream tasks: MMLU (letter logits) and GSM8K (greedy chain of thought).

Both use fixed few-shot examples shared by every item, so the few-shot prefix is run through the
model once per call and its KV cache reused for every batch of questions; this keeps a 135M model
on 2 CPU cores at a few minutes per suite. Plain text prompts (no chat template), as in the usual
few-shot protocols. Each result reports the chance level and a one-sided exact binomial test of
"accuracy above chance", so the caller can leave out a task the base model cannot do.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
from collections import Counter
from typing import Any, Sequence

import torch

from mixsd_edit.evaluation.retention import RETENTION_PROTOCOLS
from mixsd_edit.lm_utils import step
from mixsd_edit.prompting import pad_id_of

logger = logging.getLogger(__name__)

LETTERS = "ABCD"
MMLU_HEADER = "The following are multiple choice questions (with answers).\n\n"
GSM8K_STOP = ("\n\n", "Question:")


def binomial_p_value(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes against chance p."""
    if n == 0 or k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0

    def log_term(i: int) -> float:
        return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                + i * math.log(p) + (n - i) * math.log1p(-p))
    return min(1.0, sum(math.exp(log_term(i)) for i in range(k, n + 1)))


def _chance_fields(correct: Sequence[bool], chance: float, alpha: float) -> dict[str, Any]:
    k, n = sum(correct), len(correct)
    pv = binomial_p_value(k, n, chance)
    return {"chance": chance, "p_value": pv, "above_chance": pv < alpha}


# ----------------------------------------------------------------------------- shared-prefix forward

def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _prefix_cache(model, prefix_ids: Sequence[int]):
    ids = torch.tensor([list(prefix_ids)], device=_device(model))
    _, cache = step(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1], device=ids.device)[None])
    return cache


def _sliding_window(model) -> int | None:
    """The attention window of a sliding-window model (Gemma 3, Mistral), else None."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    return window if window and getattr(cfg, "use_sliding_window", True) else None


def _batches(model, prefix_len: int, suffixes: Sequence[Sequence[int]], batch_size: int, extra: int = 0):
    """Chunks of suffixes. Pad tokens count towards a sliding window, so when a padded row could be
    longer than the window the chunk is split into single rows (exact, slower)."""
    window = _sliding_window(model)
    for s in range(0, len(suffixes), batch_size):
        chunk = [list(x) for x in suffixes[s:s + batch_size]]
        if window is not None and len(chunk) > 1 and prefix_len + max(map(len, chunk)) + extra > window:
            yield from ([c] for c in chunk)
        else:
            yield chunk


def _cache_for_batch(cache, batch: int):
    c = copy.deepcopy(cache)  # a forward pass appends to the cache in place
    if batch > 1:
        c.batch_repeat_interleave(batch)
    return c


@torch.no_grad()
def _start_batch(model, cache, prefix_len: int, chunk: list[list[int]], pad_id: int):
    """Run left-padded suffixes after the cached prefix -> (last logits [B, V], cache, mask, positions).
    Layout per row: prefix | pads (masked) | suffix, positions continuing the prefix's."""
    dev = _device(model)
    B, L = len(chunk), max(map(len, chunk))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    smask = torch.zeros(B, L, dtype=torch.long)
    for i, c in enumerate(chunk):
        ids[i, L - len(c):], smask[i, L - len(c):] = torch.tensor(c, dtype=torch.long), 1
    mask = torch.cat([torch.ones(B, prefix_len, dtype=torch.long), smask], 1).to(dev)
    pos = (prefix_len + (smask.cumsum(-1) - 1).clamp(min=0)).to(dev)
    logits, new_cache = step(model, ids.to(dev), mask, pos, _cache_for_batch(cache, B))
    return logits, new_cache, mask, pos


@torch.no_grad()
def last_logits_after_prefix(model, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]], pad_id: int,
                             batch_size: int = 8) -> torch.Tensor:
    """Logits [N, V] (CPU, float32) at the last token of ``prefix + suffix_i`` for every suffix,
    running the shared prefix once."""
    cache = _prefix_cache(model, prefix_ids)
    rows = [_start_batch(model, cache, len(prefix_ids), chunk, pad_id)[0]
            for chunk in _batches(model, len(prefix_ids), suffixes, batch_size)]
    return torch.cat(rows).float().cpu()


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tok.eos_token_id):
        ids.update([src] if isinstance(src, int) else list(src or []))
    return ids


@torch.no_grad()
def greedy_after_prefix(model, tok, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]],
                        max_new_tokens: int, stop: Sequence[str] = (), batch_size: int = 8,
                        check_every: int = 8) -> list[str]:
    """Greedy continuations of ``prefix + suffix_i``, the prefix run once; each text is cut at the
    first stop string and ends at EOS."""
    prefix_cache, eos = _prefix_cache(model, prefix_ids), _eos_ids(model, tok)
    texts: list[str] = []
    for chunk in _batches(model, len(prefix_ids), suffixes, batch_size, extra=max_new_tokens):
        logits, cache, mask, pos = _start_batch(model, prefix_cache, len(prefix_ids), chunk, pad_id_of(tok))
        gen: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for n_new in range(1, max_new_tokens + 1):
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    done[i] = t in eos
                    if not done[i]:
                        gen[i].append(t)
            if stop and n_new % check_every == 0:
                done = [d or any(x in tok.decode(g, skip_special_tokens=True) for x in stop) for d, g in zip(done, gen)]
            if all(done) or n_new == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            logits, cache = step(model, nxt[:, None], mask, pos, cache)
        for g in gen:
            text = tok.decode(g, skip_special_tokens=True)
            cut = min([text.find(x) for x in stop if x in text], default=len(text))
            texts.append(text[:cut])
    return texts


# ----------------------------------------------------------------------------- MMLU

def load_mmlu(path: str) -> list[dict[str, Any]]:
    """MMLU records ``{question, subject, choices[4], answer: int}`` (the EMMET glue_eval subset)."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    for i, it in enumerate(items):
        if not isinstance(it.get("question"), str) or len(it.get("choices") or []) != 4 \
                or it.get("answer") not in range(4):
            raise ValueError(f"{path}: record {i} is not {{question, choices[4], answer 0-3}}")
    return items


def format_mmlu(item: dict[str, Any], with_answer: bool) -> str:
    lines = [item["question"].strip()] + [f"{L}. {str(c).strip()}" for L, c in zip(LETTERS, item["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[item['answer']]}\n\n" if with_answer else text


def split_mmlu(items: Sequence[dict[str, Any]], n: int, k_shot: int, seed: int = 0):
    """(shots, eval items): a seeded permutation; the first ``k_shot`` are the fixed shots, the next
    ``n`` are evaluated (disjoint)."""
    order = random.Random(seed).sample(range(len(items)), len(items))
    if k_shot + n > len(items):
        raise ValueError(f"{len(items)} MMLU items, but {k_shot} shots + {n} questions requested")
    return [items[i] for i in order[:k_shot]], [items[i] for i in order[k_shot:k_shot + n]]


def mmlu_accuracy(model, tok, path: str, n: int = 100, k_shot: int = 3, seed: int = 0, batch_size: int = 8,
                  alpha: float = 0.05) -> dict[str, Any]:
    """Few-shot MMLU accuracy: the prediction is the letter among ' A'..' D' with the highest logit
    after 'Answer:'. Chance 0.25."""
    shots, evals = split_mmlu(load_mmlu(path), n, k_shot, seed)
    letter_ids = [tok(" " + L, add_special_tokens=False)["input_ids"] for L in LETTERS]
    if any(len(x) != 1 for x in letter_ids) or len({x[0] for x in letter_ids}) != 4:
        raise ValueError(f"answer letters are not single distinct tokens for this tokenizer: {letter_ids}")
    prefix = tok(MMLU_HEADER + "".join(format_mmlu(s, True) for s in shots))["input_ids"]
    suffixes = [tok(format_mmlu(it, False), add_special_tokens=False)["input_ids"] for it in evals]
    logits = last_logits_after_prefix(model, prefix, suffixes, pad_id_of(tok), batch_size)
    preds = logits[:, [x[0] for x in letter_ids]].argmax(-1).tolist()
    correct = [p == it["answer"] for p, it in zip(preds, evals)]
    return {"score": sum(correct) / len(correct), "n": len(correct), "k_shot": k_shot, "seed": seed,
            "predictions": preds, "correct": correct, **_chance_fields(correct, 0.25, alpha),
            "protocol": RETENTION_PROTOCOLS["mmlu"], "higher_is_better": True}


# ----------------------------------------------------------------------------- GSM8K

def load_gsm8k(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    for i, it in enumerate(items):
        if "####" not in it.get("answer", "") or not it.get("question"):
            raise ValueError(f"{path}: line {i + 1} has no question or no '#### <answer>'")
    return items


def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_shot(item: dict[str, str]) -> str:
    """A worked example: calculator annotations removed, one line, ending 'The answer is N.'"""
    reasoning = re.sub(r"<<[^>]*>>", "", item["answer"].split("####")[0])
    reasoning = " ".join(reasoning.split())
    return f"Question: {item['question'].strip()}\nAnswer: {reasoning} The answer is {gsm8k_gold(item['answer'])}.\n\n"


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last 'answer is', else the last number in the text; commas removed."""
    stated = re.findall(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    nums = stated or re.findall(_NUMBER, text)
    return nums[-1].replace(",", "") if nums else None


def _same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def gsm8k_accuracy(model, tok, test_path: str, train_path: str, n: int = 50, k_shot: int = 4,
                   max_new_tokens: int = 160, batch_size: int = 8, alpha: float = 0.05) -> dict[str, Any]:
    """Few-shot GSM8K accuracy on the first ``n`` test problems with the first ``k_shot`` train
    problems as shots, greedy. GSM8K has no guessing chance level; ``chance`` is the majority
    baseline (share of the evaluated items whose gold answer is the most common one)."""
    shots, evals = load_gsm8k(train_path)[:k_shot], load_gsm8k(test_path)[:n]
    prefix = tok("".join(gsm8k_shot(s) for s in shots))["input_ids"]
    suffixes = [tok(f"Question: {it['question'].strip()}\nAnswer:", add_special_tokens=False)["input_ids"]
                for it in evals]
    texts = greedy_after_prefix(model, tok, prefix, suffixes, max_new_tokens, GSM8K_STOP, batch_size)
    golds = [gsm8k_gold(it["answer"]) for it in evals]
    preds = [extract_gsm8k_answer(t) for t in texts]
    correct = [_same_number(p, g) for p, g in zip(preds, golds)]
    majority = Counter(golds).most_common(1)[0][1] / len(golds)
    return {"score": sum(correct) / len(correct), "n": len(correct), "k_shot": k_shot,
            "predictions": preds, "golds": golds, "correct": correct, "texts": texts,
            **_chance_fields(correct, majority, alpha),
            "protocol": RETENTION_PROTOCOLS["gsm8k"], "higher_is_better": True}
