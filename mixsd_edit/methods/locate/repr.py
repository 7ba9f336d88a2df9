"""Where a fact is looked up, and what a module sees there.

ROME and MEMIT read the *key* (the input of an MLP's output projection) and the *value* (a
module's output) at one token of the prompt: the subject's last token (``subject_last``) or the
prompt's last token (``last``). This module finds that token and captures module inputs/outputs
at given positions with forward hooks, stopping the forward pass as soon as everything asked for
has been seen (the layers above are never run).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from mixsd_edit.data.requests import RequestError
from mixsd_edit.prompting import pad_right

FACT_TOKENS = ("subject_last", "last")


class StopForward(Exception):
    """Raised from a hook to end a forward pass early; caught by the caller that installed it."""


def module_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"module '{name}' does not exist in {type(model).__name__}; check the hparams' module templates"
        ) from None


def check_subjects(requests: Sequence[dict]) -> None:
    """Every request needs a ``subject`` that occurs in its ``prompt`` (raised before any work)."""
    for i, r in enumerate(requests):
        subject = r.get("subject")
        if not subject:
            raise RequestError(f"request {i}: field 'subject' is missing (ROME/MEMIT need the subject)")
        if subject not in r["prompt"]:
            raise RequestError(f"request {i}: subject {subject!r} does not occur in prompt {r['prompt']!r}")


def fill_template(template: str, prompt: str, subject: str | None) -> tuple[str, tuple[int, int] | None]:
    """``template.format(prompt)`` and the character span of the subject's FIRST occurrence in it."""
    text = template.replace("{}", prompt, 1)
    if subject is None:
        return text, None
    start = template.index("{}") + prompt.index(subject)
    return text, (start, start + len(subject))


def encode_with_lookup(tok, text: str, span: tuple[int, int] | None, fact_token: str, *,
                       add_special_tokens: bool = True) -> tuple[list[int], int]:
    """Token ids of ``text`` (special tokens as the tokenizer adds them, like ``PromptFormat``; pass
    ``add_special_tokens=False`` for text that already carries them, e.g. a rendered chat template) and
    the lookup position: the last token overlapping ``span`` (``subject_last``) or the last token."""
    if fact_token == "last":
        ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids, len(ids) - 1
    if fact_token != "subject_last":
        raise ValueError(f"fact_token '{fact_token}' is not one of {FACT_TOKENS}")
    if span is None:
        raise ValueError("fact_token 'subject_last' needs the subject's position")
    start, end = span
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not hits:
            raise ValueError(f"no token covers the subject in {text!r}")
        return ids, hits[-1]
    # Slow tokenizers have no offsets: the subject ends where the tokenized prefix ends.
    ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
    head = tok(text[:end], add_special_tokens=add_special_tokens)["input_ids"]
    if ids[: len(head)] != head:
        raise ValueError(f"cannot locate the subject's last token in {text!r} (tokenization not prefix-stable)")
    return ids, len(head) - 1


def _first(output):
    """Decoder layers return a tensor in recent transformers, a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_at_positions(model, seqs: Sequence[Sequence[int]], positions: Sequence[int], pad_id: int, *,
                         inputs_of: Sequence[str] = (), outputs_of: Sequence[str] = (),
                         batch_size: int = 32) -> dict[tuple[str, str], torch.Tensor]:
    """Inputs/outputs of named modules at one position per sequence.

    Returns ``{("in"|"out", module_name): float32 tensor [len(seqs), dim]}`` on the model's device.
    Sequences are right padded, so the positions of real tokens do not move.
    """
    wanted = [("in", n) for n in inputs_of] + [("out", n) for n in outputs_of]
    dev = next(model.parameters()).device
    chunks: dict[tuple[str, str], list[torch.Tensor]] = {w: [] for w in wanted}
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_right([list(x) for x in seqs[s:s + batch_size]], pad_id)
        rows = torch.arange(ids.size(0))  # CPU indices work for tensors on any device
        pos = torch.tensor(positions[s:s + batch_size])
        seen: dict[tuple[str, str], torch.Tensor] = {}

        def make_hook(name: str, seen=seen, rows=rows, pos=pos) -> Callable:
            def hook(module, args, output):
                # .to(dev): with a model split over devices, bring every capture to one place
                if ("in", name) in chunks:
                    seen[("in", name)] = args[0][rows, pos].float().to(dev)
                if ("out", name) in chunks:
                    seen[("out", name)] = _first(output)[rows, pos].float().to(dev)
                if len(seen) == len(wanted):
                    raise StopForward
            return hook

        handles = [module_by_name(model, n).register_forward_hook(make_hook(n)) for n in {w[1] for w in wanted}]
        try:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        for w in wanted:
            chunks[w].append(seen[w])
    return {w: torch.cat(v, 0) for w, v in chunks.items()}


@contextmanager
def add_to_output(model, module_name: str, positions_mask: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """While active, ``module_name``'s output gets ``delta`` added where ``positions_mask`` [B, T] is 1."""
    m = positions_mask.unsqueeze(-1)

    def shifted(out: torch.Tensor) -> torch.Tensor:
        return out + m.to(out.device, out.dtype) * delta.to(out.device, out.dtype)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (shifted(output[0]),) + tuple(output[1:])
        return shifted(output)

    handle = module_by_name(model, module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen(model) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; flags and mode restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t
