"""Register MixSD into an EasyEdit that the user has importable (no edits to EasyEdit's files).

EasyEdit dispatches ``hparams.alg_name`` through the module-level dict
``easyeditor.util.alg_dict.ALG_DICT`` and only lets ``batch_edit`` through for names that
``BatchEditor.is_batchable_method`` accepts. There is no plugin entry point, so we add our apply
function to that dict and wrap the static method. Usage::

    import easyeditor
    from mixsd_edit.easyedit_adapter import register_into_easyedit, as_easyedit_hparams
    register_into_easyedit()
    hp = as_easyedit_hparams(MixSDHyperParams.from_hparams("hparams/MixSD/qwen3-1.7b"))
    editor = easyeditor.BaseEditor.from_hparams(hp)

EasyEdit calls the apply function once per request, with the same model, whether it runs a sequence
(``sequential_edit=True``: the edits stay) or single edits (it copies ``weights_copy`` back after each).
It passes no ``past_edit_keys``, so for a YAML with ``past_edit_key_weight`` > 0 the adapter keeps one
:class:`PastEditKeys` per model and tells the two loops apart by the weights themselves: a call continues
the sequence only when the weights MixSD edits are bit-for-bit those its previous call on that model left
(a hash of them); restored or otherwise changed weights start a new, empty one. So the protection follows
the edits that are actually in the model.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import weakref
from types import ModuleType, SimpleNamespace

import torch

from mixsd_edit.methods.mixsd import MixSDHyperParams, PastEditKeys, apply_mixsd_to_model
from mixsd_edit.weights import select_parameters, weights_hash

log = logging.getLogger(__name__)

# Fields EasyEdit's editors read that our strict dataclass does not declare.
EASYEDIT_DEFAULTS = {"fp16": False, "model_parallel": False, "use_chat_template": False}


def as_easyedit_hparams(hp: MixSDHyperParams) -> SimpleNamespace:
    """A plain attribute object EasyEdit can read (with its extra fields), convertible back."""
    return SimpleNamespace(**{**EASYEDIT_DEFAULTS, **hp.to_dict()})


def _to_mixsd_hparams(hparams) -> MixSDHyperParams:
    if isinstance(hparams, MixSDHyperParams):
        return hparams
    names = {f.name for f in dataclasses.fields(MixSDHyperParams)}
    values = {k: getattr(hparams, k) for k in names if hasattr(hparams, k)}
    return MixSDHyperParams.from_dict(values, source="EasyEdit hparams object")


# model -> (its PastEditKeys, hash of the edited weights as MixSD's last call on it left them)
_sequences: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[PastEditKeys, str]]" = weakref.WeakKeyDictionary()


def apply_mixsd_for_easyedit(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                             keep_original_weight=False, **kwargs):
    """``apply_mixsd_to_model`` accepting EasyEdit's hparams objects (extra fields are ignored). With
    ``past_edit_key_weight`` > 0 and no ``past_edit_keys`` given, the model's sequence is continued when its
    edited weights are as this function's last call left them, else a new one starts (module docstring)."""
    kwargs.pop("train_ds", None)
    hp = _to_mixsd_hparams(hparams)
    track = hp.past_edit_key_weight > 0 and kwargs.get("past_edit_keys") is None  # > 0 implies key_rank_one
    if track:
        state = _sequences.get(model)
        params = select_parameters(model, hp.trainable_params, hp.layers)
        past = state[0] if state is not None and state[1] == weights_hash(params) else PastEditKeys()
        kwargs["past_edit_keys"] = past
    edited, weights_copy = apply_mixsd_to_model(model, tok, requests, hp, copy=copy,
                                                return_orig_weights=return_orig_weights,
                                                keep_original_weight=keep_original_weight, **kwargs)
    if track:
        _sequences[edited] = (past, weights_hash(select_parameters(edited, hp.trainable_params, hp.layers)))
    return edited, weights_copy


def register_into_easyedit(easyeditor: ModuleType | None = None, name: str = "MixSD") -> None:
    """Add MixSD to EasyEdit's ALG_DICT and make ``batch_edit`` accept it. Idempotent."""
    if easyeditor is None:
        try:
            easyeditor = importlib.import_module("easyeditor")
        except ImportError as e:
            raise ImportError("register_into_easyedit needs an importable EasyEdit (`easyeditor` package on "
                              "sys.path, e.g. a clone of zjunlp/EasyEdit); mixsd_edit's own editor works without it") from e
    alg_dict_mod = _find(easyeditor, "util.alg_dict")
    alg_dict_mod.ALG_DICT[name] = apply_mixsd_for_easyedit
    batch_mod = _find(easyeditor, "editors.batch_editor")
    batch_cls = batch_mod.BatchEditor
    original = batch_cls.__dict__["is_batchable_method"]
    original_fn = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original_fn, "_mixsd_names", None) is not None:
        original_fn._mixsd_names.add(name)
        return

    names = {name}

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in names or original_fn(alg_name)

    is_batchable_method._mixsd_names = names  # type: ignore[attr-defined]
    batch_cls.is_batchable_method = staticmethod(is_batchable_method)
    log.info("registered %s into EasyEdit", name)


def _find(root: ModuleType, dotted: str) -> ModuleType:
    """``root.<dotted>`` as an attribute chain, else imported as a submodule."""
    obj = root
    try:
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        return importlib.import_module(f"{root.__name__}.{dotted}")
