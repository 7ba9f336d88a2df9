"""Fine-tuning baselines' core: training examples and the two objectives.

An example is ``(context_ids, target_ids)`` built from a request's ``prompt`` and ``target_new``
only (rephrase / locality / portability are evaluation data and are never read here).

- ``target_new`` (FT-M, SFT): input ``context + target``, loss = mean NLL of the target tokens,
  context masked. This is :func:`mixsd_edit.training.train_nll`.
- ``prompt_last`` (FT-L, ROME's constrained fine-tuning): input = the context only. The logits at
  its last position are pushed towards every target token at once::

      loss_i = -1/|t_i| * sum_k log p(t_i[k] | context_i)      loss = mean_i loss_i

  The target tokens never enter the model, so the loss sees one position per request.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from mixsd_edit.data.requests import RequestError
from mixsd_edit.prompting import PromptFormat, pad_right
from mixsd_edit.training import Example, TrainConfig, TrainReport, train_nll

log = logging.getLogger(__name__)


def build_examples(tok, requests: Sequence[dict[str, Any]], fmt: PromptFormat, max_length: int) -> list[Example]:
    """``(fmt.context_ids(prompt), fmt.answer_ids(target_new))`` per canonical request, in order.

    Raises :class:`RequestError` naming the request when the target tokenizes to nothing or the
    example is longer than ``max_length`` tokens (checked before any model work).
    """
    examples: list[Example] = []
    for i, r in enumerate(requests):
        ctx = list(fmt.context_ids(tok, r["prompt"]))
        tgt = list(fmt.answer_ids(tok, r["target_new"]))
        if not ctx:
            raise RequestError(f"request {i}: field 'prompt' tokenizes to no tokens")
        if not tgt:
            raise RequestError(f"request {i}: field 'target_new' tokenizes to no tokens")
        if len(ctx) + len(tgt) > max_length:
            raise RequestError(f"request {i}: prompt + target_new is {len(ctx) + len(tgt)} tokens, "
                               f"over max_length={max_length}")
        examples.append((ctx, tgt))
    return examples


def batch_prompt_last(examples: Sequence[Example], pad_id: int):
    """-> ids [B, L] and mask (contexts only, right padded), last_idx [B], targets [B, T] and
    target_mask [B, T] (targets right padded with ``pad_id``, mask 0 there)."""
    ids, mask = pad_right([list(c) for c, _ in examples], pad_id)
    last_idx = mask.sum(1) - 1
    targets, target_mask = pad_right([list(t) for _, t in examples], pad_id)
    return ids, mask, last_idx, targets, target_mask


def prompt_last_nll(model, ids: torch.Tensor, mask: torch.Tensor, last_idx: torch.Tensor,
                    targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """FT-L loss: per request the mean over its target tokens of -log p(token) at the context's last
    position, averaged over requests."""
    logits = model(input_ids=ids, attention_mask=mask).logits         # [B, L, V]
    rows = torch.arange(ids.size(0), device=ids.device)
    logp = logits[rows, last_idx].float().log_softmax(-1)              # [B, V]
    tok_logp = logp.gather(1, targets) * target_mask                   # [B, T]
    per_request = -tok_logp.sum(1) / target_mask.sum(1)
    return per_request.mean()


def prompt_last_loss(model, batch: Sequence[Example], pad_id: int, device) -> torch.Tensor:
    """:func:`prompt_last_nll` of a minibatch of examples (the ``loss_fn`` of :func:`train_nll`)."""
    return prompt_last_nll(model, *[t.to(device) for t in batch_prompt_last(batch, pad_id)])


def train_prompt_last(model, params: dict[str, torch.nn.Parameter], examples: Sequence[Example],
                      cfg: TrainConfig, pad_id: int, progress: bool = False) -> TrainReport:
    """The FT-L loop: :func:`train_nll` (same optimiser, minibatch order, clamp and early stop) with
    :func:`prompt_last_nll` as the loss. Trains ``params`` in place; deterministic on CPU."""
    return train_nll(model, params, examples, cfg, pad_id, progress, loss_fn=prompt_last_loss, desc="FT-L")


def finetune(model, params: dict[str, torch.nn.Parameter], examples: Sequence[Example], objective: str,
             cfg: TrainConfig, pad_id: int, progress: bool = False) -> TrainReport:
    """Train ``params`` in place on the examples with the named objective."""
    if objective == "prompt_last":
        return train_prompt_last(model, params, examples, cfg, pad_id, progress)
    if objective == "target_new":
        return train_nll(model, params, examples, cfg, pad_id, progress)
    raise ValueError(f"unknown fine-tuning objective '{objective}'; expected 'prompt_last' or 'target_new'")
