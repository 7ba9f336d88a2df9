"""Identity strings of a model and a tokenizer, for on-disk caches derived from them.

Model identity = class, shape fields of the config and a strided sample of the input embedding;
tokenizer identity = class, size and the ids of a fixed probe string.
"""
from __future__ import annotations

import hashlib
import json


def model_identity(model) -> str:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    emb = model.get_input_embeddings().weight.detach()
    sample = emb[:: max(1, emb.shape[0] // 4096)].float().cpu().contiguous()
    h = hashlib.sha256(json.dumps([type(model).__name__, shape, list(emb.shape)], sort_keys=True).encode())
    h.update(sample.numpy())
    return h.hexdigest()


def tokenizer_identity(tok) -> str:
    probe = tok("The quick brown fox, 1234 — naïve café.", add_special_tokens=True)["input_ids"]
    return hashlib.sha256(json.dumps([type(tok).__name__, len(tok), probe]).encode()).hexdigest()
