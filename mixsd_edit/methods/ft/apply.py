"""Thin wrappers that apply the fine-tuning baselines to a model (EasyEdit contract).

Everything that can fail on the inputs (requests, tokenization, lengths, parameter patterns) is
checked before the model is copied or touched; training runs inside an :class:`EditTransaction`,
so an exception leaves the model bit-exactly as it was.
"""
from __future__ import annotations

import logging
from typing import Any

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.ft.core import build_examples, finetune
from mixsd_edit.methods.ft.hparams import FTHyperParams, FTLHyperParams, FTMHyperParams
from mixsd_edit.prompting import PromptFormat, pad_id_of
from mixsd_edit.weights import EditTransaction, begin_edit, select_parameters

log = logging.getLogger(__name__)


def check_finetuning_inputs(model, tok, requests, hparams: FTHyperParams, **kwargs) -> tuple[list[dict], list]:
    """Everything FT-L / FT-M / SFT refuse, checked without model work: hparams type, request fields,
    tokenisation and length (errors name the request index), parameter patterns. Returns the
    canonical requests and their training examples. The editor calls it on all requests of a call."""
    if not isinstance(hparams, FTHyperParams):
        raise TypeError(f"expected fine-tuning hyperparameters (FTHyperParams), got {type(hparams).__name__}")
    requests = normalize_requests(requests)
    fmt = PromptFormat(hparams.use_chat_template, hparams.system_prompt)
    examples = build_examples(tok, requests, fmt, hparams.max_length)
    select_parameters(model, hparams.trainable_params, hparams.layers)  # bad patterns fail here, untouched
    return requests, examples


def edit_by_finetuning(model, tok, requests, hparams: FTHyperParams, copy: bool = False,
                       return_orig_weights: bool = False, keep_original_weight: bool = False,
                       progress: bool = False):
    """Fine-tune the selected parameters on all requests jointly (one apply call = one batch of
    edits) with ``hparams.objective``. Returns ``(model, weights_copy)``."""
    requests, examples = check_finetuning_inputs(model, tok, requests, hparams)
    model = begin_edit(model, copy)
    params = select_parameters(model, hparams.trainable_params, hparams.layers)
    with EditTransaction(model, params) as tx:
        report = finetune(model, params, examples, hparams.objective, hparams.train_config(),
                          pad_id_of(tok), progress=progress)
    log.info("%s: %d request(s), %d parameter tensor(s), %d step(s), loss %.4f -> %.4f",
             hparams.alg_name, len(requests), len(params), report.steps, report.first_loss, report.final_loss)
    return model, tx.result(return_orig_weights, keep_original_weight)


def apply_ft_to_model(model, tok, requests, hparams: FTHyperParams, copy: bool = False,
                      return_orig_weights: bool = False, keep_original_weight: bool = False,
                      progress: bool = False, **kwargs: Any):
    """FT-L / FT-M (the objective follows ``hparams.alg_name``). Extra EasyEdit keywords are ignored."""
    if not isinstance(hparams, (FTLHyperParams, FTMHyperParams)):
        raise TypeError(f"expected FTLHyperParams or FTMHyperParams, got {type(hparams).__name__}")
    if kwargs:
        log.debug("apply_ft_to_model ignores keyword(s) %s", sorted(kwargs))
    return edit_by_finetuning(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                              keep_original_weight=keep_original_weight, progress=progress)
