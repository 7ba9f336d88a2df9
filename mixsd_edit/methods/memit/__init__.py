"""MEMIT: mass editing of many facts at once, spread over a span of MLP layers."""
from mixsd_edit.methods.memit.apply import apply_memit_to_model, check_memit_inputs
from mixsd_edit.methods.memit.core import execute_memit
from mixsd_edit.methods.memit.hparams import MEMITHyperParams
from mixsd_edit.registry import register_method

register_method("MEMIT", apply_memit_to_model, MEMITHyperParams, batchable=True, validate_fn=check_memit_inputs,
                description="Mass-Editing Memory in a Transformer (Meng et al. 2023)")

__all__ = ["MEMITHyperParams", "apply_memit_to_model", "check_memit_inputs", "execute_memit"]
