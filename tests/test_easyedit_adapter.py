"""The adapter registers MixSD into an EasyEdit-shaped module without touching its files."""
import sys
import types

import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.easyedit_adapter import apply_mixsd_for_easyedit, as_easyedit_hparams, register_into_easyedit


@pytest.fixture
def fake_easyeditor(monkeypatch):
    root = types.ModuleType("easyeditor")
    util = types.ModuleType("easyeditor.util")
    alg = types.ModuleType("easyeditor.util.alg_dict")
    alg.ALG_DICT = {"ROME": object()}
    editors = types.ModuleType("easyeditor.editors")
    be = types.ModuleType("easyeditor.editors.batch_editor")

    class BatchEditor:
        @staticmethod
        def is_batchable_method(alg_name: str):
            return alg_name in ("MEMIT", "FT")

    be.BatchEditor = BatchEditor
    root.util, util.alg_dict, root.editors, editors.batch_editor = util, alg, editors, be
    for name, mod in {"easyeditor": root, "easyeditor.util": util, "easyeditor.util.alg_dict": alg,
                      "easyeditor.editors": editors, "easyeditor.editors.batch_editor": be}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return root


def test_register_adds_to_alg_dict_and_batchable(fake_easyeditor):
    register_into_easyedit()
    register_into_easyedit()  # idempotent
    alg = fake_easyeditor.util.alg_dict.ALG_DICT
    be = fake_easyeditor.editors.batch_editor.BatchEditor
    assert alg["MixSD"] is apply_mixsd_for_easyedit and "ROME" in alg
    assert be.is_batchable_method("MixSD") and be.is_batchable_method("MEMIT") and not be.is_batchable_method("ROME")


def test_missing_easyedit_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyeditor", None)
    with pytest.raises(ImportError, match="importable EasyEdit"):
        register_into_easyedit()


def test_easyedit_style_call_with_namespace_hparams(word_tok):
    hp = mixsd_hparams(num_steps=2)
    ns = as_easyedit_hparams(hp)
    assert ns.fp16 is False and ns.mix_lambda == hp.mix_lambda
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # EasyEdit's request shape: rephrase as a string, locality values as strings
    req = {"prompt": "Q w1", "target_new": "w5", "ground_truth": "w2", "subject": "w1", "rephrase_prompt": "A w1",
           "locality": {"neighborhood": {"prompt": "Q w3", "ground_truth": "w4"}}, "portability": {}}
    edited, wc = apply_mixsd_for_easyedit(model, word_tok, [req], ns, copy=False, return_orig_weights=True,
                                          keep_original_weight=False, train_ds=None)
    assert wc and any(not torch.equal(before[k], edited.state_dict()[k]) for k in wc)


def _easyedit_loop(model, tok, requests, ns, sequential):
    """EasyEdit's BaseEditor loop in miniature: one apply call per request, weights copied back after each
    unless ``sequential``. Returns each call's ``past_edit_keys_protected``."""
    protected = []
    for req in requests:
        meta = []
        model, wc = apply_mixsd_for_easyedit(model, tok, [req], ns, copy=False, return_orig_weights=True,
                                             keep_original_weight=False, train_ds=None, metadata_out=meta)
        protected.append(meta[0]["past_edit_keys_protected"])
        if not sequential:
            with torch.no_grad():
                for k, v in wc.items():
                    model.get_parameter(k)[...] = v
    return protected


def _past_hp(corpus, w):
    return mixsd_hparams(delta="key_rank_one", lr=0.1, num_steps=3, early_stop_loss=None,
                         key_stats_dataset=str(corpus), key_stats_n_tokens=2000, key_stats_seq_len=16,
                         past_edit_key_weight=w)


@pytest.mark.usefixtures("one_thread")
def test_easyedit_sequential_loop_keeps_the_earlier_edits_keys(word_tok, corpus):
    reqs = [{"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{i + 20}", "subject": f"w{i}"} for i in (3, 7, 11)]
    model = tiny_llama(len(word_tok), seed=4)
    ns = as_easyedit_hparams(_past_hp(corpus, 1.0))
    # single edits (weights restored after each): every call starts a new sequence
    assert _easyedit_loop(model, word_tok, reqs, ns, sequential=False) == [0, 0, 0]
    # a sequence: each call avoids the keys of the edits still in the model
    assert _easyedit_loop(model, word_tok, reqs, ns, sequential=True) == [0, 1, 2]
    # the same model edited further without a restore: the three edits are still there, so still protected
    assert _easyedit_loop(model, word_tok, reqs[:1], ns, sequential=True) == [3]
    # weights changed outside the adapter (by the user, another method): a new sequence
    with torch.no_grad():
        model.get_parameter("model.layers.0.mlp.down_proj.weight")[0, 0] += 1.0
    assert _easyedit_loop(model, word_tok, reqs[:2], ns, sequential=True) == [0, 1]


@pytest.mark.usefixtures("one_thread")
def test_easyedit_loop_without_the_weight_tracks_nothing(word_tok, corpus):
    reqs = [{"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{i + 20}", "subject": f"w{i}"} for i in (3, 7)]
    model = tiny_llama(len(word_tok), seed=4)
    assert _easyedit_loop(model, word_tok, reqs, as_easyedit_hparams(_past_hp(corpus, 0.0)), sequential=True) == [0, 0]


def test_weights_hash_sees_one_bit_and_every_dtype():
    from mixsd_edit.weights import weights_hash
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
        h = weights_hash({"a": w})
        assert weights_hash({"a": w.clone()}) == h
        bits = w.view(torch.int16 if w.element_size() == 2 else torch.int32 if w.element_size() == 4 else torch.int64)
        flipped = bits.clone()
        flipped[1, 2] ^= 1  # the lowest mantissa bit of one entry
        assert weights_hash({"a": flipped.view(dtype)}) != h
        assert weights_hash({"b": w}) != h
