"""``model_samples``: the statistics corpus the model samples itself (offline whitening)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from mixsd_edit.methods.locate import stats as S
from mixsd_edit.methods.locate.sampled_corpus import MODEL_SAMPLES, sample_token_sequences, sampled_corpus

MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sampling_is_seeded_and_leaves_global_rng_alone(tok):
    model = tiny_llama(len(tok))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = sample_token_sequences(model, tok, 50, 10, seed=0, batch_size=2)
    assert torch.equal(torch.rand(3), before)  # the global generator was not consumed
    c = sample_token_sequences(model, tok, 50, 10, seed=1, batch_size=2)
    assert len(a) == 5 and all(len(s) == 10 for s in a)
    assert a == sample_token_sequences(model, tok, 50, 10, seed=0, batch_size=2)
    assert a != c


def test_samples_follow_the_model(tok):
    """A model whose next-token distribution is concentrated on one token samples (almost) only it."""
    model = tiny_llama(len(tok))
    target = 7
    bump = 30.0 * torch.nn.functional.one_hot(torch.tensor(target), len(tok)).float()
    h = model.lm_head.register_forward_hook(lambda m, a, o: o + bump.to(o.dtype))
    try:
        seqs = sample_token_sequences(model, tok, 40, 8, seed=0)
    finally:
        h.remove()
    assert all(t == target for s in seqs for t in s)


def test_corpus_file_is_cached_and_feeds_second_moments(tok, cache):
    model = tiny_llama(len(tok), layers=2)
    p1 = sampled_corpus(model, tok, 200, 16, seed=0)
    mtime = p1.stat().st_mtime_ns
    assert p1.parent == cache / "corpora" and p1.read_text().strip()
    assert sampled_corpus(model, tok, 200, 16, seed=0) == p1 and p1.stat().st_mtime_ns == mtime  # reused
    assert sampled_corpus(model, tok, 200, 16, seed=1) != p1  # the seed is part of the key
    got = S.second_moments(model, tok, MODULES, MODEL_SAMPLES, 200, 16, progress=False)
    direct = S.second_moments(model, tok, MODULES, sampled_corpus(model, tok, 210, 16), 200, 16, progress=False)
    for m in MODULES:
        assert got[m].shape == (model.config.intermediate_size,) * 2
        torch.testing.assert_close(got[m], direct[m])
        assert torch.linalg.eigvalsh(got[m]).min() > -1e-9  # a second-moment matrix: PSD


def test_check_corpus_accepts_model_samples_and_rejects_missing_files(tmp_path):
    S.check_corpus(MODEL_SAMPLES)
    with pytest.raises(S.StatsError, match="not found"):
        S.check_corpus(tmp_path / "missing.txt")
