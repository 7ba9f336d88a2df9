"""MixSD ``context_prefixes`` (methods/mixsd/prefixes.py): each target also trained after openings
taken from the key-statistics text; with key_rank_one the subject key is averaged over them."""
import random

import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.mixsd import apply as mixsd_apply
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.key_delta import subject_keys
from mixsd_edit.methods.mixsd.prefixes import context_prefixes, prefixed_requests
from mixsd_edit.training import target_nll_loss

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = ("Alpha beta gamma delta. Short one. Gamma delta epsilon zeta eta, theta\n"
        "Kappa lambda mu nu xi\nlower case start. Omega psi chi! Done")


def test_openings_are_the_first_words_of_long_enough_sentences():
    got = context_prefixes(TEXT, 4, 3, seed=0)
    assert sorted(got) == ["Alpha beta gamma.", "Gamma delta epsilon.", "Kappa lambda mu.", "Omega psi chi!"]
    assert context_prefixes(TEXT, 4, 3, seed=0) == got                     # seeded
    assert context_prefixes(TEXT, 0, 3, seed=0) == []
    with pytest.raises(ValueError, match="context_prefixes=5 needs 5 sentences of at least 3 words; the text has 4"):
        context_prefixes(TEXT, 5, 3, seed=0)


def test_prefixed_requests_keep_every_other_field_in_request_order():
    reqs = [{"prompt": "P1", "subject": "s1", "target_new": "t1"}, {"prompt": "P2", "subject": "s2", "target_new": "t2"}]
    got = prefixed_requests(reqs, ["A.", "B."])
    assert [r["prompt"] for r in got] == ["A. P1", "B. P1", "A. P2", "B. P2"]
    assert [r["subject"] for r in got] == ["s1", "s1", "s2", "s2"]
    assert reqs[0]["prompt"] == "P1"  # the caller's requests are not changed


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sentence_corpus(tmp_path_factory):
    """Sentences over the word tokenizer's vocabulary ('Q'/'A' are its capitalised words)."""
    r = random.Random(0)
    path = tmp_path_factory.mktemp("sentences") / "text.txt"
    words = [f"w{i}" for i in range(40)]
    lines = [" . ".join(f"{r.choice('QA')} " + " ".join(r.choices(words, k=r.randint(3, 12))) for _ in range(3)) + " ."
             for _ in range(200)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _reqs():
    return normalize_requests([{"prompt": "Q w3 w4", "target_new": "w30", "subject": "w3"},
                               {"prompt": "A w7 Q", "target_new": "w11 w12", "subject": "w7"}])


def _hp(corpus, **kw):
    base = dict(delta="key_rank_one", key_stats_dataset=str(corpus), key_stats_n_tokens=2000, key_stats_seq_len=16,
                lr=0.1, num_steps=20, layers=(0, 1), early_stop_loss=None, context_prefixes=2, context_prefix_words=3)
    base.update(kw)
    return mixsd_hparams(**base)


def test_every_target_is_also_trained_after_each_opening(word_tok, sentence_corpus, monkeypatch):
    seen = {}
    real = mixsd_apply.train_nll

    def spy(model, params, examples, *a, **kw):
        seen["examples"] = list(examples)
        return real(model, params, examples, *a, **kw)

    monkeypatch.setattr(mixsd_apply, "train_nll", spy)
    hp = _hp(sentence_corpus)
    prefixes = context_prefixes(sentence_corpus.read_text(), 2, 3, hp.seed)
    apply_mixsd_to_model(tiny_llama(len(word_tok), seed=2), word_tok, _reqs(), hp)
    ex = seen["examples"]
    assert len(ex) == 2 * 3
    contexts = [word_tok.decode(c) for c, _ in ex]
    assert contexts[:2] == ["Q w3 w4", "A w7 Q"]
    # the openings end with "." glued to the last word, which this word-level tokenizer reads as <unk>
    want = [word_tok.decode(word_tok(f"{p} {r}")["input_ids"]) for r in ("Q w3 w4", "A w7 Q") for p in prefixes]
    assert contexts[2:] == want
    assert [t for _, t in ex[2:]] == [ex[0][1]] * 2 + [ex[1][1]] * 2  # the same target ids after every opening


def test_the_subject_key_is_the_mean_over_the_bare_and_prefixed_contexts(word_tok, sentence_corpus):
    model = tiny_llama(len(word_tok), seed=2)
    hp = _hp(sentence_corpus)
    prefixes = context_prefixes(sentence_corpus.read_text(), 2, 3, hp.seed)
    mods = ["model.layers.0.mlp.down_proj"]
    got = mixsd_apply.edit_subject_keys(model, word_tok, _reqs(), hp, mods, prefixes)[mods[0]]
    bare = subject_keys(model, word_tok, _reqs(), hp, mods)[mods[0]]
    pre = subject_keys(model, word_tok, prefixed_requests(_reqs(), prefixes), hp, mods)[mods[0]]
    assert torch.allclose(got[0], (bare[0] + pre[0] + pre[1]) / 3, atol=1e-6)
    assert torch.allclose(got[1], (bare[1] + pre[2] + pre[3]) / 3, atol=1e-6)
    assert not torch.allclose(got, bare)  # the openings do change the keys


def test_bare_key_keeps_the_bare_prompts_key_and_still_trains_after_the_openings(word_tok, sentence_corpus):
    """``context_prefix_key: bare``: the direction is the bare prompt's key (the openings are in training
    only), and the edit differs from training without the openings."""
    model = tiny_llama(len(word_tok), seed=2)
    hp = _hp(sentence_corpus, context_prefix_key="bare")
    prefixes = context_prefixes(sentence_corpus.read_text(), 2, 3, hp.seed)
    mods = ["model.layers.0.mlp.down_proj"]
    got = mixsd_apply.edit_subject_keys(model, word_tok, _reqs(), hp, mods, prefixes)[mods[0]]
    assert torch.equal(got, subject_keys(model, word_tok, _reqs(), hp, mods)[mods[0]])

    def edited(hp_):
        m = tiny_llama(len(word_tok), seed=2)
        apply_mixsd_to_model(m, word_tok, _reqs(), hp_)
        return m.state_dict()[mods[0] + ".weight"]

    bare, none, mean = edited(hp), edited(_hp(sentence_corpus, context_prefixes=0)), edited(_hp(sentence_corpus))
    assert not torch.allclose(bare, none) and not torch.allclose(bare, mean)


def test_prefixed_training_writes_the_target_after_the_openings(word_tok, sentence_corpus):
    """After the same number of steps, the target's NLL after the openings is lower when they were trained on."""
    hp_on = _hp(sentence_corpus)
    prefixes = context_prefixes(sentence_corpus.read_text(), 2, 3, hp_on.seed)
    meta = []

    def nll_after_openings(hp):
        model = tiny_llama(len(word_tok), seed=2)
        meta.clear()
        apply_mixsd_to_model(model, word_tok, _reqs(), hp, metadata_out=meta)
        from mixsd_edit.prompting import PromptFormat
        fmt = PromptFormat(False, None)
        tgt = [word_tok(" " + m["target_text"].strip(), add_special_tokens=False)["input_ids"] for m in meta]
        batch = [(fmt.context_ids(word_tok, r["prompt"]), tgt[i // 2])
                 for i, r in enumerate(prefixed_requests(_reqs(), prefixes))]
        with torch.no_grad():
            return float(target_nll_loss(model, batch, 0, torch.device("cpu")))

    on, off = nll_after_openings(hp_on), nll_after_openings(_hp(sentence_corpus, context_prefixes=0))
    assert on < off


@pytest.mark.parametrize("kw, match", [({"context_prefixes": -1}, "context_prefixes must be >= 0"),
                                       ({"context_prefix_words": 0}, "context_prefix_words must be >= 1"),
                                       ({"context_prefixes": 2, "key_stats_dataset": None},
                                        "context_prefixes needs a key_stats_dataset"),
                                       ({"context_prefix_key": "prefixed"}, "context_prefix_key must be one of")])
def test_context_prefix_values_are_checked(kw, match):
    with pytest.raises(HyperParamsError, match=match):
        mixsd_hparams(**kw)


def test_too_few_sentences_is_an_error_and_the_model_is_untouched(word_tok, corpus):
    """The conftest corpus has no capitalised sentences: the error names the setting, the model is restored."""
    model = tiny_llama(len(word_tok), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="context_prefixes=2 needs 2 sentences"):
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
