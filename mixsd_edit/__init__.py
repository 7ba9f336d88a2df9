"""mixsd_edit: MixSD (Mixed Contextual Self-Distillation) as a knowledge-editing method.

Layers (imports point down this list only):
  data (requests, loaders) -> infrastructure (hparams, registry, weights, prompting, training, models)
  -> methods (one folder each) -> evaluation -> editor -> cli.
Importing the package seeds no RNG, writes no file and loads no model; the names below are
imported on first use.
"""
__version__ = "0.1.0"

_LAZY = {
    "BaseEditor": "mixsd_edit.editor",
    "Editor": "mixsd_edit.editor",
    "MixSDHyperParams": "mixsd_edit.methods.mixsd",
    "apply_mixsd_to_model": "mixsd_edit.methods.mixsd",
    "build_mixed_targets": "mixsd_edit.methods.mixsd",
    "load_model_and_tokenizer": "mixsd_edit.models",
    "load_requests": "mixsd_edit.data",
    "get_method": "mixsd_edit.methods",
    "registered_methods": "mixsd_edit.methods",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixsd_edit' has no attribute '{name}'")
