"""Fine-tuning baselines' hyperparameters (FT-L, FT-M; SFT reuses the same fields).

One set of fields, three names. The training objective is fixed by the method name, not by a
separate key, so a YAML file cannot say ``alg_name: FT-M`` and train something else:

- ``FT-L`` -> ``prompt_last``: ROME's constrained fine-tuning (EasyEdit ``objective_optimization:
  prompt_last``); the logits at the prompt's last position are trained towards every target token.
- ``FT-M`` -> ``target_new``: NLL of the target tokens after ``prompt + " "``, prompt masked.
- ``SFT``  -> ``target_new`` too, with full-model defaults (see ``mixsd_edit.methods.sft``).

Every field is required in the YAML; ranges are checked on load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixsd_edit.hparams import HyperParams, HyperParamsError
from mixsd_edit.training import TrainConfig

OBJECTIVES = ("prompt_last", "target_new")


@dataclass(frozen=True)
class FTHyperParams(HyperParams):
    """Shared fields of the fine-tuning baselines. Use a concrete subclass (it fixes the objective)."""

    OBJECTIVE: ClassVar[str] = ""

    # --- input format (must match how the edit is evaluated)
    use_chat_template: bool    # wrap the prompt in the tokenizer's chat template
    system_prompt: str | None  # system turn for the chat template (None: the template's default)

    # --- what trains: fnmatch patterns over parameter names, "{layer}" expanded over `layers`
    trainable_params: tuple[str, ...]
    layers: tuple[int, ...]

    # --- optimisation (AdamW)
    lr: float
    num_steps: int
    train_batch_size: int          # examples (= requests) per optimiser step
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    grad_clip: float | None        # max global grad norm (None: no clipping)
    norm_constraint: float | None  # L-inf radius around the original weights (None: unconstrained)
    early_stop_loss: float | None  # stop once a step's loss is below this (None: run num_steps)
    seed: int                      # minibatch order when there are more requests than train_batch_size

    @property
    def objective(self) -> str:
        return self.OBJECTIVE

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, num_steps=self.num_steps, train_batch_size=self.train_batch_size,
                           weight_decay=self.weight_decay, adam_beta1=self.adam_beta1,
                           adam_beta2=self.adam_beta2, grad_clip=self.grad_clip,
                           norm_constraint=self.norm_constraint, early_stop_loss=self.early_stop_loss,
                           seed=self.seed)

    def validate(self) -> None:
        name = type(self).__name__

        def bad(field: str, why: str):
            raise HyperParamsError(f"{name}: {field} {why}")

        if self.OBJECTIVE not in OBJECTIVES:
            raise HyperParamsError(f"{name} fixes no objective; use FTLHyperParams, FTMHyperParams or SFTHyperParams")
        if not self.trainable_params:
            bad("trainable_params", "must name at least one parameter pattern")
        if any("{layer}" in p for p in self.trainable_params) and not self.layers:
            bad("layers", "must not be empty when trainable_params use {layer}")
        if any(layer < 0 for layer in self.layers):
            bad("layers", f"must be >= 0, got {list(self.layers)}")
        if not 0.0 < self.lr <= 1.0:
            bad("lr", f"must be in (0, 1], got {self.lr}")
        if self.num_steps < 1:
            bad("num_steps", f"must be >= 1, got {self.num_steps}")
        if self.train_batch_size < 1:
            bad("train_batch_size", f"must be >= 1, got {self.train_batch_size}")
        if self.weight_decay < 0.0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        for b in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                bad(b, f"must be in [0, 1), got {getattr(self, b)}")
        for f in ("grad_clip", "norm_constraint", "early_stop_loss"):
            v = getattr(self, f)
            if v is not None and v <= 0.0:
                bad(f, f"must be > 0 or null, got {v}")


@dataclass(frozen=True)
class FTLHyperParams(FTHyperParams):
    ALG_NAME: ClassVar[str] = "FT-L"
    OBJECTIVE: ClassVar[str] = "prompt_last"


@dataclass(frozen=True)
class FTMHyperParams(FTHyperParams):
    ALG_NAME: ClassVar[str] = "FT-M"
    OBJECTIVE: ClassVar[str] = "target_new"
