"""Choosing, saving and restoring the parameters an edit touches."""
from __future__ import annotations

import fnmatch
import hashlib
from typing import Iterable

import torch


class ParamSelectionError(ValueError):
    """The hparams' parameter patterns do not match the model."""


def expand_patterns(patterns: Iterable[str], layers: Iterable[int]) -> list[str]:
    """Expand ``{layer}`` in each pattern over ``layers``; patterns without it pass through."""
    out: list[str] = []
    layers = list(layers)
    for p in patterns:
        if "{layer}" in p:
            if not layers:
                raise ParamSelectionError(f"pattern '{p}' uses {{layer}} but no layers are given")
            out.extend(p.format(layer=l) for l in layers)
        else:
            out.append(p)
    return out


def select_parameters(model: torch.nn.Module, patterns: Iterable[str], layers: Iterable[int] = ()) -> dict[str, torch.nn.Parameter]:
    """Parameters whose names match the (fnmatch) patterns, in model order.

    Every expanded pattern must match at least one parameter: a pattern that matches nothing means
    the hparams were written for another architecture, and that is an error, not a silent no-op.
    ``"*"`` selects every parameter (full fine-tuning).
    """
    named = dict(model.named_parameters())
    expanded = expand_patterns(patterns, layers)
    if not expanded:
        raise ParamSelectionError("no parameter patterns given")
    chosen: dict[str, torch.nn.Parameter] = {}
    for pat in expanded:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            sample = list(named)[:6]
            raise ParamSelectionError(
                f"parameter pattern '{pat}' matches no parameter of {type(model).__name__} "
                f"({len(named)} parameters, e.g. {sample}); check the hparams' module patterns and layers"
            )
        for n in hits:
            chosen[n] = named[n]
    return {n: named[n] for n in named if n in chosen}


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached clones of the parameters (same device and dtype)."""
    return {n: p.detach().clone() for n, p in params.items()}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_hash(params: dict[str, torch.Tensor]) -> str:
    """A hash of the parameters' exact bits (names and shapes included): equal only when bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        t = params[name].detach().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(_INT_OF_SIZE[t.element_size()]).cpu().numpy().data)
    return h.hexdigest()


@torch.no_grad()
def restore_weights(model: torch.nn.Module, weights_copy: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors back into the model: bit-exact, following each parameter's device/dtype."""
    named = dict(model.named_parameters())
    missing = [n for n in weights_copy if n not in named]
    if missing:
        raise KeyError(f"weights_copy names parameters the model does not have: {missing[:5]}")
    for n, t in weights_copy.items():
        named[n].copy_(t.to(device=named[n].device, dtype=named[n].dtype))


def merge_weights_copy(older: dict[str, torch.Tensor], newer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For sequential edits: keep the earliest original of every parameter touched so far."""
    merged = dict(newer)
    merged.update(older)
    return merged


def begin_edit(model: torch.nn.Module, copy: bool) -> torch.nn.Module:
    """EasyEdit's ``copy=True``: edit a deep copy and leave the caller's model alone."""
    if copy:
        import copy as _copy

        return _copy.deepcopy(model)
    return model


class EditTransaction:
    """Snapshot parameters before an edit; restore them if the edit raises.

    ``with EditTransaction(model, params) as tx: ...mutate...`` then ``tx.weights_copy`` holds the
    originals (bit-exact clones). A failing edit leaves the model exactly as it was.
    """

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter]):
        self.model = model
        self.weights_copy = snapshot(params)

    def __enter__(self) -> "EditTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            restore_weights(self.model, self.weights_copy)
        return False

    def result(self, return_orig_weights: bool, keep_original_weight: bool) -> dict[str, torch.Tensor]:
        """EasyEdit contract: originals when asked for by either flag, else an empty dict.
        (EasyEdit silently ignores ``keep_original_weight``; we honour it as 'I need the originals'.)"""
        return self.weights_copy if (return_orig_weights or keep_original_weight) else {}
