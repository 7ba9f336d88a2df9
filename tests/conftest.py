"""Shared fixtures: a word-level tokenizer, a scripted fake LM, a tiny random Llama, MixSD hparams,
a small statistics corpus and a one-thread switch for the tiny-model suites."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
WORDS = [f"w{i}" for i in range(40)] + ["New", "fact:", ".", "Q", "A", "MARK"]


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def word_tok():
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def tok(word_tok):
    """The word-level tokenizer under the short name (a test module may define its own ``tok``)."""
    return word_tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU extra threads only wait.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small plain-text corpus over the word tokenizer's vocabulary (~2k tokens, blank-line
    separated lines of random length), for second-moment statistics."""
    r = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    lines = [" ".join(r.choice(WORDS[:40]) for _ in range(r.randint(3, 30))) for _ in range(120)]
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return path


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose next token is a fixed function of the last token.

    Rows whose history contains the ``MARK`` token (the expert context) follow ``expert_next``;
    other rows follow ``naive_next``. The "KV cache" is the full id history, so cached decoding
    and full re-runs agree exactly.
    """

    def __init__(self, vocab_size, mark_id, expert_next, naive_next):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.V, self.mark = vocab_size, mark_id
        self.expert_next, self.naive_next = dict(expert_next), dict(naive_next)
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **kw):
        self.calls += 1
        hist = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(hist)
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.V)
        for b in range(B):
            real = hist[b][attention_mask[b].bool()].tolist()
            table = self.expert_next if self.mark in real else self.naive_next
            offset = hist.shape[1] - L
            for t in range(L):
                last = int(hist[b, offset + t])
                logits[b, t, table.get(last, 2)] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=hist)


@pytest.fixture
def scripted(word_tok):
    """Expert: w_i -> w_{i+1}; naive: w_i -> w_{i+20} (mod 40). Expert context contains MARK."""
    ids = {w: word_tok.convert_tokens_to_ids(w) for w in WORDS}
    expert = {ids[f"w{i}"]: ids[f"w{(i + 1) % 40}"] for i in range(40)}
    naive = {ids[f"w{i}"]: ids[f"w{(i + 20) % 40}"] for i in range(40)}
    return ScriptedLM(len(word_tok), ids["MARK"], expert, naive), ids


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(vocab_size: int, seed: int = 0, layers: int = 2, sliding_window: int = 4):
    """A tiny random Gemma3 (post-MLP norm, sliding-window layers, BOS id 2 in the config)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=sliding_window, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def mixsd_hparams(**overrides):
    from mixsd_edit.methods.mixsd import MixSDHyperParams

    base = dict(alg_name="MixSD", model_name="tiny", device="cpu", batch_size=1, max_length=64,
                mix_lambda=0.3, temperature=0.0, top_k=8, max_new_tokens=6, max_retries=5,
                fallback="forced_prefix", expert_template="MARK {prompt} {target_new} . {prompt}",
                naive_template="{prompt}", use_chat_template=False, system_prompt=None, stop_at_newline=False,
                seed=42, trainable_params=("model.layers.{layer}.mlp.down_proj.weight",), layers=(0, 1),
                lr=1e-2, num_steps=5, min_epochs=0, train_batch_size=4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                grad_clip=1.0, norm_constraint=None, early_stop_loss=None, delta="full", key_stats_dataset=None,
                key_stats_n_tokens=100000, key_stats_seq_len=256, isolate_requests=False, exclude_batch_mean=False,
                subject_key_names=0, subject_key_weight=0.0, delta_l2=0.0, past_edit_key_weight=0.0, batch_key_weight=0.0, context_prefixes=0, context_prefix_words=8, context_prefix_key="mean",
                preserve_weight=0.0, preserve_dataset=None,
                preserve_n_tokens=512, preserve_seq_len=128, preserve_swaps=0, preserve_swaps_per_step=0,
                preserve_swap_positions="last", preserve_checkpoint=False)
    base.update(overrides)
    return MixSDHyperParams.from_dict(base)


