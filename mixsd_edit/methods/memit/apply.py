"""MEMIT's EasyEdit-style entry point: validate, compute all layer updates, then write them."""
from __future__ import annotations

from mixsd_edit.methods.locate import apply as locate
from mixsd_edit.methods.locate.update import add_deltas
from mixsd_edit.methods.memit.core import execute_memit
from mixsd_edit.methods.memit.hparams import MEMITHyperParams
from mixsd_edit.weights import EditTransaction


def check_memit_inputs(model, tok, requests, hparams, stats=None, **kwargs) -> list[dict]:
    """Everything MEMIT refuses, checked before any work (see ``locate.apply.check_inputs``); returns the
    canonical requests. The editor calls it on all requests of a call, so indices are the call's."""
    return locate.check_inputs(model, tok, requests, hparams, MEMITHyperParams, stats)


def apply_memit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                         keep_original_weight=False, stats=None, progress=True, **kwargs):
    """Apply MEMIT to all requests at once; returns ``(model, weights_copy)`` (EasyEdit contract).

    Everything is validated before the model is touched, and a failure restores it bit-exactly.
    ``stats``: optional ``{layer: C}`` (else read from the cache or computed in one corpus pass).
    """
    requests = check_memit_inputs(model, tok, requests, hparams, stats)
    model, stats, params = locate.begin(model, tok, hparams, copy=copy, stats=stats, progress=progress)
    with EditTransaction(model, params) as tx:
        deltas = execute_memit(model, tok, requests, hparams, stats=stats, progress=progress)
        add_deltas(model, deltas)
    return model, tx.result(return_orig_weights, keep_original_weight)
