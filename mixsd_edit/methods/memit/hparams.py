"""MEMIT hyperparameters: the shared locate-and-edit fields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.hparams import LocateHyperParams


@dataclass(frozen=True)
class MEMITHyperParams(LocateHyperParams):
    """See :class:`LocateHyperParams`. ``layers`` is the edited span; the value targets are set at the
    output of its last layer and the residual is spread over the span, lowest layer first."""

    ALG_NAME: ClassVar[str] = "MEMIT"
    # norm applied to the MLP output before the residual add, e.g. Gemma's
    # "model.layers.{layer}.post_feedforward_layernorm"; null: the MLP output is added as is (Llama, Qwen)
    mlp_output_norm_tmp: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.mlp_output_norm_tmp is not None and "{layer}" not in self.mlp_output_norm_tmp:
            raise HyperParamsError("MEMITHyperParams: mlp_output_norm_tmp must contain '{layer}'")
        if not self.mom2_update_weight > 0:
            raise HyperParamsError("MEMITHyperParams: mom2_update_weight must be > 0 (it keeps λC + KKᵀ invertible)")
