"""MixSD's ``batch_key_weight``: in a batch, each request's change avoids the other requests' subject keys."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.mixsd import apply as mixsd_apply
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.apply import with_batch_keys
from mixsd_edit.methods.mixsd.key_delta import key_directions, subject_keys

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER0 = "model.layers.0.mlp.down_proj"  # its input does not depend on any down_proj: keys stay fixed


def _keys(n=5, d=24, seed=0):
    """Subject-like keys: a large shared component plus a small individual one; and an SPD ``C``."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g, dtype=torch.float64) * 3
    K = common + torch.randn(n, d, generator=g, dtype=torch.float64)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return K, X.T @ X / X.shape[0]


def test_each_direction_avoids_the_other_requests_keys_and_still_reads_its_own():
    K, C = _keys()
    hp = mixsd_hparams(delta="key_rank_one", batch_key_weight=1.0)
    V0 = key_directions(K, C).double()
    V1 = key_directions(K, with_batch_keys({"m": C}, {"m": K}, hp)["m"]).double()
    off = ~torch.eye(K.shape[0], dtype=torch.bool)
    assert torch.allclose(torch.diagonal(K @ V1), torch.ones(K.shape[0], dtype=torch.float64), atol=1e-5)
    reach0, reach1 = (K @ V0)[off].abs().max(), (K @ V1)[off].abs().max()
    assert reach0 > 0.5             # shared component: without the term each change lands on every subject
    assert reach1 < 0.05 * reach0   # with it, far less of it does


def test_one_matrix_for_the_batch_equals_leaving_each_requests_own_key_out():
    """Sherman-Morrison: C + wΣ_all kkᵀ gives request i the direction C + wΣ_{j≠i} kkᵀ would."""
    K, C = _keys(n=4)
    w = 0.7
    hp = mixsd_hparams(delta="key_rank_one", batch_key_weight=w)
    V = key_directions(K, with_batch_keys({"m": C}, {"m": K}, hp)["m"]).double()
    for i in range(K.shape[0]):
        others = torch.cat([K[:i], K[i + 1:]])
        vi = key_directions(K[i:i + 1], C + w * others.T @ others).double()[:, 0]
        assert torch.allclose(V[:, i], vi, rtol=1e-4, atol=1e-8)


def test_identity_statistics_get_the_term_too_and_the_cached_ones_are_not_touched():
    K, C = _keys(n=3)
    hp = mixsd_hparams(delta="key_rank_one", batch_key_weight=2.0)
    before = C.clone()
    out = with_batch_keys({"m": C}, {"m": K}, hp)
    assert torch.equal(C, before) and not torch.equal(out["m"], C)
    eye = with_batch_keys({}, {"m": K}, hp)["m"]
    assert torch.allclose(eye, torch.eye(K.shape[1], dtype=torch.float64) + 2.0 * K.T @ K)
    assert with_batch_keys({"m": C}, {"m": K[:1]}, hp) == {"m": C}  # one request: nothing to avoid


def _reqs(ids):
    return normalize_requests([{"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{i + 20}", "subject": f"w{i}"}
                               for i in ids])


def _hp(corpus, w):
    return mixsd_hparams(delta="key_rank_one", lr=0.1, num_steps=10, early_stop_loss=None, train_batch_size=4,
                         key_stats_dataset=str(corpus), key_stats_n_tokens=2000, key_stats_seq_len=16,
                         batch_key_weight=w)


def _edit_batch(word_tok, corpus, w, monkeypatch, ids=(3, 7, 11)):
    """Apply one batch; return the layer-0 directions MixSD used, the subjects' keys and the new weight."""
    seen = {}

    class Recording(mixsd_apply.KeyDirectedDelta):
        def __init__(self, model, directions):
            seen.update(directions)
            super().__init__(model, directions)

    monkeypatch.setattr(mixsd_apply, "KeyDirectedDelta", Recording)
    model = tiny_llama(len(word_tok), seed=4)
    hp = _hp(corpus, w)
    K = subject_keys(model, word_tok, _reqs(ids), hp, [LAYER0])[LAYER0].double()
    meta = []
    apply_mixsd_to_model(model, word_tok, _reqs(ids), hp, metadata_out=meta)
    avoided = len(ids) - 1 if w > 0 else 0
    assert [m["batch_keys_avoided"] for m in meta] == [avoided] * len(ids)
    return seen[LAYER0].double(), K, model.get_parameter(LAYER0 + ".weight").detach().clone()


def test_in_an_edit_call_the_other_subjects_are_reached_less(word_tok, corpus, monkeypatch):
    V0, K, W0 = _edit_batch(word_tok, corpus, 0.0, monkeypatch)
    V1, K1, W1 = _edit_batch(word_tok, corpus, 1.0, monkeypatch)
    assert torch.equal(K, K1)
    off = ~torch.eye(K.shape[0], dtype=torch.bool)
    assert (K @ V1)[off].abs().max() < 0.1 * (K @ V0)[off].abs().max()
    assert not torch.equal(W0, W1)
    _, _, again = _edit_batch(word_tok, corpus, 1.0, monkeypatch)
    assert torch.equal(W1, again)  # deterministic on CPU


def test_a_single_request_call_is_bit_identical_with_and_without_the_weight(word_tok, corpus, monkeypatch):
    _, _, W0 = _edit_batch(word_tok, corpus, 0.0, monkeypatch, ids=(3,))
    _, _, W1 = _edit_batch(word_tok, corpus, 5.0, monkeypatch, ids=(3,))
    assert torch.equal(W0, W1)


@pytest.mark.parametrize("kw, match", [({"batch_key_weight": -1.0}, "batch_key_weight must be >= 0"),
                                       ({"batch_key_weight": 1.0, "delta": "full"},
                                        "batch_key_weight needs delta 'key_rank_one'")])
def test_batch_key_weight_values_are_checked(kw, match):
    with pytest.raises(HyperParamsError, match=match):
        mixsd_hparams(**{"delta": "key_rank_one", **kw})
