"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer") — pure core.

For a batch of requests and an edited span of layers l₁ < … < L (``hparams.layers``):

1. for each request i, optimise δᵢ added to the output of block L at the subject's last token
   (``compute_v``); the target hidden state is zᵢ = hᴸᵢ + δᵢ (hᴸᵢ averaged over the templates);
2. for each layer l, lowest first, on the model holding the updates of the layers below:
   keys Kₗ (inputs of ``rewrite_module_tmp`` at the lookup token, averaged over the templates),
   residual rᵢ = (zᵢ − hᴸᵢ(current model)) / (number of layers left, l included), and
   Δₗ = R Kᵀ (λ Cₗ + K Kᵀ)⁻¹ with λ = ``mom2_update_weight`` and Cₗ = E[k kᵀ] over a corpus.

``execute_memit`` applies the Δₗ to the model while it works (the keys of upper layers depend on
them), restores every touched weight bit-exactly before returning, and returns ``{name: Δₗ}``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.compute_v import optimize_value, prepare_inputs
from mixsd_edit.methods.locate.repr import capture_at_positions, check_subjects, frozen
from mixsd_edit.methods.locate.stats import layer_second_moments
from mixsd_edit.methods.locate.update import (
    add_deltas,
    check_model,
    mean_over_templates,
    memit_update,
    rewrite_param_name,
)
from mixsd_edit.prompting import pad_id_of

log = logging.getLogger(__name__)


def execute_memit(model, tok, requests: Sequence[dict], hparams, stats: Mapping[int, torch.Tensor] | None = None,
                  *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Compute MEMIT's weight changes for a batch of requests; the model ends as it began.

    ``stats``: ``{layer: C}`` if already loaded. Returns ``{"<rewrite module>.weight": Δ (float32)}``.
    """
    requests = normalize_requests(requests)
    check_subjects(requests)
    check_model(model, hparams)
    inputs = [prepare_inputs(tok, r, hparams, i) for i, r in enumerate(requests)]
    layers = sorted(hparams.layers)
    if hparams.mom2_adjustment and (stats is None or any(l not in stats for l in layers)):
        stats = layer_second_moments(model, tok, hparams, layers, progress=progress)

    z_module = hparams.layer_module_tmp.format(layer=layers[-1])
    seqs = [s for x in inputs for s in x.seqs[: x.n_rewrite]]
    lookups = [p for x in inputs for p in x.lookups[: x.n_rewrite]]
    groups = [x.n_rewrite for x in inputs]
    pad = pad_id_of(tok)

    it = inputs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(inputs, desc="MEMIT values", leave=False)
    values = [optimize_value(model, tok, x, hparams, z_module) for x in it]
    with frozen(model):
        h = capture_at_positions(model, seqs, lookups, pad, outputs_of=[z_module])[("out", z_module)]
    z = mean_over_templates(h, groups) + torch.stack([v.delta for v in values])  # [n, d]
    log.info("MEMIT: %d value targets, mean P(target) %.3f -> %.3f", len(values),
             sum(v.prob_before for v in values) / len(values), sum(v.prob_after for v in values) / len(values))

    named = dict(model.named_parameters())
    originals: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    try:
        with frozen(model):
            for pos, layer in enumerate(layers):
                rewrite = hparams.rewrite_module_tmp.format(layer=layer)
                got = capture_at_positions(model, seqs, lookups, pad, inputs_of=[rewrite], outputs_of=[z_module])
                keys = mean_over_templates(got[("in", rewrite)], groups)  # [n, d_in]
                cur = mean_over_templates(got[("out", z_module)], groups)  # [n, d]
                resid = (z - cur) / (len(layers) - pos)
                cov = stats[layer] if hparams.mom2_adjustment else None
                delta = memit_update(keys, resid, cov, hparams.mom2_update_weight).float()
                name = rewrite_param_name(hparams, layer)
                if delta.shape != named[name].shape:
                    raise RuntimeError(f"MEMIT update has shape {tuple(delta.shape)} but {name} is "
                                       f"{tuple(named[name].shape)}")
                log.debug("MEMIT layer %d: |resid| %.3f, |delta W| %.3f", layer, float(resid.norm(dim=1).mean()),
                          float(delta.norm()))
                originals[name] = named[name].detach().clone()
                add_deltas(model, {name: delta})
                deltas[name] = delta
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                named[name].copy_(w)
    return deltas
