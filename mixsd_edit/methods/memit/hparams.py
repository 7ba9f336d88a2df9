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

    def validate(self) -> None:
        super().validate()
        if not self.mom2_update_weight > 0:
            raise HyperParamsError("MEMITHyperParams: mom2_update_weight must be > 0 (it keeps λC + KKᵀ invertible)")
