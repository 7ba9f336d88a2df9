"""benchmarks/bleed_positions.py: taking an edit's weight change back at chosen token positions."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from mixsd_edit.evaluation.metrics import teacher_forced_predictions
from mixsd_edit.prompting import PromptFormat

pytestmark = pytest.mark.usefixtures("one_thread")
_spec = importlib.util.spec_from_file_location(
    "bleed_positions", Path(__file__).resolve().parent.parent / "benchmarks" / "bleed_positions.py")
bleed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bleed)
EDITED = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def _edited(tok, scale=3.0):
    """A tiny Llama with a random change to two down_proj weights -> (model, originals)."""
    model = tiny_llama(len(tok))
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in EDITED}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in EDITED:
            params[n].add_(scale * torch.randn(params[n].shape, generator=g) / params[n].shape[1] ** 0.5)
    return model, originals


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_taking_the_change_back_everywhere_or_before_a_position_gives_the_unedited_model(tok):
    model, originals = _edited(tok)
    ids = tok("w1 w2 w3 w4 w5 w6 w7").input_ids
    edited = _logits(model, ids)
    deltas = bleed.weight_changes(model, originals)
    assert sorted(deltas) == [n[: -len(".weight")] for n in EDITED]
    with bleed.taken_back_at(model, deltas, range(len(ids))):
        back = _logits(model, ids)
    with bleed.taken_back_at(model, deltas, range(4)):
        front = _logits(model, ids)
    with bleed.taken_back_at(model, deltas, []):
        none = _logits(model, ids)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in originals.items():
            params[n].copy_(w)
    unedited = _logits(model, ids)
    assert not torch.allclose(edited, unedited, atol=1e-3)  # the change does move the outputs
    assert torch.allclose(back, unedited, atol=1e-4)
    assert torch.allclose(front[:4], unedited[:4], atol=1e-4)   # causal: the first four see no change
    assert not torch.allclose(front[4:], unedited[4:], atol=1e-3)  # the later ones still do
    assert torch.equal(none, edited)
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed


def test_position_reverts_all_restores_the_unedited_predictions(tok):
    fmt = PromptFormat()
    model, originals = _edited(tok, scale=20.0)
    prompt, answer = "w3 w9 w4 w1", "w7 w8"
    deltas = bleed.weight_changes(model, originals)
    params = dict(model.named_parameters())
    edited = {n: params[n].detach().clone() for n in EDITED}
    with torch.no_grad():
        for n, w in originals.items():
            params[n].copy_(w)
    before = teacher_forced_predictions(model, tok, fmt, [prompt], [answer])[0][0]
    with torch.no_grad():
        for n, w in edited.items():
            params[n].copy_(w)
    after = teacher_forced_predictions(model, tok, fmt, [prompt], [answer])[0][0]
    assert after != before  # the change moves this neighbour, so "all" has something to give back
    r = bleed.position_reverts(model, tok, fmt, deltas, prompt, answer, before)
    n_seq = len(fmt.context_ids(tok, prompt)) + len(fmt.answer_ids(tok, answer))
    assert r["n_prompt"] == len(fmt.context_ids(tok, prompt)) and len(r["each"]) == len(r["tokens"]) == n_seq
    assert r["all"] == 1.0
    assert r["through"] is not None and 0 <= r["through"] < n_seq  # taking back everything does give it back
    per = {"size_by_module": {"m": 2.0}, "reach_by_module": {"m": 0.5}}
    table = bleed.summary_table([{"case": 0, "neighbour": prompt, "locality": 0.5, "size": 2.0, "reach": 0.5, **per, **r},
                                 {"case": 1, "neighbour": "x", "locality": 1.0, "size": 4.0, "reach": 0.25,
                                  "size_by_module": {"m": 4.0}, "reach_by_module": {"m": 0.25}}], "t")
    assert "| m | 3.00 | 0.50 | 0.25 |" in table
    assert table.startswith("t: 2 neighbours, locality 0.750, 1 moved; change size at the edit (mean) 3.00; "
                            "reach (neighbour / edit, mean) moved 0.50, kept 0.25")
    assert "| 0 | w3 w9 w4 w1 | 1.00 |" in table
    assert all(0.0 <= v <= 1.0 for v in [r["prompt"], r["last"], *r["each"]])


def test_change_per_position_is_the_summed_size_of_the_change_at_each_token(tok):
    fmt = PromptFormat()
    model, originals = _edited(tok)
    deltas = bleed.weight_changes(model, originals)
    prompt = "w3 w9 w4 w1"
    got = bleed.change_per_position(model, tok, fmt, deltas, prompt)
    ids = torch.tensor([fmt.context_ids(tok, prompt)])
    keys = {}
    hooks = [dict(model.named_modules())[m].register_forward_hook(
        lambda mod, args, out, m=m: keys.__setitem__(m, args[0][0])) for m in deltas]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    want = sum((keys[m] @ d.T).norm(dim=-1) for m, d in deltas.items())
    assert len(got) == ids.shape[1] and torch.allclose(torch.tensor(got), want, rtol=1e-5)
    by_module = bleed.change_by_module(model, tok, fmt, deltas, prompt)
    assert sorted(by_module) == sorted(deltas)
    assert torch.allclose(torch.tensor(by_module[EDITED[0][: -len(".weight")]]),
                          (keys[EDITED[0][: -len(".weight")]] @ deltas[EDITED[0][: -len(".weight")]].T).norm(dim=-1))
    no_change = {m: torch.zeros_like(d) for m, d in deltas.items()}
    assert bleed.change_per_position(model, tok, fmt, no_change, prompt) == [0.0] * ids.shape[1]


def test_only_linear_weights_can_be_taken_back(tok):
    model = tiny_llama(len(tok))
    params = dict(model.named_parameters())
    name = "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="embed_tokens.weight: only Linear weights"):
        bleed.weight_changes(model, {name: params[name].detach().clone()})
