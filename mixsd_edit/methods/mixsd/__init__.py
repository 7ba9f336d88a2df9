"""MixSD: Mixed Contextual Self-Distillation (arXiv 2605.16865) as an editing method."""
from mixsd_edit.methods.mixsd.apply import apply_mixsd_to_model, check_mixsd_inputs, execute_mixsd
from mixsd_edit.methods.mixsd.hparams import MixSDHyperParams
from mixsd_edit.methods.mixsd.key_delta import PastEditKeys
from mixsd_edit.methods.mixsd.targets import MixedTarget, build_mixed_targets
from mixsd_edit.registry import register_method

register_method("MixSD", apply_mixsd_to_model, MixSDHyperParams, batchable=True, validate_fn=check_mixsd_inputs,
                description="mixed expert/naive self-distillation targets + NLL fine-tuning",
                sequence_kwargs=lambda: {"past_edit_keys": PastEditKeys()})

__all__ = ["apply_mixsd_to_model", "check_mixsd_inputs", "execute_mixsd", "MixSDHyperParams", "MixedTarget", "PastEditKeys", "build_mixed_targets"]
