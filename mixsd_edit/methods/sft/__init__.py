"""SFT: the MixSD paper's supervised fine-tuning baseline (full model by default)."""
from mixsd_edit.methods.ft.apply import check_finetuning_inputs
from mixsd_edit.methods.sft.apply import apply_sft_to_model
from mixsd_edit.methods.sft.hparams import SFTHyperParams
from mixsd_edit.registry import register_method

register_method("SFT", apply_sft_to_model, SFTHyperParams, batchable=True, validate_fn=check_finetuning_inputs,
                description="supervised fine-tuning (all parameters by default) on prompt + target_new")

__all__ = ["SFTHyperParams", "apply_sft_to_model"]
