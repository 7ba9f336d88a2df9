"""Second-moment statistics: correctness, one pass for all layers, disk cache and its failure modes."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import WORDS, tiny_llama

from mixsd_edit.methods.locate import stats as S
from mixsd_edit.prompting import pad_id_of, pad_right

MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
N_TOKENS, SEQ_LEN = 300, 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counted(monkeypatch):
    """Count passes over the corpus and record which modules each pass collected."""
    calls: list[list[str]] = []
    real = S.accumulate_second_moments

    def wrapper(model, tok, module_names, *a, **kw):
        calls.append(list(module_names))
        return real(model, tok, module_names, *a, **kw)

    monkeypatch.setattr(S, "accumulate_second_moments", wrapper)
    return calls


def moments(model, tok, corpus, modules=MODULES, **kw):
    return S.second_moments(model, tok, modules, corpus, N_TOKENS, SEQ_LEN, progress=False, **kw)


def test_matches_direct_computation(tok, corpus, cache):
    model = tiny_llama(len(tok), layers=3)
    got = moments(model, tok, corpus)
    keys = {m: [] for m in MODULES}
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, a, o, m=m: keys[m].append(a[0])) for m in MODULES]
    chunks = list(S.token_chunks(tok, corpus, N_TOKENS, SEQ_LEN))
    assert sum(len(c) - lead for c, lead in chunks) == N_TOKENS
    with torch.no_grad():
        ids, mask = pad_right([c for c, _ in chunks], pad_id_of(tok))
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    for m in MODULES:
        k = keys[m][0][mask.bool()].double()  # every kept key, materialised only in this test
        assert k.shape[0] == N_TOKENS
        torch.testing.assert_close(got[m], k.T @ k / N_TOKENS, rtol=1e-5, atol=1e-9)  # batching changes float32 rounding only
        assert got[m].dtype == torch.float64


def test_one_pass_collects_all_layers_and_stops_early(tok, corpus, cache, counted):
    model = tiny_llama(len(tok), layers=3)
    runs = {"model": 0, "top": 0}
    model.register_forward_pre_hook(lambda *a: runs.__setitem__("model", runs["model"] + 1))
    model.model.layers[2].register_forward_pre_hook(lambda *a: runs.__setitem__("top", runs["top"] + 1))
    moments(model, tok, corpus)
    n_batches = math.ceil(math.ceil(N_TOKENS / SEQ_LEN) / 4)  # 4 chunks per forward
    assert counted == [MODULES]
    assert runs["model"] == n_batches  # one pass, not one per layer
    assert runs["top"] == 0  # layers above the deepest requested one never run


def test_cache_is_reused_and_only_missing_layers_computed(tok, corpus, cache, counted):
    model = tiny_llama(len(tok), layers=3)
    first = moments(model, tok, corpus, modules=MODULES[:1])
    again = moments(model, tok, corpus, modules=MODULES[:1])
    assert counted == [MODULES[:1]]  # the second call read the cache
    assert torch.equal(first[MODULES[0]], again[MODULES[0]])
    both = moments(model, tok, corpus)
    assert counted == [MODULES[:1], MODULES[1:]]
    assert torch.equal(both[MODULES[0]], first[MODULES[0]])
    files = sorted((cache / "stats").iterdir())
    assert len(files) == 2 and not any(f.suffix == ".tmp" for f in files)


def _only_file(cache, module):
    (f,) = [p for p in (cache / "stats").iterdir() if p.name.startswith(module)]
    return f


def test_truncated_cache_is_recomputed(tok, corpus, cache, counted, caplog):
    model = tiny_llama(len(tok), layers=3)
    ref = moments(model, tok, corpus, modules=MODULES[:1])[MODULES[0]]
    f = _only_file(cache, MODULES[0])
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        got = moments(model, tok, corpus, modules=MODULES[:1])[MODULES[0]]
    assert "unreadable" in caplog.text and len(counted) == 2
    assert torch.equal(got, ref)
    assert S.load_cached(f, torch.load(f, weights_only=True)["key"]) is not None  # rewritten, valid


def test_corrupt_matrix_fails_checksum(tok, corpus, cache, counted, caplog):
    model = tiny_llama(len(tok), layers=3)
    ref = moments(model, tok, corpus, modules=MODULES[:1])[MODULES[0]]
    f = _only_file(cache, MODULES[0])
    payload = torch.load(f, weights_only=True)
    payload["mom2"][3, 5] += 1.0  # a loadable file whose numbers changed
    torch.save(payload, f)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        got = moments(model, tok, corpus, modules=MODULES[:1])[MODULES[0]]
    assert "checksum" in caplog.text and len(counted) == 2
    assert torch.equal(got, ref)


def test_cache_of_another_model_is_not_used(tok, corpus, cache, counted, caplog, tmp_path):
    model_a, model_b = tiny_llama(len(tok), seed=0, layers=3), tiny_llama(len(tok), seed=1, layers=3)
    moments(model_a, tok, corpus, modules=MODULES[:1])
    f_a = _only_file(cache, MODULES[0])
    # Where model B's statistics would live, put model A's file.
    key_b = {"model": S.model_identity(model_b), "tokenizer": S.tokenizer_identity(tok),
             "corpus_sha256": S.file_sha256(corpus), "n_tokens": N_TOKENS, "seq_len": SEQ_LEN,
             "dtype": str(torch.float32), "module": MODULES[0]}
    f_b = S.cache_path(cache, key_b)
    f_b.write_bytes(f_a.read_bytes())
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        got = moments(model_b, tok, corpus, modules=MODULES[:1])[MODULES[0]]
    assert "another key" in caplog.text and len(counted) == 2
    fresh = moments(model_b, tok, corpus, modules=MODULES[:1], cache_dir=tmp_path / "other")[MODULES[0]]
    assert torch.equal(got, fresh)
    assert S.model_identity(model_a) != S.model_identity(model_b)


def test_key_tracks_corpus_and_sample_count(tok, corpus, cache, counted, tmp_path):
    model = tiny_llama(len(tok), layers=3)
    moments(model, tok, corpus, modules=MODULES[:1])
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text() + "w1 w2\n")
    moments(model, tok, other, modules=MODULES[:1])
    S.second_moments(model, tok, MODULES[:1], corpus, N_TOKENS - 1, SEQ_LEN, progress=False)
    assert len(counted) == 3


def test_missing_corpus_fails_before_any_work(tok, cache, tmp_path, monkeypatch):
    model = tiny_llama(len(tok), layers=3)
    runs = []
    model.register_forward_pre_hook(lambda *a: runs.append(1))
    with pytest.raises(S.StatsError, match="not found"):
        moments(model, tok, tmp_path / "no_such_corpus.txt")
    monkeypatch.delenv("SOME_UNSET_VAR_FOR_TEST", raising=False)
    with pytest.raises(S.StatsError, match="environment variable"):
        moments(model, tok, "${SOME_UNSET_VAR_FOR_TEST}/wiki.txt")
    assert runs == [] and not cache.exists()


def test_unknown_module_is_an_error(tok, corpus, cache):
    with pytest.raises(ValueError, match="does not exist"):
        moments(tiny_llama(len(tok), layers=3), tok, corpus, modules=["model.layers.9.mlp.down_proj"])


def test_bos_is_fed_but_not_counted(corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    chunks = list(S.token_chunks(tok, corpus, 100, 10))
    assert all(c[0] == 1 and lead == 1 and len(c) <= 10 for c, lead in chunks)
    assert sum(len(c) - lead for c, lead in chunks) == 100


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from mixsd_edit.models import default_cache_root

    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "a"))
    assert default_cache_root() == tmp_path / "a"
    monkeypatch.delenv("MIXSD_EDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "mixsd_edit"
