"""MixSD's code paths on the paper's architectures (tiny random Qwen3 and Gemma3 configs)."""
import random

import pytest
import torch

from conftest import mixsd_hparams, tiny_gemma3
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.targets import decode_mixed
from mixsd_edit.weights import restore_weights


def _qwen3(v):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, tie_word_embeddings=True,
                                        pad_token_id=0, eos_token_id=1)).eval()


@pytest.mark.parametrize("build", [_qwen3, tiny_gemma3], ids=["qwen3", "gemma3"])
def test_cached_mixed_decode_matches_full_recompute(word_tok, build):
    model = build(len(word_tok))
    enc = lambda s: word_tok(s, add_special_tokens=False)["input_ids"]
    naive = [enc("Q w0"), enc("Q w3 w4 w5 w6 w7")]
    expert = [enc("MARK w9 w8 w7 w6 Q w0"), enc("MARK Q w3 w4 w5 w6 w7")]
    res = decode_mixed(model, naive, expert, [random.Random(1), random.Random(2)], mix_lambda=0.5,
                       temperature=0.0, top_k=4, max_new_tokens=6, eos_ids=[], pad_id=0)
    for i, seed in enumerate((1, 2)):
        rng, prefix = random.Random(seed), []
        for _ in range(6):
            ctx = (naive if rng.random() < 0.5 else expert)[i] + prefix
            with torch.no_grad():
                prefix.append(int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax()))
        assert res[i].ids == prefix


@pytest.mark.parametrize("build", [_qwen3, tiny_gemma3], ids=["qwen3", "gemma3"])
def test_apply_and_restore_bit_exact(word_tok, build):
    model = build(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, wc = apply_mixsd_to_model(model, word_tok, [{"prompt": "Q w1 w2", "target_new": "w30"}],
                                 mixsd_hparams(num_steps=3), return_orig_weights=True)
    assert set(wc) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in wc)
    restore_weights(model, wc)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
