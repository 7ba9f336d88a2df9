"""MEMIT's EasyEdit-style entry point: validate, compute all layer updates, then write them."""
from __future__ import annotations

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.repr import check_subjects
from mixsd_edit.methods.locate.stats import layer_second_moments, resolve_corpus
from mixsd_edit.methods.locate.update import add_deltas, check_model
from mixsd_edit.methods.memit.core import execute_memit
from mixsd_edit.weights import EditTransaction, begin_edit, select_parameters


def apply_memit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                         keep_original_weight=False, stats=None, progress=True, **kwargs):
    """Apply MEMIT to all requests at once; returns ``(model, weights_copy)`` (EasyEdit contract).

    Everything is validated before the model is touched, and a failure restores it bit-exactly.
    ``stats``: optional ``{layer: C}`` (else read from the cache or computed in one corpus pass).
    """
    requests = normalize_requests(requests)
    check_subjects(requests)
    check_model(model, hparams)
    if hparams.mom2_adjustment and stats is None:
        resolve_corpus(hparams.mom2_dataset)  # a missing corpus fails before any copy or computation
    model = begin_edit(model, copy)
    if hparams.mom2_adjustment and stats is None:
        stats = layer_second_moments(model, tok, hparams, hparams.layers, progress=progress)
    params = select_parameters(model, [hparams.rewrite_module_tmp + ".weight"], hparams.layers)
    with EditTransaction(model, params) as tx:
        deltas = execute_memit(model, tok, requests, hparams, stats=stats, progress=progress)
        add_deltas(model, deltas)
    return model, tx.result(return_orig_weights, keep_original_weight)
