"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer") — pure core.

For a batch of requests and an edited span of layers l₁ < … < L (``hparams.layers``):

1. for each request i, optimise δᵢ added to the output of block L at the subject's last token
   (``compute_v``); the target hidden state is zᵢ = hᴸᵢ + δᵢ (hᴸᵢ averaged over the templates);
2. for each layer l, lowest first, on the model holding the updates of the layers below:
   keys Kₗ (inputs of ``rewrite_module_tmp`` at the lookup token, averaged over the templates),
   residual rᵢ = (zᵢ − hᴸᵢ(current model)) / (number of layers left, l included), and
   Δₗ = R Kᵀ (λ Cₗ + K Kᵀ)⁻¹ with λ = ``mom2_update_weight`` and Cₗ = E[k kᵀ] over a corpus.
   With ``mlp_output_norm_tmp`` (models that normalise the MLP output before adding it to the residual,
   e.g. Gemma's ``post_feedforward_layernorm``), rᵢ is a change of the norm's OUTPUT; the row of R is
   the change xᵢ' − xᵢ of the rewritten module's output xᵢ whose normalised value moves by rᵢ as nearly
   as the norm allows (least squares, ``through_output_norm``). Without it the residual change would be
   written into the pre-norm activations as is, a scale the norm then rescales away.

``execute_memit`` applies the Δₗ to the model while it works (the keys of upper layers depend on
them), restores every touched weight bit-exactly before returning, and returns ``{name: Δₗ}``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.compute_v import optimize_value, prepare_inputs
from mixsd_edit.methods.locate.repr import capture_at_positions, check_subjects, frozen, module_by_name
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
                  *, progress: bool = True, trace: dict | None = None) -> dict[str, torch.Tensor]:
    """Compute MEMIT's weight changes for a batch of requests; the model ends as it began.

    ``stats``: ``{layer: C}`` if already loaded. Returns ``{"<rewrite module>.weight": Δ (float32)}``.
    ``trace``: a dict that receives ``start``, ``target`` and ``reached`` [n, d], the last edited
    layer's output at the lookup token before the update, its value target z, and with all Δ applied.
    """
    requests = normalize_requests(requests)
    check_subjects(requests)
    check_model(model, hparams)
    if hparams.mlp_output_norm_tmp:
        for layer in hparams.layers:
            module_by_name(model, hparams.mlp_output_norm_tmp.format(layer=layer))
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
                norm_name = hparams.mlp_output_norm_tmp.format(layer=layer) if hparams.mlp_output_norm_tmp else None
                outs = [z_module] + ([rewrite] if norm_name else [])
                got = capture_at_positions(model, seqs, lookups, pad, inputs_of=[rewrite], outputs_of=outs)
                keys = mean_over_templates(got[("in", rewrite)], groups)  # [n, d_in]
                cur = mean_over_templates(got[("out", z_module)], groups)  # [n, d]
                resid = (z - cur) / (len(layers) - pos)
                if norm_name:
                    x = mean_over_templates(got[("out", rewrite)], groups)
                    resid = through_output_norm(module_by_name(model, norm_name), x, resid)
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
            got = capture_at_positions(model, seqs, lookups, pad, outputs_of=[z_module])
            reached = mean_over_templates(got[("out", z_module)], groups)
        start = z - torch.stack([v.delta for v in values])
        share = 1.0 - float((z - reached).norm() / (z - start).norm().clamp(min=1e-12))
        log.info("MEMIT: %.1f%% of the value targets' change reached at layer %d", 100 * share, layers[-1])
        if trace is not None:
            trace.update(start=start, target=z, reached=reached)
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                named[name].copy_(w)
    return deltas


def through_output_norm(norm: torch.nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The change d [n, dim] of an RMS norm's input x [n, dim] that moves its output by r as nearly as
    the norm allows.

    An RMS norm maps x to g ⊙ x / rms(x): its outputs are g ⊙ u with rms(u) = 1, so the wanted output
    t = norm(x) + r is met by the nearest such point, u = argmin |g ⊙ u − t| s.t. |u|² = dim (the
    secular equation u(μ) = g ⊙ t / (g² + μ), solved for μ by bisection in float64), and the input
    keeps its scale: x + d = rms(x) · u. The gain g is read off the module as norm(1) and checked
    against x (a norm of another kind, e.g. LayerNorm with a bias, raises ValueError).
    """
    x64, r64 = x.detach().double(), r.detach().double()
    dim = x.shape[-1]
    with torch.no_grad():
        ones = torch.ones(1, dim, dtype=x.dtype, device=x.device)
        g = norm(ones)[0].double()  # (up to sqrt(1 + eps))
        y = norm(x.detach()).double()
    rms = x64.pow(2).mean(-1, keepdim=True).sqrt()
    model_y = g * x64 / rms
    if not torch.allclose(model_y, y, rtol=1e-3, atol=1e-3 * float(y.abs().max())):
        raise ValueError(f"mlp_output_norm_tmp: {type(norm).__name__} does not act as an RMS norm g ⊙ x / rms(x) "
                         f"(max deviation {float((model_y - y).abs().max()):.3g}); MEMIT cannot map its targets through it")
    t = y + r64
    if not bool(torch.isfinite(t).all()):
        raise ValueError("mlp_output_norm_tmp: the norm's output or the residual target is not finite")
    g2, gt = g * g, g * t  # [dim], [n, dim]
    lo = (-g2.min() + 1e-12).expand(t.shape[0]).clone()  # |u(μ)| falls from +inf (near -min g²) to 0
    # an upper bound on μ per row: |u(μ)|² <= |g t|² / μ², so |u|² <= dim at μ = |g t| / sqrt(dim)
    hi = gt.norm(dim=-1).div(dim ** 0.5).clamp(min=1.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        big = (gt / (g2 + mid[:, None])).pow(2).sum(-1) > dim
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    u = gt / (g2 + hi[:, None])
    return (rms * u - x64).to(x.dtype)
