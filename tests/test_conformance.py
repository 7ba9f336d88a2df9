"""The contract every registered editing method keeps, checked on a tiny random Llama.

Parametrised over ``registered_methods()``: a newly registered method is included automatically and
fails here until it has a tiny config in ``TINY_METHODS`` (tests/conftest.py). For each method:

- apply -> evaluate -> restore is bit-exact, through ``BaseEditor`` and through the raw
  ``apply_fn(..., return_orig_weights=True)`` + ``restore_weights``; ``copy=True`` leaves the model alone;
- the editor's records have EasyEdit's shape and case ids count across chunks;
- hparams round-trip through ``to_dict``/``from_dict`` and ``to_yaml``/``from_hparams``, strictly;
- bad input (requests, keyword form, hparams, layers the model lacks, subjects, statistics corpus)
  fails with a ValueError/KeyError naming the request index and field (or the key) before any
  forward pass, and leaves every parameter bit-identical;
- sequential mode keeps the edits and returns the weights_copy that undoes them; batch mode works
  for batchable methods and is a clear error for single-edit ones (ROME).
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import TINY_DEPTH, TINY_METHODS, tiny_llama

from mixsd_edit.data.requests import RequestError, normalize_requests
from mixsd_edit.editor import BaseEditor
from mixsd_edit.evaluation.edit_eval import evaluate_requests
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods import get_method, registered_methods
from mixsd_edit.methods.locate.stats import StatsError
from mixsd_edit.prompting import PromptFormat
from mixsd_edit.weights import restore_weights

METHODS = registered_methods()
SUBJECT_METHODS = [n for n in METHODS if n in TINY_METHODS and TINY_METHODS[n].needs_subject]
CORPUS_METHODS = [n for n in METHODS
                  if "mom2_dataset" in {f.name for f in dataclasses.fields(get_method(n).hparams_cls)}]

REQS = [
    {"prompt": "Q w1 w2 A", "subject": "w1 w2", "target_new": "w30 w31", "ground_truth": "w9",
     "rephrase_prompt": "w5 w1 w2 A", "locality": {"neighborhood": {"prompt": "Q w11 A", "ground_truth": "w12"}}},
    {"prompt": "w7 w8 A", "subject": "w7", "target_new": "w33", "ground_truth": "w10",
     "rephrase_prompt": ["Q w7 w8 A", "w6 w7 w8 A"],
     "locality": {"neighborhood": {"prompt": "Q w13 A", "ground_truth": "w14"}}},
    {"prompt": "Q w15 w16", "subject": "w15", "target_new": "w35", "ground_truth": "w17",
     "rephrase_prompt": "A w15 w16", "locality": {"neighborhood": {"prompt": "Q w18 A", "ground_truth": "w19"}}},
]
GOOD = REQS[0]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def stats_cache(tmp_path_factory, monkeypatch):
    # one cache for the module: the tiny model's statistics are computed once and reused
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "conformance_cache"))


def tiny(name: str, corpus, **overrides):
    """(method, hparams) of a registered method; fails when the method has no tiny config."""
    if name not in TINY_METHODS:
        pytest.fail(f"method '{name}' is registered but has no tiny test config: add a TinyMethod entry for it "
                    f"to TINY_METHODS in tests/conftest.py")
    return get_method(name), TINY_METHODS[name].build(corpus, **overrides)


def start(name: str, tok, corpus, **overrides):
    """(method, hparams, a fresh tiny Llama, its snapshot)."""
    method, hp = tiny(name, corpus, **overrides)
    model = tiny_llama(len(tok), layers=TINY_DEPTH)
    return method, hp, model, snapshot(model)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def differing(model, before) -> list[str]:
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == before.keys()
    return sorted(n for n in before if not torch.equal(now[n], before[n]))


def assert_edit_restores(model, before, wc, restore=None):
    """The model holds an edit, ``wc`` covers every changed parameter, and restoring it is bit-exact."""
    changed = differing(model, before)
    assert changed, "the edit changed no parameter (the restore checks would prove nothing)"
    assert set(changed) <= set(wc), sorted(set(changed) - set(wc))
    (restore or (lambda w: restore_weights(model, w)))(wc)
    assert differing(model, before) == []


class Forwards:
    """Counts forward passes of the model (the 'before any work' checks)."""

    def __init__(self, model):
        self.n = 0
        self._h = model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def remove(self):
        self._h.remove()


def editor(model, tok, hp) -> BaseEditor:
    return BaseEditor(model, tok, hp, generation_eval=False, progress=False)


def assert_fails_untouched(model, fn, exc, pattern: str):
    """``fn()`` raises ``exc`` matching ``pattern`` before any forward pass; the model is bit-identical."""
    before = snapshot(model)
    fw = Forwards(model)
    try:
        with pytest.raises(exc, match=pattern) as info:
            fn()
    finally:
        fw.remove()
    assert isinstance(info.value, (ValueError, KeyError)) or exc is TypeError, type(info.value)
    assert fw.n == 0, f"{fw.n} forward pass(es) before the error {info.value!r}"
    assert differing(model, before) == []
    return info.value


def check_records(records, requests, chunk_size: int):
    canon = normalize_requests(requests)
    assert [r["case_id"] for r in records] == list(range(len(requests)))  # global across chunks
    for r, req in zip(records, canon):
        assert r["requested_rewrite"] == req
        assert r["chunk_size"] == chunk_size
        assert isinstance(r["time"], float) and r["time"] >= 0.0
        for stage in ("pre", "post"):
            rec = r[stage]
            assert 0.0 <= rec["rewrite_acc"] <= 1.0
            assert rec["rephrase_acc"] is not None and 0.0 <= rec["rephrase_acc"] <= 1.0
            assert isinstance(rec["locality"], dict) and isinstance(rec["portability"], dict)
        assert set(r["post"]["locality"]) == {f"{k}_acc" for k in req["locality"]}
        assert all(0.0 <= v <= 1.0 for v in r["post"]["locality"].values())


def test_every_tiny_config_names_a_registered_method():
    assert set(TINY_METHODS) <= set(METHODS), sorted(set(TINY_METHODS) - set(METHODS))


# ----------------------------------------------------------------------------- apply / evaluate / restore
@pytest.mark.parametrize("name", METHODS)
def test_editor_scores_and_restores_bit_exactly(name, tok, corpus):
    method, hp, model, before = start(name, tok, corpus)
    ed = editor(model, tok, hp)

    records, out, wc = ed.edit_requests(REQS)  # one request per apply call
    assert out is model and wc == {}
    check_records(records, REQS, 1)
    assert differing(model, before) == []
    assert "restored" in ed.last_summary["model_state"]

    if method.batchable:
        records, out, wc = ed.batch_edit(REQS)  # batch_size 2: chunks [0, 1], [2]
        check_records(records, REQS, hp.batch_size)
        assert out is model and wc == {} and differing(model, before) == []

    _, out, wc = ed.edit_requests(REQS[:1], keep_edits=True)
    assert out is model
    assert_edit_restores(model, before, wc, ed.restore)


@pytest.mark.parametrize("name", METHODS)
def test_raw_apply_evaluate_restore_bit_exact(name, tok, corpus):
    method, hp, model, before = start(name, tok, corpus)
    flags = [p.requires_grad for p in model.parameters()]
    out, wc = method.apply_fn(model, tok, REQS[:1], hp, return_orig_weights=True, progress=False)
    assert out is model
    assert all(torch.equal(wc[n], before[n]) for n in wc)  # originals, not edited values
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    post = evaluate_requests(model, tok, normalize_requests(REQS[:1]), PromptFormat(), generation=False)
    assert 0.0 <= post[0]["rewrite_acc"] <= 1.0
    assert_edit_restores(model, before, wc)

    copy, none = method.apply_fn(model, tok, REQS[:1], hp, copy=True, progress=False)
    assert copy is not model and none == {}  # no originals unless asked for
    assert differing(model, before) == [] and differing(copy, before)


# ----------------------------------------------------------------------------- hparams
@pytest.mark.parametrize("name", METHODS)
def test_hparams_round_trip(name, corpus, tmp_path):
    method, hp = tiny(name, corpus)
    assert type(hp) is method.hparams_cls and hp.alg_name == name
    d = hp.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(hp)]
    again = method.hparams_cls.from_dict(d)
    assert again == hp and again.fingerprint() == hp.fingerprint() == hp.fingerprint()
    assert hp.replace(max_length=hp.max_length + 1).fingerprint() != hp.fingerprint()
    path = tmp_path / f"{name}.yaml"
    path.write_text(hp.to_yaml(), encoding="utf-8")
    loaded = method.hparams_cls.from_hparams(path)
    assert loaded == hp and loaded.fingerprint() == hp.fingerprint()
    assert method.hparams_cls.from_hparams(tmp_path / name) == hp  # suffix added


@pytest.mark.parametrize("name", METHODS)
def test_hparams_keys_are_strict(name, corpus, tmp_path):
    method, hp = tiny(name, corpus)
    cls = method.hparams_cls
    with pytest.raises(HyperParamsError, match="unknown key.*'bogus_key'"):
        cls.from_dict({**hp.to_dict(), "bogus_key": 1})
    d = hp.to_dict()
    del d["batch_size"]
    with pytest.raises(HyperParamsError, match="missing key.*'batch_size'"):
        cls.from_dict(d)
    with pytest.raises(HyperParamsError, match="'batch_size'"):
        cls.from_dict({**hp.to_dict(), "batch_size": "two"})
    path = tmp_path / "bad.yaml"
    path.write_text(hp.to_yaml() + "bogus_key: 1\n", encoding="utf-8")
    with pytest.raises(HyperParamsError, match=re.escape(str(path)) + ".*'bogus_key'"):
        cls.from_hparams(path)


# ----------------------------------------------------------------------------- bad input
BAD_REQUESTS = {
    "missing prompt": ({"target_new": "w3", "subject": "w1"}, "request 1: field 'prompt' is missing"),
    "empty prompt": ({"prompt": "", "target_new": "w3", "subject": "w1"}, "request 1: field 'prompt' is empty"),
    "missing target_new": ({"prompt": "Q w1", "subject": "w1"}, "request 1: field 'target_new' is missing"),
    "blank target_new": ({"prompt": "Q w1", "target_new": "  ", "subject": "w1"},
                         "request 1: field 'target_new' is empty"),
    "target_new not a string": ({"prompt": "Q w1", "target_new": 5, "subject": "w1"},
                                "request 1: field 'target_new' must be a string"),
    "prompt a list": ({"prompt": ["Q w1"], "target_new": "w3", "subject": "w1"},
                      "request 1: field 'prompt' must be a string"),
    "subject not a string": ({"prompt": "Q w1", "target_new": "w3", "subject": 7},
                             "request 1: field 'subject' must be a string"),
    "request not a dict": ("Q w1 -> w3", "request 1: expected a dict"),
    "rephrase of wrong type": ({"prompt": "Q w1", "target_new": "w3", "subject": "w1", "rephrase_prompt": 3},
                               "request 1: field 'rephrase_prompt'"),
    "locality length mismatch": ({"prompt": "Q w1", "target_new": "w3", "subject": "w1",
                                  "locality": {"n": {"prompt": ["Q w2", "Q w3"], "ground_truth": ["w4"]}}},
                                 r"request 1: field 'locality'\['n'\]: 2 prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@pytest.mark.parametrize("name", METHODS)
def test_bad_request_names_index_and_field(name, case, tok, corpus):
    method, hp, model, _ = start(name, tok, corpus)
    bad, pattern = BAD_REQUESTS[case]
    reqs = [GOOD, bad]
    assert_fails_untouched(model, lambda: method.apply_fn(model, tok, reqs, hp, progress=False), RequestError, pattern)
    ed = editor(model, tok, hp)
    assert_fails_untouched(model, lambda: ed.edit_requests(reqs), RequestError, pattern)
    if method.batchable:
        assert_fails_untouched(model, lambda: ed.batch_edit(reqs), RequestError, pattern)


@pytest.mark.parametrize("name", METHODS)
def test_keyword_form_mismatches_name_the_field(name, tok, corpus):
    _, hp, model, _ = start(name, tok, corpus)
    ed = editor(model, tok, hp)
    two = dict(prompts=["Q w1 w2", "Q w3 w4"], subject=["w1", "w3"])
    cases = [
        (dict(two, target_new=["w5"]), "target_new' has 1 entries but there are 2 prompts"),
        (dict(two, subject=["w1"], target_new=["w5", "w6"]), "subject' has 1 entries"),
        (dict(two, target_new=["w5", "w6"], ground_truth=["w7", "w8", "w9"]), "ground_truth' has 3 entries"),
        (dict(two, target_new=["w5", "w6"], rephrase_prompts=["A w1"]), "rephrase_prompts' has 1 entries"),
        (dict(two, target_new=["w5", "w6"], locality_inputs={"n": {"prompt": ["Q w9"], "ground_truth": ["a", "b"]}}),
         r"locality_inputs\['n'\]\['prompt'\]' has 1 entries"),
        (dict(two, target_new="w5"), "field 'target_new': got one string for 2 edits"),
        (dict(prompts=[], target_new=[]), "field 'prompts' must be a non-empty"),
    ]
    for kwargs, pattern in cases:
        assert_fails_untouched(model, lambda: ed.edit(**kwargs), RequestError, pattern)
        assert_fails_untouched(model, lambda: ed.batch_edit(**kwargs), RequestError, pattern)
    assert_fails_untouched(model, lambda: ed.edit_requests([]), RequestError, "requests is empty")


@pytest.mark.parametrize("name", METHODS)
def test_wrong_hparams_type_is_refused(name, tok, corpus):
    method, hp, model, _ = start(name, tok, corpus)
    err = assert_fails_untouched(model, lambda: method.apply_fn(model, tok, REQS[:1], hp.to_dict(), progress=False),
                                 TypeError, method.hparams_cls.__name__)
    assert "dict" in str(err)


@pytest.mark.parametrize("name", METHODS)
def test_layers_the_model_lacks_are_an_error(name, tok, corpus):
    spec = TINY_METHODS.get(name)
    method, hp, model, _ = start(name, tok, corpus, **(spec.too_deep if spec else {}))
    missing = str(TINY_DEPTH + 3)
    for call in (lambda: method.apply_fn(model, tok, REQS[:1], hp, progress=False),
                 lambda: editor(model, tok, hp).edit_requests(REQS[:1])):
        err = assert_fails_untouched(model, call, (ValueError, KeyError), "layers")
        assert re.search(rf"\b{missing}\b", str(err)), f"the error should name layer {missing}: {err}"


@pytest.mark.parametrize("name", SUBJECT_METHODS)
def test_subject_missing_or_absent_names_the_request(name, tok, corpus):
    method, hp, model, _ = start(name, tok, corpus)
    ed = editor(model, tok, hp)
    no_subject = {k: v for k, v in REQS[1].items() if k != "subject"}
    absent = dict(REQS[1], subject="w20")
    for reqs, pattern in (([GOOD, no_subject], "request 1: field 'subject' is missing"),
                          ([GOOD, absent], "request 1: subject 'w20' does not occur in prompt")):
        assert_fails_untouched(model, lambda: method.apply_fn(model, tok, reqs, hp, progress=False),
                               RequestError, pattern)
        assert_fails_untouched(model, lambda: ed.edit_requests(reqs), RequestError, pattern)
        assert_fails_untouched(model, lambda: ed.sequential_edit(reqs), RequestError, pattern)


@pytest.mark.parametrize("name", CORPUS_METHODS)
def test_missing_stats_corpus_fails_before_any_work(name, tok, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    method, hp, model, _ = start(name, tok, corpus, mom2_dataset=str(tmp_path / "no_such_corpus.txt"))
    for call in (lambda: method.apply_fn(model, tok, REQS[:1], hp, progress=False),
                 lambda: method.apply_fn(model, tok, REQS[:1], hp, copy=True, progress=False),
                 lambda: editor(model, tok, hp).edit_requests(REQS[:1])):
        assert_fails_untouched(model, call, StatsError, "no_such_corpus.txt")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- sequential and batch modes
@pytest.mark.parametrize("name", METHODS)
def test_sequential_keeps_edits_and_weights_copy_restores(name, tok, corpus):
    method, hp, model, before = start(name, tok, corpus)
    ed = editor(model, tok, hp)
    records, out, wc = ed.sequential_edit(REQS[:2])
    assert out is model and "sequential" in ed.last_summary["model_state"]
    check_records(records, REQS[:2], 1)
    assert_edit_restores(model, before, wc, ed.restore)
    if method.batchable:
        _, _, wc = ed.sequential_edit(REQS, batch=True)  # chunks of batch_size, accumulated
        assert_edit_restores(model, before, wc, ed.restore)


@pytest.mark.parametrize("name", METHODS)
def test_batch_mode(name, tok, corpus):
    method, hp, model, before = start(name, tok, corpus)
    if method.batchable:
        out, wc = method.apply_fn(model, tok, REQS[:2], hp, return_orig_weights=True, progress=False)
        assert out is model
        assert_edit_restores(model, before, wc)
        return
    # a single-edit method: several requests in one call are a clear error, never a silent loop
    assert_fails_untouched(model, lambda: method.apply_fn(model, tok, REQS[:2], hp, progress=False),
                           ValueError, "2 requests")
    ed = editor(model, tok, hp.replace(batch_size=2))
    assert_fails_untouched(model, lambda: ed.batch_edit(REQS[:2]), ValueError, "cannot batch")
