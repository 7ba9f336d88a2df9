"""Closed-form weight updates of ROME and MEMIT, and the checks and helpers around them.

Convention: a linear layer computes ``v = W k`` with ``W`` of shape [d_out, d_in] (``nn.Linear``).
Both updates are the minimiser of  Σ_i ‖(W+Δ) k_i − v_i‖²  +  λ · E_corpus ‖Δ k‖²
= Σ_i ‖Δ k_i − r_i‖² + λ · tr(Δ C Δᵀ), with residuals r_i = v_i − W k_i and C = E[k kᵀ]:

    Δ = R Kᵀ (λ C + K Kᵀ)⁻¹        (K: keys as columns, R: residuals as columns)

MEMIT uses it as is (λ = ``mom2_update_weight``). For one key it reduces (Sherman–Morrison) to
ROME's rank-one update  Δ = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k); λ = 0 is the paper's hard constraint
(W+Δ) k = W k + r exactly. Without ``mom2_adjustment``, C = I.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.repr import module_by_name


def rome_update(residual: torch.Tensor, key: torch.Tensor, cov: torch.Tensor | None, reg: float = 0.0) -> torch.Tensor:
    """Rank-one Δ [d_out, d_in] (float64) with Δ k = r·(kᵀC⁻¹k)/(λ + kᵀC⁻¹k)."""
    k = key.double()
    u = torch.linalg.solve(cov.to(k.device, torch.float64), k) if cov is not None else k  # C⁻¹ k
    return torch.outer(residual.double(), u) / (reg + k @ u)


def memit_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor | None, reg: float) -> torch.Tensor:
    """Δ [d_out, d_in] (float64) = Rᵀ K (λC + KᵀK)⁻¹ for keys [n, d_in], residuals [n, d_out]."""
    K, R = keys.double(), residuals.double()
    d = K.shape[1]
    C = cov.to(K.device, torch.float64) if cov is not None else torch.eye(d, dtype=torch.float64, device=K.device)
    A = reg * C + K.T @ K  # symmetric
    return R.T @ torch.linalg.solve(A, K.T).T


def num_layers(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def check_model(model, hparams) -> None:
    """hparams fit this model: layers exist, module templates resolve, loss layer is the last one."""
    n = num_layers(model)
    bad = [l for l in hparams.layers if not 0 <= l < n]
    if bad:
        raise HyperParamsError(f"{hparams.alg_name}: layers {bad} outside 0..{n - 1} of {type(model).__name__}")
    if hparams.v_loss_layer != n - 1:
        raise HyperParamsError(f"{hparams.alg_name}: v_loss_layer={hparams.v_loss_layer}, but the loss is read at the "
                               f"model's last layer ({n - 1}); set v_loss_layer: {n - 1}")
    for l in hparams.layers:
        for tmp in (hparams.rewrite_module_tmp, hparams.mlp_module_tmp, hparams.layer_module_tmp):
            module_by_name(model, tmp.format(layer=l))
        w = getattr(module_by_name(model, hparams.rewrite_module_tmp.format(layer=l)), "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise HyperParamsError(f"{hparams.alg_name}: rewrite module at layer {l} has no 2-D weight")


def rewrite_param_name(hparams, layer: int) -> str:
    return hparams.rewrite_module_tmp.format(layer=layer) + ".weight"


@torch.no_grad()
def add_deltas(model, deltas: Mapping[str, torch.Tensor]) -> None:
    """``param += delta`` (delta cast to the parameter's device and dtype)."""
    named = dict(model.named_parameters())
    for name, d in deltas.items():
        p = named[name]
        p.add_(d.to(device=p.device, dtype=p.dtype))


def mean_over_templates(x: torch.Tensor, n_templates: Sequence[int]) -> torch.Tensor:
    """Rows grouped by request (``n_templates[i]`` consecutive rows each) -> per-request mean."""
    return torch.stack([g.mean(0) for g in torch.split(x, list(n_templates))])
