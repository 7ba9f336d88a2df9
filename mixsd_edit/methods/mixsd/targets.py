"""Mixed target construction: the frozen model writes its own training targets.

Two conditionals of the same model decode ONE shared sequence. At every step a coin with
P(naive) = λ picks which conditional chooses the next token: the *expert* (the new fact is in its
context) or the *naive* (the plain prompt). The chosen token is appended to both contexts, so both
always see the same shared prefix. Nothing here changes the model.

Batching: the naive and expert contexts of B sequences are stacked into one left-padded batch of
2B rows (row i naive, row B+i expert) with one KV cache, so each step is a single forward pass of
one new token per row rather than a re-run of the prefix.

Determinism: every (request, attempt) pair has its own ``random.Random`` seeded from
(seed, attempt, request text), so a request's target does not depend on which other requests share
its batch, and attempt k is the same whether attempts run one at a time or several in parallel.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mixsd_edit.lm_utils import step

log = logging.getLogger(__name__)

NAIVE, EXPERT, FORCED = "n", "e", "f"


@dataclass
class DecodeResult:
    """One decoded sequence: generated ids (forced prefix included) and who chose each token."""

    ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    finish_reason: str = "length"  # eos | length | newline | rejected

    @property
    def naive_fraction(self) -> float:
        chosen = [s for s in self.sources if s != FORCED]
        return sum(s == NAIVE for s in chosen) / len(chosen) if chosen else 0.0


def request_rng(seed: int, attempt: int, key: str) -> random.Random:
    """The coin/sampling RNG of one attempt of one request (string seeds hash with SHA-512)."""
    return random.Random(f"{seed}|{attempt}|{key}")


def choose_token(logits: torch.Tensor, temperature: float, top_k: int, rng: random.Random) -> int:
    """Greedy when temperature == 0, else sample from softmax(top-k log-probs / T) with ``rng``."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(logp, min(top_k, logp.numel()))
    probs = torch.softmax(vals / temperature, dim=-1).tolist()
    u, cum = rng.random(), 0.0
    for p, i in zip(probs, idx.tolist()):
        cum += p
        if u < cum:
            return int(i)
    return int(idx[-1])


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


@torch.no_grad()
def decode_mixed(model, naive_ctx: Sequence[Sequence[int]], expert_ctx: Sequence[Sequence[int]],
                 rngs: Sequence[random.Random], *, mix_lambda: float, temperature: float, top_k: int,
                 max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                 forced_prefix: Sequence[Sequence[int]] | None = None,
                 is_viable: Callable[[int, list[int]], bool] | None = None,
                 is_stop: Callable[[int], bool] | None = None) -> list[DecodeResult]:
    """Decode B mixed sequences in one batch.

    ``forced_prefix[i]`` tokens (the declared fallback) are part of the target and seen by both
    conditionals before mixing starts. ``is_viable(i, ids)`` may reject a sequence early (e.g. it
    already diverged from the required answer); ``is_stop(token)`` ends a sequence before that token
    (e.g. a newline). An EOS token ends a sequence and is kept in the target.
    """
    B = len(naive_ctx)
    assert len(expert_ctx) == B and len(rngs) == B
    forced = [list(p) for p in forced_prefix] if forced_prefix is not None else [[] for _ in range(B)]
    eos = set(int(e) for e in eos_ids)
    dev = next(model.parameters()).device
    # rows 0..B-1 naive, B..2B-1 expert; the forced prefix is shared text, so both rows get it
    rows = [list(c) + f for c, f in zip(naive_ctx, forced)] + [list(c) + f for c, f in zip(expert_ctx, forced)]
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = step(model, ids, mask, pos)

    results = [DecodeResult(ids=list(f), sources=[FORCED] * len(f)) for f in forced]
    active = [True] * B
    for i in range(B):
        if len(results[i].ids) >= max_new_tokens:
            active[i] = False
    while any(active):
        chosen = torch.full((2 * B,), pad_id, dtype=torch.long)
        for i in range(B):
            if not active[i]:
                continue
            naive = rngs[i].random() < mix_lambda  # λ is the probability of the NAIVE token
            row = i if naive else B + i
            tok = choose_token(logits[row], temperature, top_k, rngs[i])
            r = results[i]
            if is_stop is not None and tok not in eos and is_stop(tok):
                r.finish_reason, active[i] = "newline", False
                continue
            r.ids.append(tok)
            r.sources.append(NAIVE if naive else EXPERT)
            chosen[i] = chosen[B + i] = tok
            if tok in eos:
                r.finish_reason, active[i] = "eos", False
            elif is_viable is not None and not is_viable(i, r.ids):
                r.finish_reason, active[i] = "rejected", False
            elif len(r.ids) >= max_new_tokens:
                r.finish_reason, active[i] = "length", False
        if not any(active):
            break
        # finished rows get a padding token that no later position attends to
        alive = torch.tensor(active + active, dtype=torch.long, device=dev)
        mask = torch.cat([mask, alive[:, None]], dim=1)
        pos = pos[:, -1:] + 1
        logits, cache = step(model, chosen[:, None].to(dev), mask, pos, cache)
    return results


# --------------------------------------------------------------------------- requests -> targets
@dataclass
class MixedTarget:
    """The training target of one request, with the metadata users need to trust it."""

    context_ids: list[int]            # the naive context: what the model is trained to continue
    target_ids: list[int] | None      # None when the request was skipped (fallback "skip")
    text: str | None
    naive_fraction: float             # realised share of naive-chosen tokens (forced ones excluded)
    attempts: int                     # mixed decodes tried (the fallback decode not counted)
    fallback: str | None              # None, "forced_prefix" or "skip"
    finish_reason: str
    train_updates: int | None = None  # set by training: the steps whose minibatch held this target

    def metadata(self) -> dict:
        meta = {"target_text": self.text, "target_tokens": len(self.target_ids or []),
                "naive_fraction": round(self.naive_fraction, 4), "attempts": self.attempts,
                "fallback": self.fallback, "finish_reason": self.finish_reason}
        if self.train_updates is not None:
            meta["train_updates"] = self.train_updates
        return meta


