"""Hyperparameters shared by ROME and MEMIT (names as in the reference code, so YAMLs read alike)."""
from __future__ import annotations

from dataclasses import dataclass

from mixsd_edit.hparams import HyperParams, HyperParamsError
from mixsd_edit.methods.locate.repr import FACT_TOKENS


@dataclass(frozen=True)
class LocateHyperParams(HyperParams):
    """Fields (all required in the YAML):

    layers: edited layers (ROME: exactly one; MEMIT: the span, its last one holds the value target).
    fact_token: lookup token, ``subject_last`` (paper) or ``last`` (last prompt token).
    context_templates: strings with one ``{}`` for the prompt; keys and the value loss are averaged
        over them (``"{}"`` is the bare prompt). Fixed strings, so edits are deterministic.
    v_num_grad_steps, v_lr: Adam steps and learning rate of the value optimisation.
    v_loss_layer: layer whose output gives the target NLL; must be the model's last layer.
    v_weight_decay: weight of ‖δ‖/‖v₀‖² in the value loss.
    clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor·‖v₀‖ (v₀: original value at the lookup token).
    kl_factor: weight of the KL term on the "{subject} is a" essence prompt.
    mom2_adjustment: use the key second moment C (else C = I).
    mom2_update_weight: λ in Δ = R Kᵀ(λC + KKᵀ)⁻¹; for ROME 0 means the exact rank-one constraint.
    mom2_dataset: plain-text corpus path for C (``~`` and ``$VARS`` expanded).
    mom2_n_samples: number of key positions (tokens) accumulated into C.
    mom2_seq_len: tokens per corpus chunk fed to the model when accumulating C.
    rewrite_module_tmp: edited linear module, e.g. ``model.layers.{layer}.mlp.down_proj``.
    layer_module_tmp: decoder block, e.g. ``model.layers.{layer}`` (MEMIT's value lives at its output).
    mlp_module_tmp: MLP block, e.g. ``model.layers.{layer}.mlp`` (ROME's value lives at its output).
    """

    layers: tuple[int, ...]
    fact_token: str
    context_templates: tuple[str, ...]
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    mom2_update_weight: float
    mom2_dataset: str
    mom2_n_samples: int
    mom2_seq_len: int
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str

    def validate(self) -> None:
        name = type(self).__name__

        def fail(field: str, why: str):
            raise HyperParamsError(f"{name}: {field} {why}")

        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            fail("layers", f"must be distinct non-negative layer indices, got {list(self.layers)}")
        if self.fact_token not in FACT_TOKENS:
            fail("fact_token", f"must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if not self.context_templates:
            fail("context_templates", "must list at least one template (\"{}\" is the bare prompt)")
        for t in self.context_templates:
            if t.count("{}") != 1:
                fail("context_templates", f"entry {t!r} must contain '{{}}' exactly once")
        if self.v_num_grad_steps < 1:
            fail("v_num_grad_steps", f"must be >= 1, got {self.v_num_grad_steps}")
        for field in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, field) > 0:
                fail(field, f"must be > 0, got {getattr(self, field)}")
        for field in ("v_weight_decay", "kl_factor", "mom2_update_weight"):
            if not getattr(self, field) >= 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if self.mom2_n_samples < 1:
            fail("mom2_n_samples", f"must be >= 1, got {self.mom2_n_samples}")
        if self.mom2_seq_len < 2:
            fail("mom2_seq_len", f"must be >= 2, got {self.mom2_seq_len}")
        for field in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp"):
            if "{layer}" not in getattr(self, field):
                fail(field, f"must contain '{{layer}}', got {getattr(self, field)!r}")
