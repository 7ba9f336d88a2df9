"""ROME's EasyEdit-style entry point: validate, compute, then write the rank-one change."""
from __future__ import annotations

import logging

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.compute_v import prepare_inputs
from mixsd_edit.methods.locate.repr import check_subjects
from mixsd_edit.methods.locate.stats import layer_second_moments, resolve_corpus
from mixsd_edit.methods.locate.update import add_deltas, check_model
from mixsd_edit.methods.rome.core import execute_rome
from mixsd_edit.weights import EditTransaction, begin_edit, select_parameters

log = logging.getLogger(__name__)


def apply_rome_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                        keep_original_weight=False, stats=None, progress=True, **kwargs):
    """Apply ROME; returns ``(model, weights_copy)`` (EasyEdit contract).

    ROME is a single-edit method: more than one request is a ``ValueError`` unless
    ``hparams.sequential`` is true, in which case the requests are applied one after another, each
    computed on the model that already holds the earlier ones. Everything is validated before the
    model is touched, and a failure restores it bit-exactly. ``stats``: optional ``{layer: C}``.
    """
    requests = normalize_requests(requests)
    check_subjects(requests)
    if len(requests) > 1 and not hparams.sequential:
        raise ValueError(f"ROME edits one fact per call but got {len(requests)} requests; pass them one at a "
                         "time, use MEMIT for batches, or set 'sequential: true' to apply them one after another")
    check_model(model, hparams)
    for i, request in enumerate(requests):
        prepare_inputs(tok, request, hparams, i)  # tokenisation errors name the request, before any edit
    if hparams.mom2_adjustment and stats is None:
        resolve_corpus(hparams.mom2_dataset)  # a missing corpus fails before any copy or computation
    model = begin_edit(model, copy)
    if hparams.mom2_adjustment and stats is None:
        stats = layer_second_moments(model, tok, hparams, hparams.layers, progress=progress)
    params = select_parameters(model, [hparams.rewrite_module_tmp + ".weight"], hparams.layers)
    with EditTransaction(model, params) as tx:
        for i, request in enumerate(requests):
            deltas = execute_rome(model, tok, request, hparams, stats=stats, progress=progress)
            add_deltas(model, deltas)
            log.debug("ROME applied request %d/%d", i + 1, len(requests))
    return model, tx.result(return_orig_weights, keep_original_weight)
