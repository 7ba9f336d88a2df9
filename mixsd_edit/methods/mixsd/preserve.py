"""MixSD's optional preservation term (hparam ``preserve_weight`` > 0).

MixSD's own objective only says what the model should write after the edited prompts; nothing in it
says "and change nothing else". With many edits trained at once the small side effects of every
request add up (BENCHMARKS.md §8, §11: known-fact retention and WikiText perplexity degrade at 100
edits in one batch). The preservation term adds what the model is meant to keep to the loss:

    loss = NLL(mixed targets | naive contexts) + preserve_weight · mean_t KL(p_base(·|x<t) ‖ p_θ(·|x<t))

over a fixed set of ordinary text ``x`` (``preserve_dataset``: a plain-text file, or ``model_samples``,
the text the model samples itself, the same cached corpus as ``key_stats_dataset: model_samples``).
The base distributions are captured once, before any change, as top-k log-probs plus one bucket for
the rest (:func:`mixsd_edit.lm_utils.coarse_kl`), so memory stays at positions x k.

This is self-distillation on unrelated text: the frozen base model is the teacher there, as the
expert-with-context is the teacher on the edited prompts. The evaluation's retention suite measures
KL and perplexity on WikiText-2 *test*; keep ``preserve_dataset`` off that file.

``preserve_swaps: k`` adds, per request, k copies of its naive prompt with the subject replaced by
another name, scored only at the last position (the next token, where the edited answer would go;
their mean KL is added to the text's mean KL, both times ``preserve_weight``):
"the same question about someone else keeps its answer". The names are capitalised word runs taken
from the same text (:func:`entity_names`), so nothing comes from evaluation data; names equal to
or containing a subject of the call are left out. This is aimed at what a key-directed edit leaks
into: other subjects' keys under the same relation (CounterFact's neighbourhood prompts).
``preserve_swap_positions: after_subject`` scores every position of a swapped prompt from the name's
last token on instead of the last one only ("Ann Lee| professionally| plays| the| sport|"), so the
shorter phrasings of the same relation that neighbours are asked in ("X plays") are kept too; each
(prompt, position) pair weighs the same in the swapped prompts' mean.
``preserve_swaps_per_step: m`` (> 0) scores, at each call, a fresh random m of each request's swapped
prompts instead of all of them (drawn without replacement from a generator seeded with ``seed``, so the
same seed gives the same draws): every request keeps its share of the term at every step, and the mean
over the drawn prompts is an unbiased estimate of the full mean at about m/``preserve_swaps`` of its cost.
It is not free: on 100 tuning edits in one batch, m = 1 of 8 took the batch YAML's ES from 0.95 to 0.83
and kept no more of the model (a uniform draw of 64 of the call's 800 prompts, tried first: ES 0.74;
BENCHMARKS.md §36). Every YAML keeps 0; the switch is for batches where scoring every swapped prompt
at every step does not fit the time or memory at hand. With m >= ``preserve_swaps`` every prompt is
scored, exactly as with 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from mixsd_edit.lm_utils import coarse_kl, rest_logp
from mixsd_edit.methods.locate.stats import corpus_file, token_chunks
from mixsd_edit.methods.locate.repr import encode_with_lookup
from mixsd_edit.methods.mixsd.swaps import entity_names, swap_pairs, swap_prompts  # noqa: F401 (re-exported)
from mixsd_edit.prompting import PromptFormat, pad_id_of, pad_right

PRESERVE_TOP_K = 256  # base next-token probabilities kept per position (the rest is one bucket)
class PreservationKL:
    """The base model's next-token distributions on ``preserve_n_tokens`` tokens of ordinary text (and,
    with ``preserve_swaps``, after each subject-swapped prompt); calling it on a model gives the mean
    KL(base ‖ model) over the text positions plus the mean over the swapped prompts (differentiable;
    two means, so the swapped prompts weigh as much as the text however many there are)."""

    @torch.no_grad()
    def __init__(self, model, tok, hp, requests: Sequence[dict] = (), *, cache_dir=None):
        if hp.preserve_dataset is None:
            raise ValueError("preserve_weight > 0 needs preserve_dataset (a text file or model_samples)")
        n_sample = max(hp.key_stats_n_tokens, hp.preserve_n_tokens)  # share the cached sampled corpus
        corpus = corpus_file(model, tok, hp.preserve_dataset, n_sample, hp.key_stats_seq_len, cache_dir=cache_dir)
        seqs = [ids for ids, _ in token_chunks(tok, corpus, hp.preserve_n_tokens, hp.preserve_seq_len)]
        if not seqs:
            raise ValueError(f"preserve_dataset {hp.preserve_dataset!r} gave no text")
        self.checkpoint = hp.preserve_checkpoint
        dev = next(model.parameters()).device
        ids, mask = pad_right(seqs, pad_id_of(tok))
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        self.swapped = self._swapped_prompts(tok, hp, requests, corpus) if hp.preserve_swaps > 0 else []
        # swapped prompts in groups of equal length: no padding, and logits only at the scored tail
        # (a [prompts, length, vocab] logits tensor of a few hundred prompts does not fit a small machine)
        by_len: dict[int, list[int]] = {}
        for p, (ids_, _) in enumerate(self.swapped):
            by_len.setdefault(len(ids_), []).append(p)
        self.groups, self.group_masks = [], []
        self.where: list[tuple[int, int]] = [(0, 0)] * len(self.swapped)  # prompt p: (group, row)
        for length, members in sorted(by_len.items()):
            g = [self.swapped[p] for p in members]
            for row, p in enumerate(members):
                self.where[p] = (len(self.groups), row)
            keep = length - min(first for _, first in g)  # positions scored in this group, from the end
            self.groups.append(torch.tensor([ids_ for ids_, _ in g], device=dev))
            # row r scores the tail positions at or after its own first scored position
            self.group_masks.append(torch.tensor([[length - keep + j >= first for j in range(keep)] for _, first in g],
                                                 device=dev))
        was_training = model.training
        model.eval()
        try:
            logp = self._text_logp(model)
            tails = [self._tail_logp(model, g, m.shape[1]) for g, m in zip(self.groups, self.group_masks)]
        finally:
            model.train(was_training)
        k = min(PRESERVE_TOP_K, logp.shape[-1])
        self.top_logp, self.top_idx = logp.topk(k, dim=-1)
        self.rest_logp = rest_logp(self.top_logp)
        self.group_top = [lp.topk(k, dim=-1) for lp in tails]
        self.group_rest = [rest_logp(t.values) for t in self.group_top]
        self.n_positions = int(self.mask.sum()) + sum(int(m.sum()) for m in self.group_masks)
        # stratified draws (preserve_swaps_per_step): swapped prompt p belongs to request p // preserve_swaps
        # (swap_pairs keeps request order)
        self.swaps_per_request = hp.preserve_swaps
        self.per_step = hp.preserve_swaps_per_step if 0 < hp.preserve_swaps_per_step < hp.preserve_swaps else 0
        self.generator = torch.Generator().manual_seed(hp.seed)

    def _text_logp(self, model) -> torch.Tensor:
        return model(input_ids=self.ids, attention_mask=self.mask).logits.float().log_softmax(-1)

    @staticmethod
    def _tail_logp(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """[prompts, keep, vocab] next-token log-probs at the last ``keep`` positions."""
        return model(input_ids=ids, logits_to_keep=keep).logits[:, -keep:].float().log_softmax(-1)

    @staticmethod
    def _swapped_prompts(tok, hp, requests: Sequence[dict], corpus: Path) -> list[tuple[list[int], int]]:
        """(token ids, first scored position) of each request's naive context (as MixSD trains on it) with
        the subject swapped: the last position, or with ``after_subject`` the name's last token."""
        fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
        names = entity_names(corpus.read_text(encoding="utf-8", errors="replace"))
        pairs = swap_pairs([hp.naive_text(r) for r in requests], [r["subject"] for r in requests], names,
                           hp.preserve_swaps, hp.seed)
        out = []
        for text, name in pairs:
            if hp.preserve_swap_positions == "last":
                ids = fmt.context_ids(tok, text)
                out.append((ids, len(ids) - 1))
                continue
            context = fmt.context(tok, text)
            start = context.rfind(name)
            ids, first = encode_with_lookup(tok, context, (start, start + len(name)), "subject_last",
                                            add_special_tokens=not hp.use_chat_template)
            out.append((ids, first))
        return out

    def _text_kl(self, model) -> torch.Tensor:
        q_top = self._text_logp(model).gather(-1, self.top_idx)
        return coarse_kl(self.top_logp, self.rest_logp, q_top, rest_logp(q_top))

    def _group_kl(self, model, i: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """KL at the tail positions of group ``i``'s prompts (``rows`` of them, or all)."""
        top, rest, ids = self.group_top[i], self.group_rest[i], self.groups[i]
        keep = self.group_masks[i].shape[1]
        values, indices = top.values, top.indices
        if rows is not None:
            values, indices, rest, ids = values[rows], indices[rows], rest[rows], ids[rows]
        q = self._tail_logp(model, ids, keep).gather(-1, indices)
        return coarse_kl(values, rest, q, rest_logp(q))

    def _drawn_rows(self) -> list[torch.Tensor | None]:
        """Per group, the rows scored at this call: all (None) or, with ``preserve_swaps_per_step``, the
        group's rows among a fresh draw of that many swapped prompts per request (empty: none this time)."""
        if not self.per_step:
            return [None] * len(self.groups)
        k, n_req = self.swaps_per_request, len(self.swapped) // self.swaps_per_request
        picks = torch.rand(n_req, k, generator=self.generator).argsort(dim=1)[:, : self.per_step]
        drawn = (picks + k * torch.arange(n_req).unsqueeze(1)).flatten().tolist()
        rows: list[list[int]] = [[] for _ in self.groups]
        for p in drawn:
            g, row = self.where[p]
            rows[g].append(row)
        return [torch.tensor(sorted(r), dtype=torch.long) for r in rows]

    def _run(self, fn, *args) -> torch.Tensor:
        """``fn(*args)``; with ``preserve_checkpoint`` its activations are not kept but recomputed in
        backward (the same operations on the same inputs: the same gradients), so the peak holds one
        forward pass (the text, or one group of swapped prompts) at a time instead of all of them."""
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def __call__(self, model) -> torch.Tensor:
        kl = self._run(self._text_kl, model)
        m = self.mask.to(kl.dtype)
        text = (kl * m).sum() / m.sum()
        if not self.groups:
            return text
        swapped = []
        for i, rows in enumerate(self._drawn_rows()):
            if rows is None:
                swapped.append(self._run(self._group_kl, model, i)[self.group_masks[i]])
            elif len(rows):
                swapped.append(self._run(self._group_kl, model, i, rows)[self.group_masks[i][rows]])
        return text + torch.cat(swapped).mean()
