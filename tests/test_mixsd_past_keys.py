"""MixSD's ``past_edit_key_weight``: in a sequence, a new edit's change avoids the earlier edits' subject keys."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.editor import BaseEditor
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.mixsd import PastEditKeys, apply_mixsd_to_model
from mixsd_edit.methods.mixsd import key_delta
from mixsd_edit.methods.mixsd.key_delta import subject_keys

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER0 = "model.layers.0.mlp.down_proj"  # its input does not depend on any down_proj: keys stay fixed


def _req(i):
    return normalize_requests([{"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{i + 20}", "subject": f"w{i}"}])


def _hp(corpus, w, **kw):
    """Key statistics C from a small corpus: w is relative to them (k_jᵀC⁻¹k_j ~ the key size)."""
    return mixsd_hparams(delta="key_rank_one", lr=0.1, num_steps=10, early_stop_loss=None, key_stats_dataset=str(corpus),
                         key_stats_n_tokens=2000, key_stats_seq_len=16, past_edit_key_weight=w, **kw)


def _second_change_on_first_key(word_tok, corpus, w):
    """Edit request A, then B with the same PastEditKeys; return |ΔW_B k_A| / |ΔW_B k_B| on layer 0."""
    model = tiny_llama(len(word_tok), seed=4)
    past = PastEditKeys()
    hp = _hp(corpus, w)
    apply_mixsd_to_model(model, word_tok, _req(3), hp, past_edit_keys=past)
    assert past.count == (1 if w > 0 else 0)  # with the weight 0 nothing is kept (no memory cost)
    k_a = subject_keys(model, word_tok, _req(3), hp, [LAYER0])[LAYER0][0].double()
    k_b = subject_keys(model, word_tok, _req(7), hp, [LAYER0])[LAYER0][0].double()
    before = model.get_parameter(LAYER0 + ".weight").detach().clone()
    meta = []
    apply_mixsd_to_model(model, word_tok, _req(7), hp, past_edit_keys=past, metadata_out=meta)
    dW = (model.get_parameter(LAYER0 + ".weight").detach() - before).double()
    assert past.count == (2 if w > 0 else 0) and dW.norm() > 0
    return float((dW @ k_a).norm() / (dW @ k_b).norm()), meta[0]


def test_a_later_edit_leaves_the_earlier_subjects_key_alone(word_tok, corpus):
    free, meta0 = _second_change_on_first_key(word_tok, corpus, 0.0)
    kept, meta1 = _second_change_on_first_key(word_tok, corpus, 1.0)
    assert free > 0.03            # the two subjects' keys overlap: without the term B's change reaches A
    assert kept < 0.01 * free     # with it, almost none of it does
    assert (meta0["past_edit_keys_protected"], meta1["past_edit_keys_protected"]) == (0, 1)


def test_a_failed_edit_adds_no_keys_and_restores_the_model(word_tok, corpus, monkeypatch):
    model = tiny_llama(len(word_tok), seed=4)
    past = PastEditKeys()
    apply_mixsd_to_model(model, word_tok, _req(3), _hp(corpus, 1.0), past_edit_keys=past)
    snap = {k: v.clone() for k, v in past.keys.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(self):
        raise RuntimeError("write failed")

    monkeypatch.setattr(key_delta.KeyDirectedDelta, "write_into_weights", boom)
    with pytest.raises(RuntimeError, match="write failed"):
        apply_mixsd_to_model(model, word_tok, _req(7), _hp(corpus, 1.0), past_edit_keys=past)
    assert past.count == 1 and all(torch.equal(snap[k], past.keys[k]) for k in snap)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_editor_gives_each_sequence_its_own_past_keys(word_tok, corpus):
    reqs = [_req(i)[0] for i in (3, 7, 11)]
    ed = BaseEditor(tiny_llama(len(word_tok), seed=4), word_tok, _hp(corpus, 1.0), progress=False)
    for _ in range(2):  # a second sequence starts from nothing again
        records, _, wc = ed.sequential_edit(reqs)
        assert [r["method_meta"]["past_edit_keys_protected"] for r in records] == [0, 1, 2]
        ed.restore(wc)
    records, _, _ = ed.edit_requests(reqs)  # single edits: no sequence state, said as None
    assert [r["method_meta"]["past_edit_keys_protected"] for r in records] == [None, None, None]


def test_without_the_weight_the_past_keys_change_nothing(word_tok, corpus):
    """past_edit_key_weight 0: a sequence with PastEditKeys gives bit-identical weights to one without."""
    weights = []
    for past in (PastEditKeys(), None):
        model = tiny_llama(len(word_tok), seed=4)
        for i in (3, 7):
            apply_mixsd_to_model(model, word_tok, _req(i), _hp(corpus, 0.0), past_edit_keys=past)
        weights.append(model.get_parameter(LAYER0 + ".weight").detach().clone())
    assert torch.equal(*weights)


@pytest.mark.parametrize("kw, match", [({"past_edit_key_weight": -1.0}, "past_edit_key_weight must be >= 0"),
                                       ({"past_edit_key_weight": 1.0, "delta": "full"},
                                        "past_edit_key_weight needs delta 'key_rank_one'")])
def test_past_edit_key_weight_values_are_checked(kw, match):
    with pytest.raises(HyperParamsError, match=match):
        mixsd_hparams(**{"delta": "key_rank_one", **kw})


def test_past_edit_keys_of_the_wrong_type_are_refused(word_tok, corpus):
    with pytest.raises(TypeError, match="past_edit_keys must be a PastEditKeys"):
        apply_mixsd_to_model(tiny_llama(len(word_tok)), word_tok, _req(3), _hp(corpus, 1.0), past_edit_keys={})
