"""SFT applied to a model (EasyEdit contract): supervised fine-tuning on ``prompt + target_new``."""
from __future__ import annotations

import logging
from typing import Any

from mixsd_edit.methods.ft.apply import edit_by_finetuning
from mixsd_edit.methods.sft.hparams import SFTHyperParams

log = logging.getLogger(__name__)


def apply_sft_to_model(model, tok, requests, hparams: SFTHyperParams, copy: bool = False,
                       return_orig_weights: bool = False, keep_original_weight: bool = False,
                       progress: bool = False, **kwargs: Any):
    """Train the parameters matched by ``hparams.trainable_params`` (all of them for ``"*"``) with NLL
    on the target tokens of every request jointly. Extra EasyEdit keywords are ignored."""
    if not isinstance(hparams, SFTHyperParams):
        raise TypeError(f"expected SFTHyperParams, got {type(hparams).__name__}")
    if kwargs:
        log.debug("apply_sft_to_model ignores keyword(s) %s", sorted(kwargs))
    return edit_by_finetuning(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                              keep_original_weight=keep_original_weight, progress=progress)
