"""Calling a Hugging Face causal LM with a KV cache across transformers versions.

transformers 5.x renamed ``past_key_values`` to ``cache`` (argument and output); 4.5x uses the old
name. Decoding loops go through :func:`step` so they work on both.
"""
from __future__ import annotations

import inspect

import torch

_SIG_CACHE: dict[type, tuple[str, bool]] = {}


def _cache_arg(model) -> tuple[str, bool]:
    cls = type(model)
    if cls not in _SIG_CACHE:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        name = "cache" if "cache" in params else "past_key_values"
        _SIG_CACHE[cls] = (name, "logits_to_keep" in params)
    return _SIG_CACHE[cls]


def step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache=None,
         last_only: bool = True):
    """One cached forward -> (logits [B, V] of the last position (or [B, L, V]), new cache)."""
    name, has_keep = _cache_arg(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": True}
    if cache is not None:
        kwargs[name] = cache
    if last_only and has_keep:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    logits = out.logits[:, -1] if last_only else out.logits
    return logits, new_cache
