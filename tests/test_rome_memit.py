"""ROME and MEMIT mechanics on tiny random Llama / Qwen3 models, the closed-form updates on plain
tensors, request and hparams errors, and the shipped YAMLs. Edit quality on a real model is
measured by benchmarks/check_rome_memit.py."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_gemma3, tiny_llama

from mixsd_edit.data.requests import RequestError
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.repr import encode_with_lookup, fill_template
from mixsd_edit.methods.locate.stats import StatsError
from mixsd_edit.methods.locate.update import memit_update, rome_update
from mixsd_edit.methods.memit import MEMITHyperParams, apply_memit_to_model, execute_memit
from mixsd_edit.methods.rome import ROMEHyperParams, apply_rome_to_model, execute_rome
from mixsd_edit.models import default_cache_root
from mixsd_edit.prompting import PromptFormat
from mixsd_edit.weights import restore_weights

USER_CACHE = default_cache_root()  # read before the autouse fixture points the cache elsewhere
REQS = [
    {"prompt": "w1 w2 w3 A", "subject": "w2 w3", "target_new": "w30 w31", "ground_truth": "w9"},
    {"prompt": "Q w7 w8 A", "subject": "w7", "target_new": "w33", "ground_truth": "w10"},
    {"prompt": "w11 w12 w13", "subject": "w11", "target_new": "w35", "ground_truth": "w14"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "stats_cache"))


def tiny_qwen3(vocab_size: int, seed: int = 0, layers: int = 3):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return Qwen3ForCausalLM(cfg).eval()


ARCHS = {"llama": lambda n: tiny_llama(n, layers=3), "qwen3": tiny_qwen3}


def hparams(cls, corpus, **over):
    base = dict(model_name="tiny", device="cpu", batch_size=8, max_length=64, layers=[1], fact_token="subject_last",
                context_templates=["{}", "w5 w6 . {}", "Q w1 . {}"], v_num_grad_steps=4, v_lr=0.5, v_loss_layer=2,
                v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                mom2_update_weight=0.0, mom2_dataset=str(corpus), mom2_n_samples=800, mom2_seq_len=32,
                rewrite_module_tmp="model.layers.{layer}.mlp.down_proj", layer_module_tmp="model.layers.{layer}",
                mlp_module_tmp="model.layers.{layer}.mlp")
    if cls is ROMEHyperParams:
        base.update(alg_name="ROME", sequential=False)
    else:
        base.update(alg_name="MEMIT", layers=[0, 1], mom2_update_weight=10.0, mlp_output_norm_tmp=None)
    base.update(over)
    return cls.from_dict(base)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def log_p(model, tok, prompt, answer):
    fmt = PromptFormat()
    c, t = fmt.context_ids(tok, prompt), fmt.answer_ids(tok, answer)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([c + t])).logits[0].float(), -1)
    return float(sum(lp[len(c) - 1 + j, x] for j, x in enumerate(t)))


# ----------------------------------------------------------------------------- pure updates
def test_rome_update_is_rank_one_and_hits_the_value():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = A @ A.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    k, r = torch.randn(12, generator=g), torch.randn(5, generator=g)
    d = rome_update(r, k, C, 0.0)
    assert d.shape == (5, 12) and torch.linalg.matrix_rank(d) == 1
    torch.testing.assert_close(d @ k.double(), r.double())  # (W+Δ)k = Wk + r exactly
    q = float(k.double() @ torch.linalg.solve(C, k.double()))
    torch.testing.assert_close(rome_update(r, k, C, 2.0) @ k.double(), r.double() * q / (2.0 + q))
    plain = rome_update(r, k, None, 0.0)  # no mom2_adjustment: the row space is k itself
    torch.testing.assert_close(plain, torch.outer(r.double(), k.double()) / (k.double() @ k.double()))


def test_memit_update_solves_the_regularised_least_squares():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(10, 10, generator=g, dtype=torch.float64)
    C = A @ A.T / 10 + 0.1 * torch.eye(10, dtype=torch.float64)
    K, R = torch.randn(4, 10, generator=g), torch.randn(4, 6, generator=g)
    d = memit_update(K, R, C, 3.0)
    torch.testing.assert_close(d @ (3.0 * C + K.double().T @ K.double()), R.double().T @ K.double())
    # one key: MEMIT's solution is ROME's rank-one update with the same λ (Sherman–Morrison)
    torch.testing.assert_close(memit_update(K[:1], R[:1], C, 3.0), rome_update(R[0], K[0], C, 3.0))


def test_value_readout_matches_full_logits(tok, corpus):
    from mixsd_edit.methods.locate.compute_v import _Readout, prepare_inputs
    from mixsd_edit.prompting import pad_right

    model = tiny_qwen3(len(tok))
    inputs = prepare_inputs(tok, REQS[0], hparams(ROMEHyperParams, corpus))
    ids, mask = pad_right(inputs.seqs, 0)
    r = _Readout(inputs, "cpu")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=r.keep).logits
    k = len(inputs.target_ids)
    expect = torch.stack([torch.stack([full[i, s - 1 + j, inputs.target_ids[j]] for j in range(k)]).mean()
                          for i, s in enumerate(inputs.answer_starts)])
    torch.testing.assert_close(r.target_log_probs(kept), expect)
    torch.testing.assert_close(r.essence_log_probs(kept), full[len(inputs.seqs) - 1, len(inputs.seqs[-1]) - 1])


# ----------------------------------------------------------------------------- cores
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_execute_rome_leaves_model_unchanged(arch, tok, corpus):
    model = ARCHS[arch](len(tok))
    model.model.layers[0].train()  # a mixed train/eval state must survive too
    flags = [p.requires_grad for p in model.parameters()]
    before = state(model)
    deltas = execute_rome(model, tok, REQS[0], hparams(ROMEHyperParams, corpus), progress=False)
    assert_same(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags and no_hooks(model)
    assert model.model.layers[0].training and not model.model.layers[1].training
    (name,) = deltas
    assert name == "model.layers.1.mlp.down_proj.weight"
    assert deltas[name].shape == (64, 128) and torch.linalg.matrix_rank(deltas[name]) == 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_execute_memit_leaves_model_unchanged(arch, tok, corpus):
    model = ARCHS[arch](len(tok))
    before = state(model)
    deltas = execute_memit(model, tok, REQS, hparams(MEMITHyperParams, corpus), progress=False)
    assert_same(model, before)
    assert no_hooks(model)
    assert sorted(deltas) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (0, 1)]
    assert all(d.abs().sum() > 0 for d in deltas.values())


# ----------------------------------------------------------------------------- apply wrappers
@pytest.mark.parametrize("method", ["ROME", "MEMIT"])
def test_apply_then_restore_is_bit_exact(method, tok, corpus):
    model = tiny_llama(len(tok), layers=3)
    cls, apply = (ROMEHyperParams, apply_rome_to_model) if method == "ROME" else (MEMITHyperParams, apply_memit_to_model)
    hp = hparams(cls, corpus)
    reqs = REQS[:1] if method == "ROME" else REQS
    before = state(model)
    edited, orig = apply(model, tok, reqs, hp, return_orig_weights=True, progress=False)
    assert edited is model
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == set(orig) == {f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers}
    restore_weights(model, orig)
    assert_same(model, before)
    _, none = apply(model, tok, reqs, hp, progress=False)
    assert none == {}
    restore_weights(model, orig)
    copy, _ = apply(model, tok, reqs, hp, copy=True, progress=False)
    assert copy is not model
    assert_same(model, before)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_edits_make_targets_more_likely(arch, tok, corpus):
    # A tiny random model can only be steered at the position that predicts the answer (its
    # attention barely carries a subject-token change forward), so this uses fact_token "last".
    model = ARCHS[arch](len(tok))
    over = dict(fact_token="last", v_num_grad_steps=20, clamp_norm_factor=1.0e3, v_weight_decay=0.0)
    pre = [log_p(model, tok, r["prompt"], r["target_new"]) for r in REQS]
    _, orig = apply_rome_to_model(model, tok, REQS[:1], hparams(ROMEHyperParams, corpus, **over), progress=False,
                                  return_orig_weights=True)
    assert log_p(model, tok, REQS[0]["prompt"], REQS[0]["target_new"]) > pre[0] + 0.5
    restore_weights(model, orig)
    apply_memit_to_model(model, tok, REQS, hparams(MEMITHyperParams, corpus, mom2_update_weight=1.0, **over),
                         progress=False)
    post = [log_p(model, tok, r["prompt"], r["target_new"]) for r in REQS]
    assert all(b > a + 0.5 for a, b in zip(pre, post)), (pre, post)


def test_rome_several_requests_need_sequential(tok, corpus):
    model = tiny_llama(len(tok), layers=3)
    before = state(model)
    with pytest.raises(ValueError, match="sequential"):
        apply_rome_to_model(model, tok, REQS[:2], hparams(ROMEHyperParams, corpus), progress=False)
    assert_same(model, before)
    hp = hparams(ROMEHyperParams, corpus, sequential=True)
    _, orig = apply_rome_to_model(model, tok, REQS[:2], hp, return_orig_weights=True, progress=False)
    torch.testing.assert_close(orig["model.layers.1.mlp.down_proj.weight"],
                               before["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)
    delta = model.state_dict()["model.layers.1.mlp.down_proj.weight"] - orig["model.layers.1.mlp.down_proj.weight"]
    assert torch.linalg.matrix_rank(delta) == 2  # two rank-one edits, one after the other


def test_failure_midway_restores_the_model(tok, corpus, monkeypatch):
    import mixsd_edit.methods.rome.apply as rome_apply

    model = tiny_llama(len(tok), layers=3)
    before = state(model)
    real, calls = rome_apply.execute_rome, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(rome_apply, "execute_rome", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        apply_rome_to_model(model, tok, REQS[:2], hparams(ROMEHyperParams, corpus, sequential=True), progress=False)
    assert len(calls) == 2
    assert_same(model, before)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", ["ROME", "MEMIT"])
def test_subject_errors_name_the_request(method, tok, corpus):
    model = tiny_llama(len(tok), layers=3)
    before = state(model)
    cls, apply = (ROMEHyperParams, apply_rome_to_model) if method == "ROME" else (MEMITHyperParams, apply_memit_to_model)
    hp = hparams(cls, corpus, sequential=True) if method == "ROME" else hparams(cls, corpus)
    missing = [REQS[0], {k: v for k, v in REQS[1].items() if k != "subject"}]
    with pytest.raises(RequestError, match=r"request 1: field 'subject' is missing"):
        apply(model, tok, missing, hp, progress=False)
    absent = [dict(REQS[0], subject="w20")]
    with pytest.raises(RequestError, match=r"request 0: subject 'w20' does not occur"):
        apply(model, tok, absent, hp, progress=False)
    assert_same(model, before)


def test_missing_corpus_fails_before_editing(tok, tmp_path):
    model = tiny_llama(len(tok), layers=3)
    before = state(model)
    hp = hparams(ROMEHyperParams, tmp_path / "missing.txt")
    with pytest.raises(StatsError, match="not found"):
        apply_rome_to_model(model, tok, REQS[:1], hp, progress=False)
    with pytest.raises(StatsError, match="not found"):
        execute_memit(model, tok, REQS, hparams(MEMITHyperParams, tmp_path / "missing.txt"), progress=False)
    assert_same(model, before)


def test_too_long_request_and_wrong_loss_layer(tok, corpus):
    model = tiny_llama(len(tok), layers=3)
    with pytest.raises(RequestError, match="request 0: .*max_length=4"):
        execute_rome(model, tok, REQS[0], hparams(ROMEHyperParams, corpus, max_length=4), progress=False)
    before = state(model)
    long_second = [REQS[1], dict(REQS[0], prompt="w1 w2 w3 " + "w4 " * 70 + "A")]
    with pytest.raises(RequestError, match="request 1: .*max_length=64"):
        apply_rome_to_model(model, tok, long_second, hparams(ROMEHyperParams, corpus, sequential=True), progress=False)
    assert_same(model, before)
    with pytest.raises(HyperParamsError, match="v_loss_layer"):
        execute_memit(model, tok, REQS, hparams(MEMITHyperParams, corpus, v_loss_layer=1), progress=False)
    with pytest.raises(HyperParamsError, match="layers"):
        execute_memit(model, tok, REQS, hparams(MEMITHyperParams, corpus, layers=[1, 5]), progress=False)


def test_lookup_token(tok):
    text, span = fill_template("Q w1 . {}", "w1 w2 w3 A", "w2 w3")
    assert text == "Q w1 . w1 w2 w3 A" and text[span[0]:span[1]] == "w2 w3"
    ids, idx = encode_with_lookup(tok, text, span, "subject_last")
    assert tok.convert_ids_to_tokens(ids)[idx] == "w3" and idx == 5
    ids, idx = encode_with_lookup(tok, text, span, "last")
    assert idx == len(ids) - 1


def test_lookup_token_with_a_bpe_tokenizer():
    from mixsd_edit.models import alias_cache_dir

    folder = alias_cache_dir("smollm2-135m-instruct", USER_CACHE)
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not converted into the cache yet")
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(folder)
    text, span = fill_template("I read this. {}", "The Eiffel Tower is in", "Eiffel Tower")
    ids, idx = encode_with_lookup(bpe, text, span, "subject_last")
    assert bpe.decode(ids[idx]) == " Tower" and bpe.decode(ids[: idx + 1]).endswith("Eiffel Tower")


# ----------------------------------------------------------------------------- hparams
@pytest.mark.parametrize("path", sorted((REPO / "hparams" / "ROME").glob("*.yaml")) +
                         sorted((REPO / "hparams" / "MEMIT").glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_hparams_load(path):
    cls = ROMEHyperParams if path.parent.name == "ROME" else MEMITHyperParams
    hp = cls.from_hparams(path)
    assert hp.model_name == path.stem and "{}" in hp.context_templates


def test_shipped_hparams_cover_the_paper_models():
    for alg in ("ROME", "MEMIT"):
        names = {p.stem for p in (REPO / "hparams" / alg).glob("*.yaml")}
        assert {"smollm2-135m-instruct", "gemma3-270m", "qwen3-1.7b", "qwen3-8b", "llama-3.2-1b-instruct"} <= names
    paper = {"qwen3-1.7b": range(3, 12), "qwen3-8b": range(4, 15), "llama-3.2-1b-instruct": range(2, 9)}
    for model, layers in paper.items():
        hp = MEMITHyperParams.from_hparams(REPO / "hparams" / "MEMIT" / f"{model}.yaml")
        assert hp.layers == tuple(layers) and hp.v_lr == 0.5 and hp.v_num_grad_steps == 25 and hp.kl_factor == 0.0625


def test_hparams_validation(corpus):
    with pytest.raises(HyperParamsError, match="exactly one"):
        hparams(ROMEHyperParams, corpus, layers=[1, 2])
    with pytest.raises(HyperParamsError, match="context_templates"):
        hparams(ROMEHyperParams, corpus, context_templates=["no placeholder"])
    with pytest.raises(HyperParamsError, match="fact_token"):
        hparams(MEMITHyperParams, corpus, fact_token="subject_first")
    with pytest.raises(HyperParamsError, match="mom2_update_weight"):
        hparams(MEMITHyperParams, corpus, mom2_update_weight=0.0)


def test_registry():
    from mixsd_edit.registry import get_method

    assert get_method("ROME").batchable is False and get_method("ROME").apply_fn is apply_rome_to_model
    assert get_method("MEMIT").batchable is True and get_method("MEMIT").hparams_cls is MEMITHyperParams


# ----------------------------------------------------------------------------- post-MLP norm (Gemma)
def gemma3_with_post_norm(vocab_size: int):
    model = tiny_gemma3(vocab_size, layers=3, sliding_window=16)
    with torch.no_grad():  # random norm weights (fresh ones are all zero, i.e. scale 1), and MLP outputs of
        for layer in model.model.layers:  # about unit size before that norm (at init they are ~0.03)
            layer.post_feedforward_layernorm.weight.uniform_(-0.5, 1.0)
            layer.mlp.down_proj.weight.mul_(30.0)
    return model


def test_through_output_norm_moves_the_norm_output_by_a_reachable_change():
    from mixsd_edit.methods.memit.core import through_output_norm

    model = gemma3_with_post_norm(50)
    norm = model.model.layers[0].post_feedforward_layernorm
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    with torch.no_grad():
        r = norm(x2) - norm(x)  # reachable: the output of another input
        d = through_output_norm(norm, x, r)
        torch.testing.assert_close(norm(x + d), norm(x) + r, atol=1e-3, rtol=1e-3)
        naive_err = (norm(x + r) - norm(x) - r).norm()  # writing r into the input as is
        assert naive_err > 10 * (norm(x + d) - norm(x) - r).norm()


def test_memit_with_post_mlp_norm_reaches_its_value_targets(tok, corpus):
    # one edited layer: the change of its output is then exactly what the update writes through the norm
    over = dict(fact_token="last", context_templates=["{}"], v_num_grad_steps=20, clamp_norm_factor=0.1,
                v_weight_decay=0.0, mom2_update_weight=1e-3, layers=[1], v_loss_layer=2)
    miss = {}
    for norm_tmp in (None, "model.layers.{layer}.post_feedforward_layernorm"):
        model = gemma3_with_post_norm(len(tok))
        before = state(model)
        trace = {}
        execute_memit(model, tok, REQS[:2], hparams(MEMITHyperParams, corpus, mlp_output_norm_tmp=norm_tmp, **over),
                      progress=False, trace=trace)
        assert_same(model, before)
        miss[norm_tmp] = float((trace["target"] - trace["reached"]).norm() / (trace["target"] - trace["start"]).norm())
    mapped = miss["model.layers.{layer}.post_feedforward_layernorm"]
    assert mapped < 0.2 and mapped < 0.1 * miss[None], miss


def test_memit_post_mlp_norm_template_must_exist(tok, corpus):
    model = tiny_llama(len(tok), layers=3)
    hp = hparams(MEMITHyperParams, corpus, mlp_output_norm_tmp="model.layers.{layer}.post_feedforward_layernorm")
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        execute_memit(model, tok, REQS[:1], hp, progress=False)
    with pytest.raises(HyperParamsError, match="mlp_output_norm_tmp"):
        hparams(MEMITHyperParams, corpus, mlp_output_norm_tmp="model.norm")