# ----------------------------------------------------------------------------- tiny configs per method
TINY_DEPTH = 3  # layers of the tiny Llama the conformance suite edits (ROME/MEMIT need one above the edit)


def locate_hparams(alg: str, corpus, **overrides):
    """ROME / MEMIT hparams for ``tiny_llama(..., layers=TINY_DEPTH)``: few value steps, two templates,
    statistics from ``corpus`` (a small text file)."""
    from mixsd_edit.methods import get_method

    base = dict(alg_name=alg, model_name="tiny", device="cpu", batch_size=1, max_length=64, layers=[1],
                fact_token="subject_last", context_templates=["{}", "Q w1 . {}"], v_num_grad_steps=3, v_lr=0.5,
                v_loss_layer=TINY_DEPTH - 1, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                mom2_adjustment=True, mom2_update_weight=0.0, mom2_dataset=str(corpus), mom2_n_samples=200,
                mom2_seq_len=16, rewrite_module_tmp="model.layers.{layer}.mlp.down_proj",
                layer_module_tmp="model.layers.{layer}", mlp_module_tmp="model.layers.{layer}.mlp")
    if alg == "ROME":
        base.update(sequential=False)
    else:
        base.update(batch_size=2, layers=[0, 1], mom2_update_weight=10.0, mlp_output_norm_tmp=None)
    base.update(overrides)
    return get_method(alg).hparams_cls.from_dict(base)


def ft_hparams(alg: str, **overrides):
    """FT-L / FT-M (one down_proj) and SFT (every parameter) hparams for the tiny models."""
    from mixsd_edit.methods import get_method

    base = dict(alg_name=alg, model_name="tiny", device="cpu", batch_size=2, max_length=64, use_chat_template=False,
                system_prompt=None, trainable_params=["model.layers.{layer}.mlp.down_proj.weight"], layers=[1],
                lr=1e-2, num_steps=2, train_batch_size=4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                grad_clip=1.0, norm_constraint=None, early_stop_loss=None, seed=0)
    if alg == "SFT":
        base.update(trainable_params=["*"], layers=[], lr=1e-3, weight_decay=0.01)
    base.update(overrides)
    return get_method(alg).hparams_cls.from_dict(base)


@dataclass(frozen=True)
class TinyMethod:
    """How the conformance suite (tests/test_conformance.py) runs one registered method.

    build(corpus, **overrides) -> hparams for ``tiny_llama(len(word_tok), layers=TINY_DEPTH)``, fast
    (a few steps); ``batch_size`` is 2 for batchable methods. ``too_deep``: overrides whose
    parameter selection names layers the tiny model does not have (must fail with a clear error).
    ``needs_subject``: requests must carry a ``subject`` occurring in the prompt.
    """

    build: Callable[..., Any]
    too_deep: dict = field(default_factory=lambda: {"layers": [TINY_DEPTH + 3]})
    needs_subject: bool = False


TINY_METHODS: dict[str, TinyMethod] = {
    "MixSD": TinyMethod(lambda corpus, **o: mixsd_hparams(**{"batch_size": 2, "num_steps": 2, "max_retries": 2, **o})),
    "FT-L": TinyMethod(lambda corpus, **o: ft_hparams("FT-L", **o)),
    "FT-M": TinyMethod(lambda corpus, **o: ft_hparams("FT-M", **o)),
    "SFT": TinyMethod(lambda corpus, **o: ft_hparams("SFT", **o),  # "*" has no layers: name a layer pattern
                      too_deep={"trainable_params": ["model.layers.{layer}.mlp.down_proj.weight"],
                                "layers": [TINY_DEPTH + 3]}),
    "ROME": TinyMethod(lambda corpus, **o: locate_hparams("ROME", corpus, **o), needs_subject=True),
    "MEMIT": TinyMethod(lambda corpus, **o: locate_hparams("MEMIT", corpus, **o),
                        too_deep={"layers": [0, TINY_DEPTH + 3]}, needs_subject=True),
}


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA

