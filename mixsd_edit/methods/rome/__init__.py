"""ROME: rank-one model editing of one MLP output projection (single edit per call)."""
from mixsd_edit.methods.rome.apply import apply_rome_to_model, check_rome_inputs
from mixsd_edit.methods.rome.core import execute_rome
from mixsd_edit.methods.rome.hparams import ROMEHyperParams
from mixsd_edit.registry import register_method

register_method("ROME", apply_rome_to_model, ROMEHyperParams, batchable=False, validate_fn=check_rome_inputs,
                description="Rank-One Model Editing (Meng et al. 2022)")

__all__ = ["ROMEHyperParams", "apply_rome_to_model", "check_rome_inputs", "execute_rome"]
