"""A statistics corpus the model writes itself: ``mom2_dataset`` / ``key_stats_dataset: model_samples``.

ROME, MEMIT and MixSD's whitened ``key_rank_one`` need ``C = E[k kᵀ]`` over "ordinary" inputs. The
papers take it from Wikipedia text; offline, with no corpus at hand, the next best source of ordinary
inputs is the model itself: text it samples freely (temperature 1, no top-k) from its start token.
Those keys are, by construction, the ones the model produces in its own typical use.

- Sampling is seeded (its own ``torch.Generator``; the global RNG is not touched), batched with a
  KV cache, and deterministic on CPU for a given model, tokenizer, size and seed.
- The text is written once under ``<cache>/corpora/model-samples-<hash>.txt`` (atomic rename; the
  hash covers model identity, tokenizer, token count, sequence length and seed) and then read like any
  other plain-text corpus, so the second-moment cache keys it by its sha256 as usual.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from mixsd_edit.lm_utils import step
from mixsd_edit.methods.locate.cachefiles import model_identity, tokenizer_identity, write_atomic
from mixsd_edit.models import default_cache_root

log = logging.getLogger(__name__)

MODEL_SAMPLES = "model_samples"  # the reserved corpus name


def _start_token(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("model_samples needs a tokenizer with a BOS or EOS token to start sampling from")


@torch.no_grad()
def sample_token_sequences(model, tok, n_tokens: int, seq_len: int, *, seed: int = 0,
                           batch_size: int = 64) -> list[list[int]]:
    """``ceil(n_tokens / seq_len)`` sequences of ``seq_len`` sampled tokens (start token excluded)."""
    if n_tokens < 1 or seq_len < 1:
        raise ValueError(f"need n_tokens >= 1 and seq_len >= 1, got {n_tokens}, {seq_len}")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    start = _start_token(tok)
    n_seqs = -(-n_tokens // seq_len)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for s in range(0, n_seqs, batch_size):
            b = min(batch_size, n_seqs - s)
            ids = torch.full((b, 1), start, dtype=torch.long, device=dev)
            mask = torch.ones((b, 1), dtype=torch.long, device=dev)
            pos = torch.zeros((b, 1), dtype=torch.long, device=dev)
            logits, cache = step(model, ids, mask, pos)
            rows = []
            for t in range(seq_len):
                probs = torch.softmax(logits.float().cpu(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)  # [b, 1]
                rows.append(nxt)
                if t + 1 == seq_len:
                    break
                mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long, device=dev)], dim=1)
                logits, cache = step(model, nxt.to(dev), mask, pos + t + 1, cache)
            out.extend(torch.cat(rows, dim=1).tolist())
    finally:
        model.train(was_training)
    return out


def sampled_corpus(model, tok, n_tokens: int, seq_len: int, *, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of the model-sampled text (written on first use, then reused)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    key = {"model": model_identity(model), "tokenizer": tokenizer_identity(tok), "n_tokens": int(n_tokens),
           "seq_len": int(seq_len), "seed": int(seed), "sampling": "temperature 1, full vocabulary, from start token"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = root / "corpora" / f"model-samples-{digest}.txt"
    if path.is_file():
        return path
    log.info("sampling a %d-token statistics corpus from the model (once; cached at %s)", n_tokens, path)
    seqs = sample_token_sequences(model, tok, n_tokens, seq_len, seed=seed)
    # one sequence per paragraph; newlines inside a sample are kept (the reader skips blank lines only)
    text = "\n\n".join(tok.decode(s, skip_special_tokens=True).strip() for s in seqs) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
    return path
