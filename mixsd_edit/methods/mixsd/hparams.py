"""MixSD hyperparameters. Every field is required in the YAML; ranges are checked on load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixsd_edit.hparams import HyperParams, HyperParamsError

FALLBACKS = ("forced_prefix", "skip", "error")
SWAP_POSITIONS = ("last", "after_subject")
DELTAS = ("full", "key_rank_one")
PREFIX_KEYS = ("mean", "bare")


@dataclass(frozen=True)
class MixSDHyperParams(HyperParams):
    ALG_NAME: ClassVar[str] = "MixSD"

    # --- mixed target construction (the frozen base model writes its own training targets)
    mix_lambda: float          # probability of taking the NAIVE token at each step (0 = pure expert)
    temperature: float         # 0 = greedy; > 0 = softmax(top-k logp / T) sampling
    top_k: int                 # k for temperature sampling
    max_new_tokens: int        # length of the mixed target (answer + the model's own continuation)
    max_retries: int           # attempts per request before the fallback
    fallback: str              # forced_prefix | skip | error  (when no attempt starts with target_new)
    expert_template: str       # expert context; fields {prompt}, {target_new}, {subject}
    naive_template: str        # naive context (what the model sees in training); field {prompt}
    use_chat_template: bool    # wrap both contexts in the tokenizer's chat template
    system_prompt: str | None  # system turn for the chat template (None: the template's default)
    stop_at_newline: bool      # also stop a target at the first newline (cloze continuations)
    seed: int                  # target RNG seed (coins and sampling) and batch order

    # --- training: NLL on the mixed targets given the naive context
    trainable_params: tuple[str, ...]  # fnmatch patterns over parameter names, "{layer}" expanded
    layers: tuple[int, ...]
    lr: float
    num_steps: int             # optimiser steps for one apply call (at least)
    min_epochs: float          # ... and at least this many passes over the call's targets (batches of edits)
    train_batch_size: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    grad_clip: float | None
    norm_constraint: float | None  # L-inf radius around the original weights (None: unconstrained)
    early_stop_loss: float | None
    # --- what may change (methods/mixsd/key_delta.py): "full" = the matrices matched above (the
    # paper's fine-tuning); "key_rank_one" = one trained vector per request and matrix along C⁻¹k_subject
    delta: str
    key_stats_dataset: str | None  # corpus for C = E[k kᵀ] (key_rank_one); null = identity C
    key_stats_n_tokens: int
    key_stats_seq_len: int
    isolate_requests: bool         # key_rank_one: request i's vector trains on request i's target only
    exclude_batch_mean: bool       # key_rank_one: v_i ⟂ mean key of the other requests (see key_directions)
    subject_key_names: int         # key_rank_one: per request, k copies of its prompt with the subject swapped
                                   #   for a name from key_stats_dataset; their keys' E[k kᵀ] is added to C
    subject_key_weight: float      #   ... times this weight (C + w·E[k_name k_nameᵀ]; see key_delta.py)
    delta_l2: float                # key_rank_one: + delta_l2 x mean over requests of Σ_layers |u_i|² in the
                                   #   loss (the smallest change that writes the target; 0 = off)
    past_edit_key_weight: float    # key_rank_one, sequential editing: C + w·Σ k_j k_jᵀ over the subject keys of
                                   #   the edits already made in the sequence (protects them; 0 = off)
    batch_key_weight: float        # key_rank_one, a batch of edits: C + w·Σ k_j k_jᵀ over the subject keys of
                                   #   this call's requests, so each change avoids the others' subjects (0 = off)
    context_prefixes: int          # + train each target after k openings taken from key_stats_dataset; 0 = off
                                   #   (prefixes.py)
    context_prefix_words: int      #   ... of this many words each
    context_prefix_key: str        #   key_rank_one: the subject key is the "mean" over the bare and prefixed
                                   #   contexts, or the "bare" prompt's alone (openings in training only)
    # --- preservation (methods/mixsd/preserve.py): + preserve_weight x KL(base || edited) on ordinary text
    preserve_weight: float         # 0 = off (the paper's objective)
    preserve_dataset: str | None   # text file or model_samples; required when preserve_weight > 0
    preserve_n_tokens: int         # tokens of that text scored at every training step
    preserve_seq_len: int
    preserve_swaps: int            # + per request, k prompts with the subject swapped for a name from
                                   #   preserve_dataset, KL at their last position (0 = off)
    preserve_swaps_per_step: int   # per request, score a fresh random this-many of its swapped prompts at
                                   #   each step (0 = all of them)
    preserve_swap_positions: str   # last | after_subject: which positions of a swapped prompt are scored
    preserve_checkpoint: bool      # recompute the term's forward passes in backward (same gradients, less
                                   #   memory, more time; for batches of hundreds of requests with swaps)

    def template_fields(self, request: dict) -> dict[str, str]:
        """The fields ``naive_template`` and ``expert_template`` are formatted with."""
        return {"prompt": request["prompt"], "target_new": request["target_new"],
                "subject": request.get("subject") or ""}

    def naive_text(self, request: dict) -> str:
        """The request's naive context (before any chat template): what MixSD trains on."""
        return self.naive_template.format(**self.template_fields(request))

    def validate(self) -> None:
        def bad(field: str, why: str):
            raise HyperParamsError(f"MixSD hparams: {field} {why}")

        if not 0.0 <= self.mix_lambda <= 1.0:
            bad("mix_lambda", f"must be in [0, 1] (probability of the naive token), got {self.mix_lambda}")
        if self.temperature < 0.0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 1:
            bad("top_k", f"must be >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.max_retries < 1:
            bad("max_retries", f"must be >= 1, got {self.max_retries}")
        if self.fallback not in FALLBACKS:
            bad("fallback", f"must be one of {FALLBACKS}, got '{self.fallback}'")
        if "{prompt}" not in self.naive_template:
            bad("naive_template", "must contain {prompt}")
        if "{target_new}" not in self.expert_template:
            bad("expert_template", "must contain {target_new} (the expert must see the new fact)")
        if not 0.0 < self.lr <= 1.0:
            bad("lr", f"must be in (0, 1], got {self.lr}")
        if self.num_steps < 0:
            bad("num_steps", f"must be >= 0, got {self.num_steps}")
        if self.min_epochs < 0:
            bad("min_epochs", f"must be >= 0, got {self.min_epochs}")
        if self.train_batch_size < 1:
            bad("train_batch_size", f"must be >= 1, got {self.train_batch_size}")
        if not self.trainable_params:
            bad("trainable_params", "must name at least one parameter pattern")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            bad("norm_constraint", f"must be > 0 or null, got {self.norm_constraint}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            bad("grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        if self.delta not in DELTAS:
            bad("delta", f"must be one of {DELTAS}, got '{self.delta}'")
        if self.key_stats_n_tokens < 1 or self.key_stats_seq_len < 2:
            bad("key_stats_n_tokens", "must be >= 1 and key_stats_seq_len >= 2")
        for flag in ("isolate_requests", "exclude_batch_mean"):
            if getattr(self, flag) and self.delta != "key_rank_one":
                bad(flag, "needs delta 'key_rank_one' (full fine-tuning has no per-request part)")
        if self.subject_key_names < 0:
            bad("subject_key_names", f"must be >= 0, got {self.subject_key_names}")
        if self.subject_key_weight < 0:
            bad("subject_key_weight", f"must be >= 0, got {self.subject_key_weight}")
        if self.subject_key_names > 0:
            if self.delta != "key_rank_one" or self.key_stats_dataset is None:
                bad("subject_key_names", "needs delta 'key_rank_one' and a key_stats_dataset (the names come from it)")
            if self.subject_key_weight <= 0:
                bad("subject_key_weight", "must be > 0 when subject_key_names > 0")
        if self.delta_l2 < 0:
            bad("delta_l2", f"must be >= 0, got {self.delta_l2}")
        if self.delta_l2 > 0 and self.delta != "key_rank_one":
            bad("delta_l2", "needs delta 'key_rank_one' (it penalises the trained vectors u_i)")
        if self.past_edit_key_weight < 0:
            bad("past_edit_key_weight", f"must be >= 0, got {self.past_edit_key_weight}")
        if self.past_edit_key_weight > 0 and self.delta != "key_rank_one":
            bad("past_edit_key_weight", "needs delta 'key_rank_one' (it shapes the key directions)")
        if self.batch_key_weight < 0:
            bad("batch_key_weight", f"must be >= 0, got {self.batch_key_weight}")
        if self.batch_key_weight > 0 and self.delta != "key_rank_one":
            bad("batch_key_weight", "needs delta 'key_rank_one' (it shapes the key directions)")
        if self.context_prefixes < 0:
            bad("context_prefixes", f"must be >= 0, got {self.context_prefixes}")
        if self.context_prefix_words < 1:
            bad("context_prefix_words", f"must be >= 1, got {self.context_prefix_words}")
        if self.context_prefix_key not in PREFIX_KEYS:
            bad("context_prefix_key", f"must be one of {PREFIX_KEYS}, got '{self.context_prefix_key}'")
        if self.context_prefixes > 0 and self.key_stats_dataset is None:
            bad("context_prefixes", "needs a key_stats_dataset (the openings are taken from it)")
        if self.preserve_weight < 0:
            bad("preserve_weight", f"must be >= 0, got {self.preserve_weight}")
        if self.preserve_weight > 0 and self.preserve_dataset is None:
            bad("preserve_dataset", "must name a text file or model_samples when preserve_weight > 0")
        if self.preserve_n_tokens < 1 or self.preserve_seq_len < 2:
            bad("preserve_n_tokens", "must be >= 1 and preserve_seq_len >= 2")
        if self.preserve_swaps < 0:
            bad("preserve_swaps", f"must be >= 0, got {self.preserve_swaps}")
        if self.preserve_swaps > 0 and self.preserve_weight <= 0:
            bad("preserve_swaps", "needs preserve_weight > 0 (the swapped prompts are part of the preservation term)")
        if self.preserve_swaps_per_step < 0:
            bad("preserve_swaps_per_step", f"must be >= 0 (0 = every swapped prompt), got {self.preserve_swaps_per_step}")
        if self.preserve_swaps_per_step > 0 and self.preserve_swaps == 0:
            bad("preserve_swaps_per_step", "needs preserve_swaps > 0 (it draws from the swapped prompts)")
        if self.preserve_swap_positions not in SWAP_POSITIONS:
            bad("preserve_swap_positions", f"must be one of {SWAP_POSITIONS}, got '{self.preserve_swap_positions}'")
        for b in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                bad(b, f"must be in [0, 1), got {getattr(self, b)}")