class MixedTargetError(RuntimeError):
    """No valid mixed target and the hparams say ``fallback: error``."""


def _answer_check(tok, answer: str):
    """-> (viable(ids), valid(ids)): the decoded target must begin with ``answer`` verbatim, and the
    answer must end at a word boundary ("Rome" does not accept "Romeo")."""
    a = answer.strip()

    def text(ids):
        return tok.decode(ids, skip_special_tokens=True).lstrip()

    def viable(ids) -> bool:
        g = text(ids)
        if a.startswith(g) or g.endswith("\ufffd"):  # still a prefix, or a split multi-byte char
            return True
        return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())

    def valid(ids) -> bool:
        g = text(ids)
        return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())

    return viable, valid


def _eos_ids(model, tok) -> list[int]:
    ids = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


def build_mixed_targets(model, tok, requests: Sequence[dict], hp, *, batch_size: int = 8,
                        progress: bool = False) -> list[MixedTarget]:
    """Write one mixed target per canonical request with the (frozen) ``model``.

    Each request is tried up to ``hp.max_retries`` times with fresh coins; a target is valid when it
    begins with ``target_new`` verbatim. Requests that never pass get the declared fallback:
    ``forced_prefix`` (the answer tokens are forced, mixing continues after them), ``skip`` (no
    target; the request is not trained on) or ``error``. Attempts run in growing parallel rounds;
    the lowest-numbered valid attempt wins, so the result does not depend on the round schedule.
    """
    from mixsd_edit.prompting import PromptFormat, pad_id_of

    fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
    pad = pad_id_of(tok)
    eos = _eos_ids(model, tok)
    newline_cache: dict[int, bool] = {}

    def is_newline(t: int) -> bool:
        if t not in newline_cache:
            newline_cache[t] = "\n" in tok.decode([t])
        return newline_cache[t]

    stop = is_newline if hp.stop_at_newline else None
    naive, expert, checks, keys = [], [], [], []
    for r in requests:
        naive.append(fmt.context_ids(tok, hp.naive_text(r)))
        expert.append(fmt.context_ids(tok, hp.expert_template.format(**hp.template_fields(r))))
        checks.append(_answer_check(tok, r["target_new"]))
        keys.append(f"{r['prompt']}\x1f{r['target_new']}")
    common = dict(mix_lambda=hp.mix_lambda, temperature=hp.temperature, top_k=hp.top_k,
                  max_new_tokens=hp.max_new_tokens, eos_ids=eos, pad_id=pad, is_stop=stop)

    found: dict[int, tuple[int, DecodeResult]] = {}
    pending = list(range(len(requests)))
    next_attempt, par = 0, 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="mixed targets", leave=False)
    while pending and next_attempt < hp.max_retries:
        attempts = list(range(next_attempt, min(hp.max_retries, next_attempt + par)))
        jobs = [(i, a) for i in pending for a in attempts]
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            res = decode_mixed(
                model, [naive[i] for i, _ in chunk], [expert[i] for i, _ in chunk],
                [request_rng(hp.seed, a, keys[i]) for i, a in chunk],
                is_viable=lambda j, ids, chunk=chunk: checks[chunk[j][0]][0](ids), **common)
            for (i, a), r in zip(chunk, res):
                if checks[i][1](r.ids) and (i not in found or a < found[i][0]):
                    found[i] = (a, r)
        pending = [i for i in pending if i not in found]
        if bar is not None:
            bar.update(len(requests) - len(pending) - bar.n)
        next_attempt, par = attempts[-1] + 1, par * 2

    targets: list[MixedTarget | None] = [None] * len(requests)
    for i, (a, r) in found.items():
        targets[i] = MixedTarget(naive[i], r.ids, tok.decode(r.ids, skip_special_tokens=True), r.naive_fraction,
                                 a + 1, None, r.finish_reason)
    if pending and hp.fallback == "error":
        raise MixedTargetError(
            f"no valid mixed target after {hp.max_retries} attempts for request(s) {pending} "
            f"(e.g. target_new={requests[pending[0]]['target_new']!r}); set fallback to forced_prefix or skip")
    if pending and hp.fallback == "skip":
        for i in pending:
            targets[i] = MixedTarget(naive[i], None, None, 0.0, hp.max_retries, "skip", "rejected")
    elif pending:  # forced_prefix: the answer tokens start the target, mixing continues after them
        for s in range(0, len(pending), batch_size):
            chunk = pending[s:s + batch_size]
            res = decode_mixed(model, [naive[i] for i in chunk], [expert[i] for i in chunk],
                               [request_rng(hp.seed, hp.max_retries, keys[i]) for i in chunk],
                               forced_prefix=[fmt.answer_ids(tok, requests[i]["target_new"]) for i in chunk],
                               **common)
            for i, r in zip(chunk, res):
                targets[i] = MixedTarget(naive[i], r.ids, tok.decode(r.ids, skip_special_tokens=True),
                                         r.naive_fraction, hp.max_retries, "forced_prefix", r.finish_reason)
    if bar is not None:
        bar.update(len(requests) - bar.n)
        bar.close()
    if pending:
        log.info("MixSD: %d of %d request(s) used the fallback '%s'", len(pending), len(requests), hp.fallback)
    return targets  # type: ignore[return-value]
