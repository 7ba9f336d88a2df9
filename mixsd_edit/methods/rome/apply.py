"""ROME's EasyEdit-style entry point: validate, compute, then write the rank-one change."""
from __future__ import annotations

import logging

from mixsd_edit.methods.locate import apply as locate
from mixsd_edit.methods.locate.update import add_deltas
from mixsd_edit.methods.rome.core import execute_rome
from mixsd_edit.methods.rome.hparams import ROMEHyperParams
from mixsd_edit.weights import EditTransaction

log = logging.getLogger(__name__)


def check_rome_inputs(model, tok, requests, hparams, stats=None, **kwargs) -> list[dict]:
    """Everything ROME refuses, checked before any work (see ``locate.apply.check_inputs``); returns the
    canonical requests. The editor calls it on all requests of a call, so indices are the call's."""
    return locate.check_inputs(model, tok, requests, hparams, ROMEHyperParams, stats)


def apply_rome_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                        keep_original_weight=False, stats=None, progress=True, **kwargs):
    """Apply ROME; returns ``(model, weights_copy)`` (EasyEdit contract).

    ROME is a single-edit method: more than one request is a ``ValueError`` unless
    ``hparams.sequential`` is true, in which case the requests are applied one after another, each
    computed on the model that already holds the earlier ones. Everything is validated before the
    model is touched, and a failure restores it bit-exactly. ``stats``: optional ``{layer: C}``.
    """
    requests = check_rome_inputs(model, tok, requests, hparams, stats)
    if len(requests) > 1 and not hparams.sequential:
        raise ValueError(f"ROME edits one fact per call but got {len(requests)} requests; pass them one at a "
                         "time, use MEMIT for batches, or set 'sequential: true' to apply them one after another")
    model, stats, params = locate.begin(model, tok, hparams, copy=copy, stats=stats, progress=progress)
    with EditTransaction(model, params) as tx:
        for i, request in enumerate(requests):
            deltas = execute_rome(model, tok, request, hparams, stats=stats, progress=progress)
            add_deltas(model, deltas)
            log.debug("ROME applied request %d/%d", i + 1, len(requests))
    return model, tx.result(return_orig_weights, keep_original_weight)
