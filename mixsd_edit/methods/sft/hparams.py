"""SFT hyperparameters: the fine-tuning fields of FT-M (target_new objective), under its own name.

The MixSD paper's baseline trains every parameter ("*") with AdamW (betas 0.9/0.95, weight decay
0.01) on the plain ``prompt + target_new`` text, loss on the target tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixsd_edit.methods.ft.hparams import FTHyperParams


@dataclass(frozen=True)
class SFTHyperParams(FTHyperParams):
    ALG_NAME: ClassVar[str] = "SFT"
    OBJECTIVE: ClassVar[str] = "target_new"
