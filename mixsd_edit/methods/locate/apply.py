"""What ROME's and MEMIT's apply wrappers share: the input checks, and the start of an edit.

``check_inputs`` runs everything that can fail on the inputs — request fields, subjects, the model's
layers and modules, tokenisation against the context templates, the statistics corpus path — without
any forward pass and without touching the model, so that an error arrives before any work and names
the request (its index in the list given). ``begin`` then copies the model if asked, loads or computes
the second moments and selects the rewritten weights.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.compute_v import prepare_inputs
from mixsd_edit.methods.locate.repr import check_subjects
from mixsd_edit.methods.locate.stats import check_corpus, layer_second_moments
from mixsd_edit.methods.locate.update import check_model
from mixsd_edit.weights import begin_edit, select_parameters


def check_inputs(model, tok, requests, hparams, hparams_cls: type, stats: Mapping | None = None) -> list[dict]:
    """Validate a ROME/MEMIT call before any work; returns the canonical requests.

    Raises TypeError (hparams not a ``hparams_cls``), RequestError (naming the request index and
    field), HyperParamsError (layers/modules the model lacks) or StatsError (corpus not found).
    """
    if not isinstance(hparams, hparams_cls):
        raise TypeError(f"expected {hparams_cls.__name__}, got {type(hparams).__name__}")
    requests = normalize_requests(requests)
    check_subjects(requests)
    check_model(model, hparams)
    for i, request in enumerate(requests):
        prepare_inputs(tok, request, hparams, i)  # tokenisation and length errors name the request
    if hparams.mom2_adjustment and stats is None:
        check_corpus(hparams.mom2_dataset)  # a missing corpus fails before any copy or computation
    return requests


def begin(model, tok, hparams, *, copy: bool, stats: Mapping | None, progress: bool
          ) -> tuple[torch.nn.Module, Mapping | None, dict[str, torch.nn.Parameter]]:
    """After :func:`check_inputs`: ``(model or its copy, {layer: C} or None, rewritten parameters)``."""
    model = begin_edit(model, copy)
    if hparams.mom2_adjustment and stats is None:
        stats = layer_second_moments(model, tok, hparams, hparams.layers, progress=progress)
    params = select_parameters(model, [hparams.rewrite_module_tmp + ".weight"], hparams.layers)
    return model, stats, params
