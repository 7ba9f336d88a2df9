"""ROME/MEMIT CounterFact metrics: probability comparisons between the new and the true object.

Convention (ROME's ``compute_rewrite_quality_counterfact``): an answer is scored after a context by
its **mean per-token negative log-likelihood** ``nll = -(1/n) * sum_t log p(a_t | context, a_<t)``,
teacher-forced, with the answer tokenised by :meth:`PromptFormat.answer_ids` (leading space for
cloze prompts). "P(answer)" below means ``exp(-nll)``, the geometric-mean per-token probability —
what ROME's magnitudes use. Comparisons (``P(new) > P(true)``) are comparisons of mean NLLs, so a
long answer is not penalised for its length.

Per request (``counterfact_scores``), each prompt gives a pair ``{nll_new, nll_true}``; a request's
score is the mean over its prompts, and ``summarize_counterfact`` averages over requests (ROME's
two-level averaging) and adds ``score`` = harmonic mean of ES, PS and NS. Every result dict carries
``protocols``: ``{score name: description}`` taken from ``COUNTERFACT_PROTOCOLS``.

Generation (``generation_quality``): greedy text from prompts, scored by n-gram entropy and by TF-IDF
cosine similarity to reference text that the caller supplies (ROME uses Wikipedia text about the
new object; we have none, see the function's docstring).
"""
from __future__ import annotations

import logging
import math
from statistics import mean
from typing import Any, Mapping, Sequence

import torch

from mixsd_edit.evaluation.metrics import greedy_generate, ngram_entropy
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right

logger = logging.getLogger(__name__)

