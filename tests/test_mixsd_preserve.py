"""MixSD's preservation term (methods/mixsd/preserve.py) on a tiny random Llama."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.stats import StatsError
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.preserve import PreservationKL

pytestmark = pytest.mark.usefixtures("one_thread")


def _reqs():
    return [{"prompt": "Q w3 w4", "target_new": "w30", "subject": "w3"},
            {"prompt": "A w7 Q", "target_new": "w11 w12", "subject": "w7"}]


@pytest.fixture
def corpus(tmp_path, word_tok):
    g = torch.Generator().manual_seed(3)
    words = [f"w{int(i)}" for i in torch.randint(0, 40, (600,), generator=g)]
    p = tmp_path / "text.txt"
    p.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 600, 20)) + "\n")
    return p


def _hp(corpus, **kw):
    base = dict(preserve_weight=0.0, preserve_dataset=str(corpus), preserve_n_tokens=120, preserve_seq_len=24,
                lr=5e-2, num_steps=8)
    base.update(kw)
    return mixsd_hparams(**base)


def test_preservation_kl_is_zero_for_the_base_and_grows_with_a_change(word_tok, corpus):
    model = tiny_llama(len(word_tok))
    pres = PreservationKL(model, word_tok, _hp(corpus, preserve_weight=1.0))
    assert pres.n_positions >= 120
    with torch.no_grad():
        assert float(pres(model)) < 1e-6
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.5 * torch.randn_like(w))
    kl = pres(model)
    assert float(kl.detach()) > 1e-3
    w.requires_grad_(True)
    kl.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


@pytest.mark.parametrize("delta", ["full", "key_rank_one"])
def test_the_term_keeps_the_model_closer_to_the_base(word_tok, corpus, delta):
    """Same edit, same steps: with preserve_weight > 0 the edited model's KL to the base on the preserved
    text is lower than without; the edit still moves the target's likelihood the same way."""
    measure = PreservationKL(tiny_llama(len(word_tok)), word_tok, _hp(corpus, preserve_weight=1.0))
    kls = {}
    for weight in (0.0, 20.0):
        model = tiny_llama(len(word_tok))
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus, preserve_weight=weight, delta=delta))
        with torch.no_grad():
            kls[weight] = float(measure(model))
    assert kls[0.0] > 1e-4
    assert kls[20.0] < 0.7 * kls[0.0], kls


def test_edit_with_the_term_is_deterministic(word_tok, corpus):
    runs = []
    for _ in range(2):
        model = tiny_llama(len(word_tok))
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus, preserve_weight=2.0, delta="key_rank_one"),
                                     return_orig_weights=True)
        runs.append({k: model.get_parameter(k).detach().clone() for k in wc})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_weight_without_a_dataset_is_refused():
    with pytest.raises(HyperParamsError, match="preserve_dataset"):
        mixsd_hparams(preserve_weight=1.0, preserve_dataset=None)
    with pytest.raises(HyperParamsError, match="preserve_weight"):
        mixsd_hparams(preserve_weight=-1.0)


def test_missing_preservation_corpus_fails_before_any_model_work(word_tok, tmp_path):
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StatsError, match="gone.txt"):
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(tmp_path / "gone.txt", preserve_weight=1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
