"""ROME hyperparameters: the shared locate-and-edit fields plus ``sequential``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.hparams import LocateHyperParams


@dataclass(frozen=True)
class ROMEHyperParams(LocateHyperParams):
    """See :class:`LocateHyperParams` for the shared fields.

    sequential: ROME edits one fact per call. With ``true``, ``apply_rome_to_model`` accepts several
        requests and applies them one after another (each computed on the model already holding the
        previous edits); with ``false`` more than one request is an error.
    """

    ALG_NAME: ClassVar[str] = "ROME"

    sequential: bool

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise HyperParamsError(f"ROMEHyperParams: layers must hold exactly one layer, got {list(self.layers)}")
