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
"""
from __future__ import annotations

import torch

from mixsd_edit.lm_utils import coarse_kl, rest_logp
from mixsd_edit.methods.locate.stats import corpus_file, token_chunks
from mixsd_edit.prompting import pad_id_of, pad_right

PRESERVE_TOP_K = 256  # base next-token probabilities kept per position (the rest is one bucket)


class PreservationKL:
    """The base model's next-token distributions on ``preserve_n_tokens`` tokens of ordinary text;
    calling it on a model gives the mean KL(base ‖ model) over those positions (differentiable)."""

    @torch.no_grad()
    def __init__(self, model, tok, hp, *, cache_dir=None):
        if hp.preserve_dataset is None:
            raise ValueError("preserve_weight > 0 needs preserve_dataset (a text file or model_samples)")
        n_sample = max(hp.key_stats_n_tokens, hp.preserve_n_tokens)  # share the cached sampled corpus
        corpus = corpus_file(model, tok, hp.preserve_dataset, n_sample, hp.key_stats_seq_len, cache_dir=cache_dir)
        seqs = [ids for ids, _ in token_chunks(tok, corpus, hp.preserve_n_tokens, hp.preserve_seq_len)]
        if not seqs:
            raise ValueError(f"preserve_dataset {hp.preserve_dataset!r} gave no text")
        dev = next(model.parameters()).device
        ids, mask = pad_right(seqs, pad_id_of(tok))
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        was_training = model.training
        model.eval()
        try:
            logp = model(input_ids=self.ids, attention_mask=self.mask).logits.float().log_softmax(-1)
        finally:
            model.train(was_training)
        self.top_logp, self.top_idx = logp.topk(min(PRESERVE_TOP_K, logp.shape[-1]), dim=-1)
        self.rest_logp = rest_logp(self.top_logp)
        self.n_positions = int(self.mask.sum())

    def __call__(self, model) -> torch.Tensor:
        logp = model(input_ids=self.ids, attention_mask=self.mask).logits.float().log_softmax(-1)
        q_top = logp.gather(-1, self.top_idx)
        kl = coarse_kl(self.top_logp, self.rest_logp, q_top, rest_logp(q_top))
        m = self.mask.to(kl.dtype)
        return (kl * m).sum() / m.sum()
