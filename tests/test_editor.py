"""Editor flow on a tiny random Llama: case ids, model policy, pre-from-untouched, restore, bad input."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.data.requests import RequestError
from mixsd_edit.editor import BaseEditor
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.weights import ParamSelectionError


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _requests(n=5):
    out = []
    for i in range(n):
        out.append({"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{30 + i}", "ground_truth": f"w{i + 2}",
                    "subject": f"w{i}", "rephrase_prompt": f"A w{i} w{i + 1}",
                    "locality": {"neighborhood": {"prompt": f"Q w{i + 10}", "ground_truth": f"w{i + 11}"}},
                    "portability": {"one_hop": {"prompt": f"A w{i + 5}", "ground_truth": f"w{30 + i}"}}})
    return out


@pytest.fixture
def editor(word_tok):
    model = tiny_llama(len(word_tok), seed=1)
    return BaseEditor(model, word_tok, mixsd_hparams(batch_size=2, num_steps=3), progress=False)


def test_batch_edit_records_and_global_case_ids(editor):
    base = _state(editor.model)
    records, model, wc = editor.batch_edit(_requests(5))
    assert [r["case_id"] for r in records] == [0, 1, 2, 3, 4]  # never restarts per chunk
    assert model is editor.model and wc == {}
    assert _same(base, _state(model))  # non-sequential: restored after each chunk
    r = records[0]
    assert set(r["pre"]) >= {"rewrite_acc", "rephrase_acc", "locality", "portability", "rewrite_gen_em"}
    assert set(r["post"]["locality"]) == {"neighborhood_acc"} and set(r["post"]["portability"]) == {"one_hop_acc"}
    assert r["method_meta"]["fallback"] in (None, "forced_prefix")
    assert editor.last_summary["mode"] == "batch" and "restored" in editor.last_summary["model_state"]


def test_post_differs_from_pre_and_edit_is_learned(word_tok):
    model = tiny_llama(len(word_tok), seed=1)
    ed = BaseEditor(model, word_tok, mixsd_hparams(num_steps=25, lr=5e-2, layers=(0, 1)), progress=False)
    records, _, _ = ed.edit_requests(_requests(2))
    for r in records:
        assert r["post"]["rewrite_acc"] == 1.0
        assert r["pre"]["rewrite_acc"] < 1.0


def test_keyword_form_equals_dict_form(word_tok):
    reqs = _requests(2)
    kw = dict(prompts=[r["prompt"] for r in reqs], target_new=[r["target_new"] for r in reqs],
              ground_truth=[r["ground_truth"] for r in reqs], subject=[r["subject"] for r in reqs],
              rephrase_prompts=[r["rephrase_prompt"] for r in reqs],
              locality_inputs={"neighborhood": {"prompt": [r["locality"]["neighborhood"]["prompt"] for r in reqs],
                                                "ground_truth": [r["locality"]["neighborhood"]["ground_truth"] for r in reqs]}},
              portability_inputs={"one_hop": {"prompt": [r["portability"]["one_hop"]["prompt"] for r in reqs],
                                              "ground_truth": [r["portability"]["one_hop"]["ground_truth"] for r in reqs]}})
    hp = mixsd_hparams(batch_size=2, num_steps=2)
    a, _, _ = BaseEditor(tiny_llama(len(word_tok), seed=1), word_tok, hp, progress=False).batch_edit(**kw)
    b, _, _ = BaseEditor(tiny_llama(len(word_tok), seed=1), word_tok, hp, progress=False).batch_edit(reqs)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]
    assert strip(a) == strip(b)


def test_keep_edits_returns_edited_model_and_restore_is_bit_exact(editor):
    base = _state(editor.model)
    _, model, wc = editor.edit(prompts="Q w1 w2", target_new="w33", keep_edits=True)
    assert wc and not _same(base, _state(model))
    editor.restore(wc)
    assert _same(base, _state(editor.model))
    with pytest.raises(ValueError, match="single chunk"):
        editor.batch_edit(_requests(5), keep_edits=True)


def test_sequential_pre_comes_from_untouched_model(editor):
    base = _state(editor.model)
    reqs = _requests(3)
    fresh, _, _ = BaseEditor(editor.model, editor.tok, editor.hparams, progress=False).batch_edit(reqs)
    records, model, wc = editor.sequential_edit(reqs)
    for f, r in zip(fresh, records):
        assert f["pre"] == r["pre"]  # identical to pre computed on the base model
    assert not _same(base, _state(model)) and "sequential" in editor.last_summary["model_state"]
    editor.restore(wc)
    assert _same(base, _state(editor.model))


def test_edits_are_deterministic(word_tok):
    hp = mixsd_hparams(num_steps=4, mix_lambda=0.5)
    outs = []
    for _ in range(2):
        m = tiny_llama(len(word_tok), seed=2)
        apply_mixsd_to_model(m, word_tok, _requests(3), hp)
        outs.append(_state(m))
    assert _same(*outs)


def test_evaluation_fields_never_reach_training(word_tok):
    hp = mixsd_hparams(num_steps=4)
    a, b = _requests(2), _requests(2)
    for r in b:
        r["rephrase_prompt"] = "A w39 w38"
        r["locality"] = {"other": {"prompt": "Q w37", "ground_truth": "w36"}}
        r["portability"] = None
    ma, mb = tiny_llama(len(word_tok), seed=2), tiny_llama(len(word_tok), seed=2)
    apply_mixsd_to_model(ma, word_tok, a, hp)
    apply_mixsd_to_model(mb, word_tok, b, hp)
    assert _same(_state(ma), _state(mb))


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "", "target_new": "w1"}, "request 1: field 'prompt' is empty"),
    ({"target_new": "w1"}, "request 1: field 'prompt' is missing"),
    ({"prompt": "Q w1", "target_new": "  "}, "request 1: field 'target_new' is empty"),
    ({"prompt": "Q w1", "target_new": 5}, "request 1: field 'target_new' must be a string"),
    ({"prompt": "Q w1", "target_new": "w2", "rephrase_prompt": 3}, "request 1: field 'rephrase_prompt'"),
    ({"prompt": "Q w1", "target_new": "w2", "locality": {"n": {"prompt": ["a", "b"], "ground_truth": ["c"]}}},
     "request 1: field 'locality'\\['n'\\]: 2 prompt"),
])
def test_bad_requests_name_index_and_field_and_leave_model_untouched(editor, bad, match):
    base = _state(editor.model)
    with pytest.raises(RequestError, match=match):
        editor.batch_edit([{"prompt": "Q w0", "target_new": "w1"}, bad])
    with pytest.raises(RequestError, match=match.replace("request 1", "request 1")):
        apply_mixsd_to_model(editor.model, editor.tok, [{"prompt": "Q w0", "target_new": "w1"}, bad], editor.hparams)
    assert _same(base, _state(editor.model))


def test_keyword_length_mismatch(editor):
    base = _state(editor.model)
    with pytest.raises(RequestError, match="target_new' has 1 entries but there are 2 prompts"):
        editor.batch_edit(prompts=["Q w1", "Q w2"], target_new=["w3"])
    with pytest.raises(RequestError, match="rephrase_prompts' has 3 entries"):
        editor.batch_edit(prompts=["Q w1", "Q w2"], target_new=["w3", "w4"], rephrase_prompts=["a", "b", "c"])
    with pytest.raises(RequestError, match="locality_inputs\\['n'\\]\\['prompt'\\]' has 1 entries"):
        editor.batch_edit(prompts=["Q w1", "Q w2"], target_new=["w3", "w4"],
                          locality_inputs={"n": {"prompt": ["Q w5"], "ground_truth": ["w6", "w7"]}})
    assert _same(base, _state(editor.model))


def test_pattern_mismatch_is_an_error_and_model_untouched(word_tok):
    model = tiny_llama(len(word_tok))
    base = _state(model)
    hp = mixsd_hparams(layers=(0, 7))  # the tiny model has 2 layers
    with pytest.raises(ParamSelectionError, match="model.layers.7.mlp.down_proj.weight"):
        apply_mixsd_to_model(model, word_tok, _requests(1), hp)
    hp = mixsd_hparams(trainable_params=("transformer.h.{layer}.mlp.c_proj.weight",))
    with pytest.raises(ParamSelectionError, match="matches no parameter"):
        apply_mixsd_to_model(model, word_tok, _requests(1), hp)
    assert _same(base, _state(model))


def test_failure_during_training_restores_the_model(word_tok, monkeypatch):
    import mixsd_edit.methods.mixsd.apply as apply_mod

    model = tiny_llama(len(word_tok))
    base = _state(model)

    def broken_train(model, params, *a, **k):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        raise RuntimeError("boom")

    monkeypatch.setattr(apply_mod, "train_nll", broken_train)
    with pytest.raises(RuntimeError, match="boom"):
        apply_mixsd_to_model(model, word_tok, _requests(1), mixsd_hparams())
    assert _same(base, _state(model))


def test_lambda_range_and_wrong_hparams_type(word_tok):
    with pytest.raises(HyperParamsError, match="mix_lambda"):
        mixsd_hparams(mix_lambda=1.5)
    with pytest.raises(HyperParamsError, match="mix_lambda"):
        mixsd_hparams(mix_lambda=-0.1)
    with pytest.raises(TypeError):
        apply_mixsd_to_model(tiny_llama(len(word_tok)), word_tok, _requests(1), {"mix_lambda": 0.3})


# ----------------------------------------------------------------------------- post_hook
@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_post_hook_sees_each_chunk_while_its_edits_are_applied(editor, mode):
    base = _state(editor.model)
    seen = []

    def hook(model, batch, case_ids):
        assert model is editor.model
        seen.append((case_ids, [r["target_new"] for r in batch], _same(base, _state(model))))

    reqs = _requests(3)
    if mode == "single":
        _, _, wc = editor.edit_requests(reqs, post_hook=hook)
    elif mode == "batch":  # batch_size 2: chunks [0, 1] and [2]
        _, _, wc = editor.batch_edit(reqs, post_hook=hook)
    else:
        _, _, wc = editor.sequential_edit(reqs, post_hook=hook)
    chunks = [[0, 1], [2]] if mode == "batch" else [[0], [1], [2]]
    assert [s[0] for s in seen] == chunks
    assert [s[1] for s in seen] == [[reqs[i]["target_new"] for i in c] for c in chunks]
    assert not any(s[2] for s in seen)  # the model differed from the base at every call
    if mode == "sequential":
        editor.restore(wc)
    assert _same(base, _state(editor.model))


@pytest.mark.parametrize("sequential", [False, True])
def test_failing_post_hook_restores_the_base_model(editor, sequential):
    base = _state(editor.model)
    calls = []

    def hook(model, batch, case_ids):
        calls.append(case_ids)
        if len(calls) == 2:
            raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        editor.edit_requests(_requests(3), sequential_edit=sequential, post_hook=hook)
    assert calls == [[0], [1]]
    assert _same(base, _state(editor.model))  # sequential: the first edit is undone too


def test_failure_in_a_later_sequential_chunk_restores_the_earlier_ones(word_tok, monkeypatch):
    import mixsd_edit.methods.mixsd.apply as apply_mod

    model = tiny_llama(len(word_tok), seed=1)
    base = _state(model)
    real, calls = apply_mod.train_nll, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(apply_mod, "train_nll", second_fails)
    ed = BaseEditor(model, word_tok, mixsd_hparams(num_steps=2), progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        ed.sequential_edit(_requests(3))
    assert len(calls) == 2 and _same(base, _state(model))
