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
