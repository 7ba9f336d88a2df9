"""Shared fixtures: a word-level tokenizer, a scripted fake LM, a tiny random Llama, MixSD hparams."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

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


def mixsd_hparams(**overrides):
    from mixsd_edit.methods.mixsd import MixSDHyperParams

    base = dict(alg_name="MixSD", model_name="tiny", device="cpu", batch_size=1, max_length=64,
                mix_lambda=0.3, temperature=0.0, top_k=8, max_new_tokens=6, max_retries=5,
                fallback="forced_prefix", expert_template="MARK {prompt} {target_new} . {prompt}",
                naive_template="{prompt}", use_chat_template=False, system_prompt=None, stop_at_newline=False,
                seed=42, trainable_params=("model.layers.{layer}.mlp.down_proj.weight",), layers=(0, 1),
                lr=1e-2, num_steps=5, train_batch_size=4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                grad_clip=1.0, norm_constraint=None, early_stop_loss=None)
    base.update(overrides)
    return MixSDHyperParams.from_dict(base)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