_P = "P(x) = exp(-mean per-token NLL of answer x after the prompt), teacher-forced"
COUNTERFACT_PROTOCOLS = {
    "efficacy_score": f"share of prompts with P(target_new) > P(ground_truth) (ROME ES); {_P}",
    "efficacy_magnitude": f"mean P(target_new) - P(ground_truth) on the prompt (ROME EM); {_P}",
    "paraphrase_score": f"share of rephrase prompts with P(target_new) > P(ground_truth) (ROME PS); {_P}",
    "paraphrase_magnitude": f"mean P(target_new) - P(ground_truth) on rephrase prompts (ROME PM); {_P}",
    "neighborhood_score": f"share of locality prompts with P(locality answer) > P(target_new) (ROME NS); {_P}",
    "neighborhood_magnitude": f"mean P(locality answer) - P(target_new) on locality prompts (ROME NM); {_P}",
    "score": "harmonic mean of efficacy_score, paraphrase_score, neighborhood_score (ROME S), over requests",
    "ngram_entropy": "n-gram entropy (2/3*H2 + 4/3*H3)/2 in bits of greedy generations, mean over texts (ROME GE)",
    "consistency": "TF-IDF cosine similarity between the joined generations and the joined caller-supplied "
                   "reference texts (ROME RS, with our references instead of Wikipedia)",
}
_GROUPS = (("efficacy", "rewrite"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood"))


@torch.no_grad()
def answer_logprobs(model, tok, fmt: PromptFormat, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = 16) -> list[tuple[float, int]]:
    """For each (prompt, answer): (sum of the answer tokens' log-probs, number of answer tokens).

    Exact teacher-forced scoring in float32; batches are right-padded, which leaves every real
    position's causal logits unchanged.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    seqs, spans = [], []
    for p, a in zip(prompts, answers):
        ctx, ans = fmt.context_ids(tok, p), fmt.answer_ids(tok, a)
        if not ctx or not ans:
            raise ValueError(f"empty context or answer tokens for prompt={p!r}, answer={a!r}")
        seqs.append(ctx + ans)
        spans.append((len(ctx), len(ans)))
    dev = next(model.parameters()).device
    pad = pad_id_of(tok)
    out: list[tuple[float, int]] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_right(chunk, pad)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for j, seq in enumerate(chunk):
            start, n = spans[s + j]
            # logits at position t predict token t+1: the answer is predicted from start-1 .. start+n-2
            logp = logits[j, start - 1:start - 1 + n].float().log_softmax(-1)
            tgt = torch.tensor(seq[start:start + n], device=logp.device)
            out.append((float(logp.gather(-1, tgt[:, None]).sum()), n))
    return out


def mean_nll(model, tok, fmt: PromptFormat, prompts: Sequence[str], answers: Sequence[str],
             batch_size: int = 16) -> list[float]:
    """ROME's answer score: mean per-token negative log-likelihood of each answer after its prompt."""
    return [-lp / n for lp, n in answer_logprobs(model, tok, fmt, prompts, answers, batch_size)]


def _comparisons(req: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(group, prompt, new answer, true answer) for every scored prompt of one request. For
    neighbourhood prompts "true" is the locality ground truth and "new" the request's target_new."""
    new, true = req["target_new"], req.get("ground_truth")
    rows = []
    if true:
        rows.append(("rewrite", req["prompt"], new, true))
        rows += [("paraphrase", p, new, true) for p in req.get("rephrase_prompt") or []]
    for block in (req.get("locality") or {}).values():
        rows += [("neighborhood", p, new, t) for p, t in zip(block["prompt"], block["ground_truth"])]
    return rows


def _group_scores(pairs: list[dict[str, Any]], new_wins: bool) -> tuple[float | None, float | None]:
    """(share of prompts where the favoured answer is more likely, mean probability margin)."""
    if not pairs:
        return None, None
    sign = 1.0 if new_wins else -1.0
    score = mean(float(sign * (p["nll_true"] - p["nll_new"]) > 0) for p in pairs)
    magnitude = mean(sign * (math.exp(-p["nll_new"]) - math.exp(-p["nll_true"])) for p in pairs)
    return score, magnitude


def counterfact_scores(model, tok, fmt: PromptFormat, requests: Sequence[Mapping[str, Any]],
                       batch_size: int = 16) -> list[dict[str, Any]]:
    """Per-request CounterFact scores for canonical requests (see ``mixsd_edit.data.requests``).

    Each record: ``case_id``; ``rewrite`` / ``paraphrase`` / ``neighborhood``: per-prompt
    ``{prompt, nll_new, nll_true}`` (mean per-token NLL of target_new and of the true answer — the
    request's ground_truth, or the locality ground truth for neighbourhood prompts); the request-level
    ``efficacy_score`` / ``efficacy_magnitude``, ``paraphrase_*``, ``neighborhood_*`` (None when the
    request has no such prompt, or no ground_truth for efficacy/paraphrase); ``protocols``.
    All requests' (prompt, answer) pairs are scored in shared batches.
    """
    rows = [_comparisons(r) for r in requests]
    flat = [row for rs in rows for row in rs]
    prompts = [p for _, p, _, _ in flat] * 2
    answers = [n for _, _, n, _ in flat] + [t for _, _, _, t in flat]
    nlls = mean_nll(model, tok, fmt, prompts, answers, batch_size) if flat else []
    k = len(flat)
    records, i = [], 0
    for req, rs in zip(requests, rows):
        rec: dict[str, Any] = {"case_id": req.get("case_id"), "rewrite": [], "paraphrase": [], "neighborhood": []}
        for group, prompt, _, _ in rs:
            rec[group].append({"prompt": prompt, "nll_new": nlls[i], "nll_true": nlls[k + i]})
            i += 1
        for name, group in _GROUPS:
            rec[f"{name}_score"], rec[f"{name}_magnitude"] = _group_scores(rec[group], group != "neighborhood")
        rec["protocols"] = {key: COUNTERFACT_PROTOCOLS[key] for key in COUNTERFACT_PROTOCOLS if key in rec}
        records.append(rec)
    return records


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0.0 if any value is 0 (ROME's Score collapses when one component does)."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize_counterfact(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each request-level score over the requests that have it, plus ``score`` (harmonic
    mean of ES, PS, NS; None if one of them is missing) and ``n_<group>`` counts."""
    out: dict[str, Any] = {}
    for name, _ in _GROUPS:
        for kind in ("score", "magnitude"):
            vals = [r[f"{name}_{kind}"] for r in records if r.get(f"{name}_{kind}") is not None]
            out[f"{name}_{kind}"] = mean(vals) if vals else None
        out[f"n_{name}"] = sum(r.get(f"{name}_score") is not None for r in records)
    parts = [out[f"{name}_score"] for name, _ in _GROUPS]
    out["score"] = None if any(p is None for p in parts) else harmonic_mean(parts)
    out["protocols"] = {key: COUNTERFACT_PROTOCOLS[key] for key in COUNTERFACT_PROTOCOLS if key in out}
    return out


def tfidf_vectorizer(corpus: Sequence[str]):
    """A TF-IDF vectorizer whose IDF weights come from ``corpus`` (ROME fits its IDF on Wikipedia;
    WikiText-2 paragraphs are a fair stand-in). Needs scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    return TfidfVectorizer().fit(list(corpus))


def tfidf_similarity(text_a: str, text_b: str, vectorizer=None) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts. Without a fitted ``vectorizer`` the IDF
    is fitted on the two texts themselves (words in both get the lowest weight) — a usable but weaker
    default; pass ``tfidf_vectorizer(corpus)`` for ROME-like weighting. 0.0 if a text has no known word."""
    if vectorizer is None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        try:
            vectorizer = TfidfVectorizer().fit([text_a, text_b])
        except ValueError:  # no word at all in either text
            return 0.0
    a, b = torch.from_numpy(vectorizer.transform([text_a, text_b]).toarray()).double()
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def generation_quality(model, tok, fmt: PromptFormat, prompts: Sequence[str],
                       reference_texts: Sequence[str] | None = None, max_new_tokens: int = 100,
                       vectorizer=None, batch_size: int = 16) -> dict[str, Any]:
    """Fluency and consistency of greedy text generated from ``prompts`` (ROME GE / RS).

    ``ngram_entropy``: mean over the generated texts. ``consistency``: TF-IDF cosine similarity of
    the joined generations to the joined ``reference_texts`` — text that states or is about the new
    object. ROME uses Wikipedia text about target_new; we have none, so the caller chooses, e.g.
    generations of the UNEDITED model from prompts about other subjects whose true object is the
    request's target_new, or any hand-written text about it. None when no reference is given.
    Greedy decoding (deterministic), not ROME's top-k sampling: greedy text repeats more, so its
    entropy is lower than ROME's numbers for the same model.
    """
    texts = greedy_generate(model, tok, fmt, list(prompts), max_new_tokens, batch_size)
    consistency = None
    if reference_texts:
        consistency = tfidf_similarity(" ".join(texts), " ".join(reference_texts), vectorizer)
    return {
        "ngram_entropy": mean(ngram_entropy(t) for t in texts) if texts else None,
        "consistency": consistency,
        "texts": texts,
        "protocols": {k: COUNTERFACT_PROTOCOLS[k] for k in ("ngram_entropy", "consistency")},
    }


def request_generation_prompts(req: Mapping[str, Any]) -> list[str]:
    """Prompts to generate from for one request: its prompt and its rephrase prompts."""
    return [req["prompt"], *(req.get("rephrase_prompt") or [])]
