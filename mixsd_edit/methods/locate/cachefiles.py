"""On-disk caches derived from a model (second moments, the model-sampled corpus): the identity
strings in their keys, and atomic writes.

Model identity = class, shape fields of the config and a strided sample of the input embedding;
tokenizer identity = class, size and the ids of a fixed probe string.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


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


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(fh)`` into a temp file next to ``path``, fsync, then rename over ``path``: readers see
    the old file or the whole new one, never a partial one. Mode 0644 like any other cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
