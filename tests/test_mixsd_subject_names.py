"""``subject_key_names`` / ``subject_key_weight``: other names' keys join MixSD's key statistics
(methods/mixsd/key_delta.py, apply.edit_key_covariances) — on a tiny random Llama."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.mixsd import apply as apply_mod
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.apply import edit_key_covariances
from mixsd_edit.methods.mixsd.key_delta import key_directions, name_swapped_requests, subject_keys

pytestmark = pytest.mark.usefixtures("one_thread")
MODS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
NAMES = ["w20", "w21 w22", "w23", "w24", "w25 w26", "w27", "w28", "w29", "w31", "w32 w33"]


def _reqs():
    return [{"prompt": "Q w3 w4", "target_new": "w30", "subject": "w3"},
            {"prompt": "A w7 Q", "target_new": "w11 w12", "subject": "w7"},
            {"prompt": "w9 w5 is", "target_new": "w14", "subject": "w9 w5"}]


def _hp(tmp_path, **kw):
    base = dict(delta="key_rank_one", key_stats_dataset="model_samples", key_stats_n_tokens=400,
                key_stats_seq_len=16, num_steps=4, lr=5e-2, subject_key_names=4, subject_key_weight=1.0)
    base.update(kw)
    return mixsd_hparams(**base)


@pytest.fixture
def names(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(apply_mod, "entity_names", lambda text: list(NAMES))
    return NAMES


def test_the_settings_are_checked_on_load():
    with pytest.raises(HyperParamsError, match="subject_key_names"):
        mixsd_hparams(subject_key_names=-1)
    with pytest.raises(HyperParamsError, match="subject_key_weight"):
        mixsd_hparams(subject_key_weight=-0.5)
    with pytest.raises(HyperParamsError, match="subject_key_names.*key_rank_one"):
        mixsd_hparams(subject_key_names=2, subject_key_weight=1.0)  # delta full
    with pytest.raises(HyperParamsError, match="subject_key_names.*key_stats_dataset"):
        mixsd_hparams(delta="key_rank_one", key_stats_dataset=None, subject_key_names=2, subject_key_weight=1.0)
    with pytest.raises(HyperParamsError, match="subject_key_weight"):
        mixsd_hparams(delta="key_rank_one", key_stats_dataset="model_samples", subject_key_names=2)


def test_name_swapped_requests_put_each_name_where_the_subject_was():
    out = name_swapped_requests(_reqs(), NAMES, 2, seed=5)
    assert len(out) == 6
    for r, s in zip([r for r in _reqs() for _ in range(2)], out):
        at = r["prompt"].rfind(r["subject"])
        assert s["prompt"] == r["prompt"][:at] + s["subject"] + r["prompt"][at + len(r["subject"]):]
        assert s["subject"] in NAMES and s["target_new"] == r["target_new"]
    assert out == name_swapped_requests(_reqs(), NAMES, 2, seed=5)
    with pytest.raises(ValueError, match="subject_key_names=20 needs at least 20 names"):
        name_swapped_requests(_reqs(), NAMES, 20, seed=5)


def test_the_names_keys_reach_less_of_each_change(word_tok, tmp_path, names):
    """v = C⁻¹k/(kᵀC⁻¹k) is the smallest-``vᵀCv`` direction with ``vᵀk = 1``; with ``C + w·E[h hᵀ]`` the
    mean squared reach ``E[(vᵀh)²]`` over the swapped names' keys must fall (and ordinary text's rise)."""
    model = tiny_llama(len(word_tok))
    hp = _hp(tmp_path)
    plain = edit_key_covariances(model, word_tok, _hp(tmp_path, subject_key_names=0, subject_key_weight=0.0),
                                 MODS, _reqs())
    augmented = edit_key_covariances(model, word_tok, hp, MODS, _reqs())
    keys = subject_keys(model, word_tok, _reqs(), hp, MODS)
    h = subject_keys(model, word_tok, name_swapped_requests(_reqs(), NAMES, 4, hp.seed + 1), hp, MODS)
    for m in MODS:
        assert not torch.equal(plain[m], augmented[m])
        v0, v1 = (key_directions(keys[m], c[m]).double() for c in (plain, augmented))
        reach0, reach1 = (((h[m].double() @ v) ** 2).mean() for v in (v0, v1))
        generic0, generic1 = ((v.T @ plain[m] @ v).diagonal().sum() for v in (v0, v1))
        assert float(reach1) < 0.9 * float(reach0), (m, float(reach0), float(reach1))
        assert float(generic1) >= float(generic0)


def test_an_edit_with_names_is_deterministic_and_differs_from_one_without(word_tok, tmp_path, names):
    runs = []
    for hp in (_hp(tmp_path), _hp(tmp_path), _hp(tmp_path, subject_key_names=0, subject_key_weight=0.0)):
        model = tiny_llama(len(word_tok))
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), hp, return_orig_weights=True)
        runs.append({k: model.get_parameter(k).detach().clone() for k in wc})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.allclose(runs[0][k], runs[2][k]) for k in runs[0])


def test_too_few_names_is_an_error_and_the_model_is_untouched(word_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(apply_mod, "entity_names", lambda text: ["w20", "w21"])
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="subject_key_names=4 needs at least 4 names; the text has 2 usable"):
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
