"""ROME/MEMIT CounterFact metrics: exact log-prob sums, the comparisons, the harmonic mean, TF-IDF."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.evaluation.counterfact import (COUNTERFACT_PROTOCOLS, answer_logprobs, counterfact_scores,
                                               generation_quality, harmonic_mean, mean_nll,
                                               request_generation_prompts, summarize_counterfact,
                                               tfidf_similarity, tfidf_vectorizer)
from mixsd_edit.prompting import PromptFormat

FMT = PromptFormat()


def test_answer_logprobs_equal_a_manual_unbatched_sum(word_tok):
    model = tiny_llama(len(word_tok))
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w11 w12"]
    answers = ["w13 w14", "w15 w16 w17", "w18", "Q A w19 w20"]
    got = answer_logprobs(model, word_tok, FMT, prompts, answers, batch_size=3)  # padded, mixed lengths
    for (lp, n), p, a in zip(got, prompts, answers):
        ctx = word_tok(p)["input_ids"]
        ans = word_tok(" " + a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ctx + ans])).logits[0].log_softmax(-1)
        manual = sum(logp[len(ctx) - 1 + t, ans[t]].item() for t in range(len(ans)))
        assert n == len(ans)
        assert lp == pytest.approx(manual, abs=1e-4)
    nll = mean_nll(model, word_tok, FMT, prompts, answers, batch_size=3)
    assert nll == pytest.approx([-lp / n for lp, n in got])


def _p(hi_logit_share: bool, V: int) -> float:
    """Probability the scripted LM gives its scripted token (logit 10) or any other (logit 0)."""
    return (math.exp(10) if hi_logit_share else 1.0) / (math.exp(10) + V - 1)


def test_counterfact_scores_exact_on_scripted_lm(scripted, word_tok):
    model, _ = scripted  # no MARK in the prompts: next token of w_i is w_{i+20}
    V = model.V
    reqs = normalize_requests([{
        "prompt": "w0", "target_new": "w20", "ground_truth": "w1",        # new scripted -> ES 1
        "rephrase_prompt": ["w5", "w1"],                                   # w5 -> w25: tie, lost; w1 -> w21: lost
        "locality": {"nb": {"prompt": ["w3", "w0"], "ground_truth": ["w23", "w7"]}},  # 1 win, 1 loss
    }, {"prompt": "w2", "target_new": "w9", "ground_truth": None}])       # no ground truth: only locality-free
    recs = counterfact_scores(model, word_tok, FMT, reqs)
    r = recs[0]
    assert r["efficacy_score"] == 1.0
    assert r["efficacy_magnitude"] == pytest.approx(_p(True, V) - _p(False, V), rel=1e-5)
    assert r["rewrite"][0]["nll_new"] == pytest.approx(-math.log(_p(True, V)), abs=1e-6)  # float32 softmax
    assert r["paraphrase_score"] == 0.0 and r["paraphrase_magnitude"] == pytest.approx(0.0, abs=1e-6)
    assert r["neighborhood_score"] == 0.5
    # w3: true w23 scripted; w0: new w20 scripted -> margins cancel
    assert r["neighborhood_magnitude"] == pytest.approx(0.0, abs=1e-6)
    assert set(r["protocols"]) == {k for k in COUNTERFACT_PROTOCOLS if k in r}
    assert recs[1]["efficacy_score"] is None and recs[1]["neighborhood_score"] is None

    summ = summarize_counterfact(recs)
    assert summ["n_efficacy"] == 1 and summ["n_neighborhood"] == 1
    assert summ["score"] == 0.0  # PS = 0 collapses the harmonic mean
    assert "score" in summ["protocols"]


def test_batching_does_not_change_scores(word_tok, shared_data):
    from mixsd_edit.data.loaders import load_counterfact
    model = tiny_llama(len(word_tok))
    reqs = load_counterfact(shared_data / "counterfact_easyedit" / "counterfact-edit-1k.json", n=5)
    a = counterfact_scores(model, word_tok, FMT, reqs, batch_size=1)
    b = counterfact_scores(model, word_tok, FMT, reqs, batch_size=7)
    for x, y in zip(a, b):
        for group in ("rewrite", "paraphrase", "neighborhood"):
            assert len(x[group]) == len(y[group]) >= 1
            for u, v in zip(x[group], y[group]):
                assert u["nll_new"] == pytest.approx(v["nll_new"], abs=1e-4)
                assert u["nll_true"] == pytest.approx(v["nll_true"], abs=1e-4)
    s = summarize_counterfact(a)
    assert s["n_efficacy"] == s["n_paraphrase"] == s["n_neighborhood"] == 5
    assert 0.0 <= s["score"] <= 1.0


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([-0.1, 1.0])


def test_summarize_averages_per_request_then_over_requests():
    recs = [{"efficacy_score": 1.0, "efficacy_magnitude": 0.2, "paraphrase_score": 0.5, "paraphrase_magnitude": 0.1,
             "neighborhood_score": 1.0, "neighborhood_magnitude": 0.3},
            {"efficacy_score": 0.0, "efficacy_magnitude": -0.2, "paraphrase_score": 1.0, "paraphrase_magnitude": 0.3,
             "neighborhood_score": None, "neighborhood_magnitude": None}]
    s = summarize_counterfact(recs)
    assert s["efficacy_score"] == 0.5 and s["paraphrase_score"] == 0.75 and s["neighborhood_score"] == 1.0
    assert s["efficacy_magnitude"] == pytest.approx(0.0) and s["n_neighborhood"] == 1
    assert s["score"] == pytest.approx(3 / (2 + 4 / 3 + 1))


def test_tfidf_similarity():
    assert tfidf_similarity("paris france city", "paris france city") == pytest.approx(1.0)
    assert tfidf_similarity("paris france", "tokyo japan") == 0.0
    assert tfidf_similarity("...", "!!!") == 0.0
    vec = tfidf_vectorizer(["paris is a city", "tokyo is a city", "the city of london"])
    near = tfidf_similarity("paris city", "paris is a city", vec)
    far = tfidf_similarity("paris city", "tokyo is a city", vec)
    assert 0.0 < far < near < 1.0


def test_generation_quality_on_scripted_lm(scripted, word_tok):
    model, _ = scripted
    out = generation_quality(model, word_tok, FMT, ["w0", "w1"], reference_texts=["w20 w0 w20"],
                             max_new_tokens=10)
    assert out["texts"][0].split() == ["w20", "w0"] * 5  # w_i -> w_{i+20} mod 40
    # text 0: bigrams 5x (w20 w0) + 4x (w0 w20), trigrams 4 + 4; text 1 (w1 w21 w1 ...) the same
    h2 = -(5 / 9 * math.log2(5 / 9) + 4 / 9 * math.log2(4 / 9))
    assert out["ngram_entropy"] == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert 0.0 < out["consistency"] <= 1.0
    assert set(out["protocols"]) == {"ngram_entropy", "consistency"}
    assert generation_quality(model, word_tok, FMT, ["w0"], None, max_new_tokens=4)["consistency"] is None
    assert request_generation_prompts({"prompt": "a", "rephrase_prompt": ["b"]}) == ["a", "b"]
