"""FT-L and FT-M: the fine-tuning baselines of ROME / EasyEdit (one folder, two method names)."""
from mixsd_edit.methods.ft.apply import apply_ft_to_model, check_finetuning_inputs
from mixsd_edit.methods.ft.hparams import FTHyperParams, FTLHyperParams, FTMHyperParams
from mixsd_edit.registry import register_method

register_method("FT-L", apply_ft_to_model, FTLHyperParams, batchable=True, validate_fn=check_finetuning_inputs,
                description="fine-tune chosen weights so the prompt's last position predicts target_new (ROME's FT-L)")
register_method("FT-M", apply_ft_to_model, FTMHyperParams, batchable=True, validate_fn=check_finetuning_inputs,
                description="fine-tune chosen weights with NLL on target_new after the prompt, prompt masked")

__all__ = ["FTHyperParams", "FTLHyperParams", "FTMHyperParams", "apply_ft_to_model", "check_finetuning_inputs"]
