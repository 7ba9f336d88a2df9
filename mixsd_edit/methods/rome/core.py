"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") — pure core.

One fact, one layer l, one rank-one change of the MLP output projection W (``rewrite_module_tmp``):

1. key k* = input of W at the subject's last token, averaged over the context templates;
2. value: δ added to the MLP output there so that `` target_new`` is predicted (``compute_v``),
   i.e. v* = W k* + δ;
3. Δ = δ (C⁻¹k*)ᵀ / (λ + k*ᵀC⁻¹k*), C = E[k kᵀ] over a text corpus, so (W+Δ) k* = v* for λ = 0.

``execute_rome`` returns ``{parameter name: Δ}`` and leaves the model exactly as it found it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.compute_v import optimize_value, prepare_inputs
from mixsd_edit.methods.locate.repr import capture_at_positions, check_subjects, frozen
from mixsd_edit.methods.locate.stats import layer_second_moments
from mixsd_edit.methods.locate.update import check_model, rewrite_param_name, rome_update
from mixsd_edit.prompting import pad_id_of

log = logging.getLogger(__name__)


def execute_rome(model, tok, request: dict, hparams, stats: Mapping[int, torch.Tensor] | None = None, *,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Compute ROME's weight change for one request; the model is not modified.

    ``stats``: ``{layer: C}`` if already loaded (else read from cache or computed when
    ``hparams.mom2_adjustment``). Returns ``{"<rewrite module>.weight": Δ (float32)}``.
    """
    (request,) = normalize_requests([request])
    check_subjects([request])
    check_model(model, hparams)
    inputs = prepare_inputs(tok, request, hparams)
    (layer,) = hparams.layers
    cov = None
    if hparams.mom2_adjustment:
        if stats is None or layer not in stats:
            stats = layer_second_moments(model, tok, hparams, [layer], progress=progress)
        cov = stats[layer]

    rewrite = hparams.rewrite_module_tmp.format(layer=layer)
    n = inputs.n_rewrite
    with frozen(model):
        keys = capture_at_positions(model, inputs.seqs[:n], inputs.lookups[:n], pad_id_of(tok),
                                    inputs_of=[rewrite])[("in", rewrite)]
    key = keys.mean(0)
    value = optimize_value(model, tok, inputs, hparams, hparams.mlp_module_tmp.format(layer=layer))
    delta = rome_update(value.delta, key, cov, hparams.mom2_update_weight).float()
    log.info("ROME %r -> %r at layer %d: P(target) %.3f -> %.3f in %d steps, |delta v| %.3f, |v0| %.3f",
             request["prompt"], request["target_new"], layer, value.prob_before, value.prob_after, value.steps,
             float(value.delta.norm()), float(value.init.norm()))
    name = rewrite_param_name(hparams, layer)
    expected = dict(model.named_parameters())[name].shape
    if delta.shape != expected:
        raise RuntimeError(f"ROME update has shape {tuple(delta.shape)} but {name} is {tuple(expected)}")
    return {name: delta}
