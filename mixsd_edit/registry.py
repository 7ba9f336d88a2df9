"""Method registry: each method registers itself with one call; the editor never lists names.

A method is an EasyEdit-style apply function plus its hyperparameter dataclass::

    apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=False,
             keep_original_weight=False, **kwargs) -> (model, weights_copy)

and, optionally, the input checks its apply function starts with::

    validate_fn(model, tok, requests, hparams, **kwargs) -> None   # raises; no model work

The editor calls ``validate_fn`` once with every request of a call (``kwargs``: the extra keywords
it will pass to ``apply_fn``) before it scores anything, so a bad request fails before any work and
its error names the request's index in the whole call, not in the chunk that reached ``apply_fn``.

A method that carries state from one edit of a sequence to the next (MixSD's earlier-edit keys) gives
``sequence_kwargs() -> dict``: the editor calls it once per ``sequential_edit`` and passes the result
to every ``apply_fn`` call of that sequence (keywords the caller passes win).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    name: str
    apply_fn: Callable[..., Any]
    hparams_cls: type
    batchable: bool = True  # may one apply call take several requests?
    description: str = ""
    validate_fn: Callable[..., Any] | None = None  # the apply function's input checks, callable alone
    sequence_kwargs: Callable[[], dict] | None = None  # fresh per-sequence keywords for apply_fn


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, apply_fn: Callable[..., Any], hparams_cls: type, *,
                    batchable: bool = True, description: str = "",
                    validate_fn: Callable[..., Any] | None = None,
                    sequence_kwargs: Callable[[], dict] | None = None) -> Method:
    """Register a method under ``name`` (its ``alg_name``). Duplicate names are refused."""
    if name in _REGISTRY:
        raise ValueError(f"method '{name}' is already registered")
    m = Method(name, apply_fn, hparams_cls, batchable, description, validate_fn, sequence_kwargs)
    _REGISTRY[name] = m
    return m


def get_method(name: str) -> Method:
    """Look a method up. (``mixsd_edit.methods.get_method`` also imports the built-in methods first.)"""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown editing method '{name}'; registered: {sorted(_REGISTRY)}") from None


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)
