"""One training loop shared by every fine-tuning style method (MixSD, FT-L, FT-M, SFT).

An *example* is ``(context_ids, target_ids)``. By default the loss is the mean negative
log-likelihood of the target tokens given the context (context tokens are never scored); a method
with another objective (FT-L) passes its own ``loss_fn`` and keeps the same optimiser, minibatch
order, clipping, norm constraint and early stop. Only the given parameters train; the rest of the
model is frozen for the duration of the call and unfrozen afterwards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mixsd_edit.prompting import pad_right

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (context_ids, target_ids)


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    num_steps: int
    train_batch_size: int = 16
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float | None = 1.0
    norm_constraint: float | None = None  # L-inf radius around the original weights
    early_stop_loss: float | None = None
    seed: int = 0


@dataclass
class TrainReport:
    steps: int
    losses: list[float]
    updates: list[int] = field(default_factory=list)  # per example: the steps whose minibatch held it

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def batch_examples(examples: Sequence[Example], pad_id: int):
    """-> input_ids, attention_mask, labels (-100 on context and padding), right padded."""
    seqs = [list(c) + list(t) for c, t in examples]
    ids, mask = pad_right(seqs, pad_id)
    labels = torch.full_like(ids, -100)
    for i, (c, t) in enumerate(examples):
        labels[i, len(c):len(c) + len(t)] = torch.tensor(list(t), dtype=torch.long)
    return ids, mask, labels


def target_nll(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over labelled (target) tokens; position t's logits predict token t+1."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100)


# loss_fn(model, minibatch of examples, pad_id, device) -> scalar loss to minimise
LossFn = Callable[[torch.nn.Module, Sequence[Example], int, torch.device], torch.Tensor]


def target_nll_loss(model, batch: Sequence[Example], pad_id: int, device) -> torch.Tensor:
    """The default objective: :func:`target_nll` of the batched examples (context masked)."""
    ids, mask, labels = batch_examples(batch, pad_id)
    return target_nll(model, ids.to(device), mask.to(device), labels.to(device))


def train_nll(model, params: dict[str, torch.nn.Parameter], examples: Sequence[Example],
              cfg: TrainConfig, pad_id: int, progress: bool = False, *, loss_fn: LossFn = target_nll_loss,
              desc: str = "train") -> TrainReport:
    """Train ``params`` in place with AdamW on the examples. Deterministic on CPU for a given seed.

    Each step draws a minibatch of ``cfg.train_batch_size`` examples (a seeded permutation when
    there are more examples than that) and minimises ``loss_fn(model, minibatch, pad_id, device)``,
    ``device`` being that of the trained parameters; ``desc`` labels the progress bar.
    """
    if not examples:
        return TrainReport(0, [])
    dev = next(iter(params.values())).device
    originals = {n: p.detach().clone() for n, p in params.items()} if cfg.norm_constraint is not None else {}
    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the loop must be deterministic
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(examples)
    bs = min(cfg.train_batch_size, n)
    losses: list[float] = []
    updates = [0] * n
    try:
        steps = range(cfg.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=desc, leave=False)
        for _ in steps:
            batch = torch.randperm(n, generator=gen).tolist()[:bs] if n > bs else list(range(n))
            for i in batch:
                updates[i] += 1
            loss = loss_fn(model, [examples[i] for i in batch], pad_id, dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            if cfg.norm_constraint is not None:
                with torch.no_grad():
                    for name, p in params.items():
                        o = originals[name]
                        p.copy_(torch.clamp(p, o - cfg.norm_constraint, o + cfg.norm_constraint))
            losses.append(float(loss.detach()))
            if cfg.early_stop_loss is not None and losses[-1] < cfg.early_stop_loss:
                break
    finally:
        for p, f in zip(all_params, saved_flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    report = TrainReport(len(losses), losses, updates)
    log.debug("trained %d steps, loss %.4f -> %.4f", report.steps, report.first_loss, report.final_loss)
    return report
