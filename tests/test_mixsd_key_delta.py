"""MixSD with ``delta: key_rank_one`` (methods/mixsd/key_delta.py) on a tiny random Llama."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.data.requests import RequestError, normalize_requests
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.key_delta import (KeyDirectedDelta, key_directions, subject_key_positions,
                                                subject_keys)
from mixsd_edit.weights import restore_weights

pytestmark = pytest.mark.usefixtures("one_thread")
DOWN = "model.layers.{}.mlp.down_proj"


def _reqs():
    return normalize_requests([{"prompt": "Q w3 w4", "target_new": "w30", "subject": "w3"},
                               {"prompt": "A w7 Q", "target_new": "w11 w12", "subject": "w7"}])


def test_subject_key_positions_point_at_the_subjects_last_token(word_tok):
    hp = mixsd_hparams(delta="key_rank_one")
    seqs, pos = subject_key_positions(word_tok, _reqs(), hp)
    assert [word_tok.convert_ids_to_tokens(s[p]) for s, p in zip(seqs, pos)] == ["w3", "w7"]


@pytest.mark.parametrize("req, field", [({"prompt": "Q w3", "target_new": "w1"}, "subject"),
                                        ({"prompt": "Q w3", "target_new": "w1", "subject": "w9"}, "w9")])
def test_missing_or_absent_subject_is_an_error_naming_the_request(word_tok, req, field):
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = [{"prompt": "Q w2", "target_new": "w5", "subject": "w2"}, req]
    with pytest.raises(RequestError, match=rf"request 1: .*{field}"):
        apply_mixsd_to_model(model, word_tok, reqs, mixsd_hparams(delta="key_rank_one"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_key_directions_are_dual_to_their_keys():
    torch.manual_seed(0)
    K = torch.randn(3, 16)
    A = torch.randn(16, 16)
    C = A @ A.T / 16 + torch.eye(16)
    for cov in (None, C):
        V = key_directions(K, cov)
        assert torch.allclose((K @ V).diagonal(), torch.ones(3), atol=1e-5)
    # with C: V's columns are C⁻¹k scaled, so C V ∝ K
    V = key_directions(K, C)
    ratio = (C.double() @ V.double()).T / K.double()
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_singular_key_statistics_are_an_error_not_wrong_directions():
    torch.manual_seed(0)
    K = torch.randn(2, 16)
    exact = torch.zeros(16, 16)
    exact[:4, :4] = torch.eye(4)
    A = torch.randn(16, 4, dtype=torch.float64)
    for C in (exact, A @ A.T):  # rank 4 of 16 (e.g. a corpus with fewer tokens than key dimensions)
        with pytest.raises(ValueError, match="key statistics C are singular"):
            key_directions(K, C)
    ill = A @ A.T + 1e-8 * torch.eye(16, dtype=torch.float64)  # full rank, badly conditioned: still solved
    assert torch.allclose((K @ key_directions(K, ill)).diagonal(), torch.ones(2), atol=1e-4)


def test_directions_can_exclude_the_mean_key_of_the_other_requests():
    torch.manual_seed(0)
    K = torch.randn(4, 16) + 3.0 * torch.randn(1, 16)  # keys with a large shared component
    A = torch.randn(16, 16)
    C = A @ A.T / 16 + torch.eye(16)
    V = key_directions(K, C, exclude_batch_mean=True).double()
    Kd = K.double()
    assert torch.allclose((Kd @ V).diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-5)
    for i in range(4):
        mu = (Kd.sum(0) - Kd[i]) / 3
        assert abs(float(mu @ V[:, i])) < 1e-5
        # the limit of whitening with C + a μμᵀ
        big = key_directions(K[i:i + 1], C.double() + 1e5 * torch.outer(mu, mu)).double()[:, 0]
        assert torch.allclose(big, V[:, i], rtol=1e-2, atol=1e-4)
    plain = key_directions(K, C)
    assert (Kd @ plain.double()).sub(torch.eye(4, dtype=torch.float64)).abs().sum() > \
        (Kd @ V).sub(torch.eye(4, dtype=torch.float64)).abs().sum()
    assert torch.equal(key_directions(K[:1], C, exclude_batch_mean=True), key_directions(K[:1], C))


def test_hooked_delta_equals_the_written_weights(word_tok):
    model = tiny_llama(len(word_tok), seed=1)
    reqs = _reqs()
    hp = mixsd_hparams(delta="key_rank_one")
    mods = [DOWN.format(0), DOWN.format(1)]
    keys = subject_keys(model, word_tok, reqs, hp, mods)
    delta = KeyDirectedDelta(model, {m: key_directions(keys[m], None) for m in mods})
    with torch.no_grad():
        for u in delta.U.values():
            u.normal_()
    ids = torch.tensor([word_tok("Q w3 w4 w30 w5")["input_ids"]])
    with torch.no_grad(), delta.attached():
        hooked = model(input_ids=ids).logits
    plain = model(input_ids=ids).logits
    delta.write_into_weights()
    with torch.no_grad():
        written = model(input_ids=ids).logits
    assert not torch.allclose(hooked, plain)
    assert torch.allclose(hooked, written, atol=1e-4)


def test_key_rank_one_edit_learns_changes_only_the_trained_matrices_by_rank_n_and_restores(word_tok):
    model = tiny_llama(len(word_tok), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = mixsd_hparams(delta="key_rank_one", lr=0.1, num_steps=30, layers=(0, 1))
    meta = []
    model, wc = apply_mixsd_to_model(model, word_tok, _reqs(), hp, return_orig_weights=True, metadata_out=meta)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {DOWN.format(0) + ".weight", DOWN.format(1) + ".weight"}
    for k in changed:
        assert torch.linalg.matrix_rank((after[k] - before[k]).double(), atol=1e-6) <= 2
    assert meta[0]["train_loss_final"] < meta[0]["train_loss_first"]
    # deterministic: the same call on a fresh copy gives bit-identical weights
    again = tiny_llama(len(word_tok), seed=2)
    again, _ = apply_mixsd_to_model(again, word_tok, _reqs(), hp)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in changed)
    restore_weights(model, wc)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not getattr(m, "_forward_hooks", {}) for m in model.modules())


def test_key_rank_one_rejects_non_linear_parameters(word_tok):
    model = tiny_llama(len(word_tok))
    hp = mixsd_hparams(delta="key_rank_one", trainable_params=("model.layers.{layer}.input_layernorm.weight",))
    with pytest.raises(ValueError, match="Linear weights only"):
        apply_mixsd_to_model(model, word_tok, _reqs(), hp)


def test_delta_value_is_checked():
    from mixsd_edit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="delta"):
        mixsd_hparams(delta="lowrank")


def test_missing_key_stats_corpus_fails_before_any_model_work(word_tok, tmp_path):
    from mixsd_edit.methods.locate.stats import StatsError

    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = mixsd_hparams(delta="key_rank_one", key_stats_dataset=str(tmp_path / "nope.txt"))
    with pytest.raises(StatsError, match="nope.txt"):
        apply_mixsd_to_model(model, word_tok, _reqs(), hp)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_sampled_key_statistics_whiten_the_directions(word_tok, tmp_path, monkeypatch):
    """``key_stats_dataset: model_samples`` needs no corpus: the edit runs, is deterministic, and its
    directions differ from the identity-C ones."""
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "cache"))
    runs = []
    for stats in ("model_samples", "model_samples", None):
        model = tiny_llama(len(word_tok))
        hp = mixsd_hparams(delta="key_rank_one", key_stats_dataset=stats, key_stats_n_tokens=400,
                           key_stats_seq_len=16, num_steps=3)
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), hp, return_orig_weights=True)
        runs.append({k: model.get_parameter(k).detach().clone() for k in wc})
    assert list((tmp_path / "cache" / "corpora").glob("model-samples-*.txt"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.allclose(runs[0][k], runs[2][k]) for k in runs[0])


def _weights_after(word_tok, reqs, **kw):
    model = tiny_llama(len(word_tok))
    hp = mixsd_hparams(delta="key_rank_one", grad_clip=None, early_stop_loss=None, num_steps=6, lr=5e-2, **kw)
    _, wc = apply_mixsd_to_model(model, word_tok, reqs, hp, return_orig_weights=True)
    return {k: (model.get_parameter(k).detach() - wc[k]).clone() for k in wc}


def test_isolated_requests_make_a_batch_the_sum_of_single_edits(word_tok):
    """isolate_requests: request i's vector trains on request i's target only, so the batch's weight
    change is the sum of the changes each request makes alone; trained jointly it is not."""
    a, b = _reqs()
    single = [_weights_after(word_tok, [r], isolate_requests=True) for r in (a, b)]
    summed = {k: single[0][k] + single[1][k] for k in single[0]}
    iso = _weights_after(word_tok, [a, b], isolate_requests=True)
    joint = _weights_after(word_tok, [a, b], isolate_requests=False)
    scale = max(float(v.abs().max()) for v in summed.values())
    assert scale > 1e-3
    assert all(torch.allclose(iso[k], summed[k], atol=1e-3 * scale) for k in summed)
    assert any(not torch.allclose(joint[k], summed[k], atol=1e-2 * scale) for k in summed)


def test_isolate_requests_needs_key_rank_one():
    from mixsd_edit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="isolate_requests"):
        mixsd_hparams(delta="full", isolate_requests=True)


def test_mean_sq_norm_is_the_mean_over_requests_of_each_requests_squared_change(word_tok):
    model = tiny_llama(len(word_tok))
    mods = [DOWN.format(0), DOWN.format(1)]
    keys = subject_keys(model, word_tok, _reqs(), mixsd_hparams(delta="key_rank_one"), mods)
    delta = KeyDirectedDelta(model, {m: key_directions(keys[m], None) for m in mods})
    with torch.no_grad():
        delta.U[mods[0]][:, 0] = 1.0   # request 0: |u|² = out on layer 0
        delta.U[mods[1]][0, 1] = 3.0   # request 1: 9 on layer 1
    out = delta.U[mods[0]].shape[0]
    assert float(delta.mean_sq_norm().detach()) == pytest.approx((out + 9.0) / 2)


def test_delta_l2_gives_a_smaller_change_that_still_learns(word_tok):
    """The penalty shrinks every request's vector (and so the change any other key receives) while the
    target is still learned."""
    def run(l2):
        model = tiny_llama(len(word_tok), seed=2)
        hp = mixsd_hparams(delta="key_rank_one", lr=0.1, num_steps=30, layers=(0, 1), early_stop_loss=None,
                           delta_l2=l2)
        meta = []
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), hp, return_orig_weights=True, metadata_out=meta)
        size = sum(float((model.get_parameter(k).detach() - wc[k]).norm()) ** 2 for k in wc) ** 0.5
        return size, meta

    plain, _ = run(0.0)
    small, meta1 = run(1e-2)
    assert small < 0.8 * plain
    assert meta1[0]["train_loss_final"] < meta1[0]["train_loss_first"]


@pytest.mark.parametrize("kw, match", [({"delta_l2": -1.0}, "delta_l2 must be >= 0"),
                                       ({"delta_l2": 0.1, "delta": "full"}, "delta_l2 needs delta 'key_rank_one'")])
def test_delta_l2_values_are_checked(kw, match):
    from mixsd_edit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match=match):
        mixsd_hparams(**{"delta": "key_rank_one", **kw})


def test_train_updates_count_the_steps_that_trained_each_request(word_tok, caplog):
    """More requests than train_batch_size: each request is trained in only part of the steps; the
    metadata says in how many (and the call logs a warning), so an under-trained batch is visible."""
    reqs = normalize_requests([{"prompt": f"Q w{i} w{i + 1}", "target_new": f"w{i + 20}", "subject": f"w{i}"}
                               for i in range(2, 8)])
    model = tiny_llama(len(word_tok), seed=3)
    meta = []
    with caplog.at_level("WARNING", logger="mixsd_edit.methods.mixsd.apply"):
        apply_mixsd_to_model(model, word_tok, reqs, mixsd_hparams(delta="key_rank_one", num_steps=10,
                                                                   train_batch_size=4), metadata_out=meta)
    ups = [m["train_updates"] for m in meta]
    assert all(m["train_steps"] == 10 for m in meta)
    assert sum(ups) == 4 * 10 and max(ups) <= 10 and min(ups) < 10
    assert "train_batch_size 4" in caplog.text and "6 requests" in caplog.text
    # every request in every step when the batch fits: the counts equal the steps, no warning
    caplog.clear()
    meta = []
    with caplog.at_level("WARNING", logger="mixsd_edit.methods.mixsd.apply"):
        apply_mixsd_to_model(tiny_llama(len(word_tok), seed=3), word_tok, reqs,
                             mixsd_hparams(delta="key_rank_one", num_steps=10, train_batch_size=8), metadata_out=meta)
    assert [m["train_updates"] for m in meta] == [10] * 6 and "train_batch_size" not in caplog.text
