"""The value optimisation shared by ROME and MEMIT (ROME paper §3.1 step 2, MEMIT eq. 16).

For one request, find the vector δ that, added to a module's output at the lookup token (the
subject's last token) of every rewriting prompt, makes the model predict `` target_new``:

    loss(δ) = mean_t [ -Σ_j log P(target_j | template_t(prompt), target_<j) / |target| ]
              + kl_factor · KL( P_δ(· | "{subject} is a") ‖ P(· | "{subject} is a") )
              + v_weight_decay · ‖δ‖ / ‖v₀‖²

with Adam (``v_lr``, ``v_num_grad_steps``), δ projected back onto the ball ‖δ‖ ≤ clamp_norm_factor·‖v₀‖
after each step, where v₀ is the original output there (mean over the rewriting prompts). The
KL term keeps what the model says about the subject itself ("essence") unchanged; it is read at
the last token of the essence prompt. The model's weights are never touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mixsd_edit.data.requests import RequestError
from mixsd_edit.methods.locate.repr import (
    add_to_output,
    capture_at_positions,
    encode_with_lookup,
    fill_template,
    frozen,
)
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right

log = logging.getLogger(__name__)
ESSENCE_TEMPLATE = "{} is a"
EARLY_STOP_LOSS = 5e-2  # as in the reference code: the target is already near-certain


@dataclass(frozen=True)
class EditInputs:
    """Token-level view of one request: rewriting prompts first, the essence prompt last."""

    seqs: list[list[int]]  # template_t(prompt) + target[:-1], ..., essence prompt
    lookups: list[int]  # lookup position in each sequence
    answer_starts: list[int]  # per rewriting prompt: position of the first target token
    target_ids: list[int]

    @property
    def n_rewrite(self) -> int:
        return len(self.answer_starts)


def prepare_inputs(tok, request: dict, hparams, index: int = 0) -> EditInputs:
    """Tokenise a request against the context templates. Pure; raises RequestError naming ``index``."""
    target_ids = PromptFormat().answer_ids(tok, request["target_new"])
    if not target_ids:
        raise RequestError(f"request {index}: target_new {request['target_new']!r} has no tokens")
    seqs, lookups, starts = [], [], []
    try:
        for template in hparams.context_templates:
            text, span = fill_template(template, request["prompt"], request["subject"])
            ids, idx = encode_with_lookup(tok, text, span, hparams.fact_token)
            seqs.append(ids + target_ids[:-1])
            lookups.append(idx)
            starts.append(len(ids))
        text, span = fill_template(ESSENCE_TEMPLATE, request["subject"], request["subject"])
        ids, idx = encode_with_lookup(tok, text, span, hparams.fact_token)
    except ValueError as exc:
        raise RequestError(f"request {index}: {exc}") from None
    seqs.append(ids)
    lookups.append(idx)
    longest = max(len(s) for s in seqs)
    if longest > hparams.max_length:
        raise RequestError(f"request {index}: {longest} tokens with the longest context template, "
                           f"more than max_length={hparams.max_length}")
    return EditInputs(seqs, lookups, starts, target_ids)


@dataclass(frozen=True)
class ValueTarget:
    delta: torch.Tensor  # [d] float32: add to the module output at the lookup token
    init: torch.Tensor  # [d] float32: the original output there, mean over the rewriting prompts
    prob_before: float  # mean over rewriting prompts of P(target)^(1/|target|), δ = 0
    prob_after: float  # same at the last evaluated step
    steps: int


class _Readout:
    """Where the loss reads the logits: the target positions of each rewriting prompt and the
    essence prompt's last position. Only those columns are computed (``logits_to_keep``), which
    spares the output projection over the whole vocabulary at every other position."""

    def __init__(self, inputs: EditInputs, device):
        n, k = inputs.n_rewrite, len(inputs.target_ids)
        pos = [s - 1 + j for s in inputs.answer_starts for j in range(k)]
        kl_pos = len(inputs.seqs[-1]) - 1
        keep = sorted(set(pos) | {kl_pos})
        col = {p: i for i, p in enumerate(keep)}
        self.keep = torch.tensor(keep, device=device)
        self.rows = torch.arange(n, device=device).repeat_interleave(k)
        self.cols = torch.tensor([col[p] for p in pos], device=device)
        self.tgt = torch.tensor(inputs.target_ids * n, device=device)
        self.kl_row, self.kl_col = len(inputs.seqs) - 1, col[kl_pos]
        self.n, self.k = n, k

    def target_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean per-token log P(target) for each rewriting prompt -> [n_rewrite]."""
        logp = torch.log_softmax(logits[self.rows, self.cols].float(), dim=-1)
        return logp.gather(1, self.tgt[:, None]).view(self.n, self.k).mean(1)

    def essence_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[self.kl_row, self.kl_col].float(), dim=-1)


def optimize_value(model, tok, inputs: EditInputs, hparams, module_name: str) -> ValueTarget:
    """Optimise δ at ``module_name``'s output (see module docstring). Leaves the model unchanged."""
    dev = next(model.parameters()).device
    pad = pad_id_of(tok)
    ids, mask = pad_right(inputs.seqs, pad)
    ids, mask = ids.to(dev), mask.to(dev)
    at_lookup = torch.zeros(ids.shape, device=dev)
    at_lookup[torch.arange(len(inputs.seqs)), torch.tensor(inputs.lookups)] = 1.0
    readout = _Readout(inputs, dev)
    with frozen(model):
        out = capture_at_positions(model, inputs.seqs[: inputs.n_rewrite], inputs.lookups[: inputs.n_rewrite], pad,
                                   outputs_of=[module_name])[("out", module_name)]
        init = out.mean(0)
        init_norm = init.norm()
        delta = torch.zeros_like(init, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hparams.v_lr)
        kl_init = None
        prob_before = prob_after = float("nan")
        step = 0
        for step in range(1, hparams.v_num_grad_steps + 1):
            with add_to_output(model, module_name, at_lookup, delta):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=readout.keep).logits
            per_prompt = readout.target_log_probs(logits)
            kl_logp = readout.essence_log_probs(logits)
            if kl_init is None:
                kl_init = kl_logp.detach()
                prob_before = float(per_prompt.detach().exp().mean())
            nll = -per_prompt.mean()
            kl = torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="sum")
            loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * delta.norm() / init_norm ** 2
            prob_after = float(per_prompt.detach().exp().mean())
            log.debug("v step %d: loss %.4f (nll %.4f, kl %.4f) P(target) %.3f", step, loss.item(), nll.item(),
                      kl.item(), prob_after)
            if loss.item() < EARLY_STOP_LOSS or step == hparams.v_num_grad_steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * init_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return ValueTarget(delta.detach().clone(), init, prob_before, prob_after, step)
