"""Small language-model helpers shared by methods and evaluation.

- :func:`step`: one forward with a KV cache across transformers versions (5.x renamed
  ``past_key_values`` to ``cache``, argument and output; 4.5x uses the old name). Decoding loops go
  through it so they work on both.
- :func:`rest_logp` / :func:`coarse_kl`: KL between next-token distributions kept as top-k
  log-probs plus one bucket for the rest (the retention suite's KL and MixSD's preservation term).
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


def rest_logp(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the top-k probabilities), the rest floored at ~1e-7 so that KL stays finite
    when float rounding gives the top-k all the mass (applied alike to both models)."""
    return torch.log1p(-top_logp.exp().sum(-1).clamp(max=1.0 - 1e-7))


def coarse_kl(p_top: torch.Tensor, p_rest: torch.Tensor, q_top: torch.Tensor, q_rest: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats between distributions over k named tokens plus one "rest" bucket, all as
    log-probs; [..., k] and [...] -> [...]. Clamped at 0 against rounding."""
    top = (p_top.exp() * (p_top - q_top)).sum(-1)
    return (top + p_rest.exp() * (p_rest - q_rest)).clamp(min=0.0)
