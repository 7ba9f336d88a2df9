"""Method registry: each method registers itself with one call; the editor never lists names.

A method is an EasyEdit-style apply function plus its hyperparameter dataclass::

    apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=False,
             keep_original_weight=False, **kwargs) -> (model, weights_copy)
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


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, apply_fn: Callable[..., Any], hparams_cls: type, *,
                    batchable: bool = True, description: str = "") -> Method:
    """Register a method under ``name`` (its ``alg_name``). Duplicate names are refused."""
    if name in _REGISTRY:
        raise ValueError(f"method '{name}' is already registered")
    m = Method(name, apply_fn, hparams_cls, batchable, description)
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
