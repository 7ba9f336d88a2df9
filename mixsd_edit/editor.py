"""The editor: EasyEdit's ``edit`` / ``batch_edit`` / ``edit_requests`` with an explicit model policy.

What the editor guarantees (where EasyEdit surprises its users):
- "pre" metrics are always computed on the untouched model, for every request, before any edit,
  including in sequential mode; locality is agreement with that untouched model.
- ``case_id`` is the request's position in the whole call, never restarting per chunk.
- Model policy, stated in every result's ``summary["model_state"]``:
  * non-sequential (``sequential_edit=False``): each chunk is applied to the base model, scored and
    restored, so chunks never see each other. The returned model is the *base* model and
    ``weights_copy`` is empty. Pass ``keep_edits=True`` (one chunk only) to get the edited model back
    with the ``weights_copy`` that undoes it.
  * sequential (``sequential_edit=True``): edits accumulate; "post" is scored after the last edit; the
    returned model is edited and ``weights_copy`` holds the original of every changed parameter,
    so ``restore(weights_copy)`` gives back the base model bit-exactly.
- Invalid requests raise before any model work; the model is never left half edited (a failure
  after an apply call, in scoring or in a ``post_hook``, restores the base model before it propagates).
- ``post_hook(model, batch_requests, case_ids)`` (optional, every public edit call) runs after each
  apply call while that chunk's edits are applied and before they are restored, so a caller can
  score the edited model (e.g. ROME's CounterFact probabilities, retention suites) in single/batch
  modes too. ``case_ids`` are the chunk's positions in the call; in sequential mode the model holds
  every edit up to this chunk. Its return value is ignored; it must not change the weights.
- A method that carries state along a sequence (registry ``sequence_kwargs``; MixSD's
  ``past_edit_keys``, read when ``past_edit_key_weight`` > 0) gets fresh state for each sequential call,
  so two sequences never share it; keywords the caller passes win (to continue a sequence across calls).
- Nothing is seeded, logged to files, or printed at import.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from mixsd_edit.data.requests import normalize_requests, requests_from_keywords
from mixsd_edit.evaluation.edit_eval import evaluate_requests, summarize
from mixsd_edit.prompting import PromptFormat
from mixsd_edit.methods import get_method
from mixsd_edit.weights import merge_weights_copy, restore_weights

log = logging.getLogger(__name__)


class BaseEditor:
    """Edit a causal LM with any registered method under EasyEdit's interface."""

    def __init__(self, model, tok, hparams, *, generation_eval: bool = True, fluency: bool = False,
                 progress: bool = True):
        self.hparams = hparams
        self.method = get_method(hparams.alg_name)
        if not isinstance(hparams, self.method.hparams_cls):
            raise TypeError(f"hparams for '{hparams.alg_name}' must be {self.method.hparams_cls.__name__}, "
                            f"got {type(hparams).__name__}")
        self.model, self.tok = model, tok
        self.fmt = PromptFormat(getattr(hparams, "use_chat_template", False), getattr(hparams, "system_prompt", None))
        self.generation_eval = generation_eval
        self.fluency = fluency
        self.progress = progress
        self.last_summary: dict | None = None

    @classmethod
    def from_hparams(cls, hparams, model=None, tok=None, **kwargs) -> "BaseEditor":
        """Build from hparams; loads ``hparams.model_name`` unless a model and tokenizer are given."""
        if model is None:
            from mixsd_edit.models import load_model_and_tokenizer

            model, tok = load_model_and_tokenizer(hparams.model_name, device=hparams.device)
        elif tok is None:
            raise ValueError("from_hparams: a model was given without its tokenizer (pass tok=...)")
        return cls(model, tok, hparams, **kwargs)

    # ------------------------------------------------------------------ public API
    def edit(self, prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
             portability_inputs=None, subject=None, sequential_edit: bool = False, verbose: bool = True,
             keep_edits: bool = False, post_hook=None, **kwargs):
        """One request per apply call. -> (all_metrics, model, weights_copy)."""
        requests = requests_from_keywords(prompts, target_new, ground_truth, subject, rephrase_prompts,
                                          locality_inputs, portability_inputs)
        return self._run(requests, 1, sequential_edit, keep_edits, verbose, kwargs, post_hook)

    def batch_edit(self, prompts=None, target_new=None, ground_truth=None, rephrase_prompts=None,
                   locality_inputs=None, portability_inputs=None, subject=None, sequential_edit: bool = False,
                   verbose: bool = True, keep_edits: bool = False, requests: Sequence[dict] | None = None,
                   post_hook=None, **kwargs):
        """Chunks of ``hparams.batch_size`` requests per apply call. Accepts a list of request dicts
        as the first argument (``editor.batch_edit(requests)``) or EasyEdit's keywords."""
        if requests is None and prompts is not None and not isinstance(prompts, str) and prompts \
                and isinstance(prompts[0], dict):
            requests, prompts = prompts, None
        if requests is not None:
            if prompts is not None or target_new is not None:
                raise ValueError("batch_edit: pass either a list of request dicts or prompts=/target_new=, not both")
            requests = normalize_requests(requests)
        else:
            if target_new is None:
                raise ValueError("batch_edit: field 'target_new' is missing")
            requests = requests_from_keywords(prompts, target_new, ground_truth, subject, rephrase_prompts,
                                              locality_inputs, portability_inputs)
        if not self.method.batchable and self.hparams.batch_size > 1:
            raise ValueError(f"method '{self.method.name}' edits one request per call and cannot batch "
                             f"(hparams batch_size={self.hparams.batch_size}); use edit() or sequential_edit()")
        return self._run(requests, self.hparams.batch_size, sequential_edit, keep_edits, verbose, kwargs, post_hook)

    def edit_requests(self, requests: Sequence[dict], sequential_edit: bool = False, verbose: bool = True,
                      keep_edits: bool = False, batch: bool = False, post_hook=None, **kwargs):
        """Request dicts, one per apply call (``batch=True``: chunks of ``hparams.batch_size``)."""
        if batch:
            return self.batch_edit(requests=requests, sequential_edit=sequential_edit, verbose=verbose,
                                   keep_edits=keep_edits, post_hook=post_hook, **kwargs)
        return self._run(normalize_requests(requests), 1, sequential_edit, keep_edits, verbose, kwargs, post_hook)

    def sequential_edit(self, requests: Sequence[dict], batch: bool = False, verbose: bool = True, **kwargs):
        """Apply requests one after another (or chunk after chunk) without restoring in between."""
        return self.edit_requests(requests, sequential_edit=True, batch=batch, verbose=verbose, **kwargs)

    def restore(self, weights_copy: dict) -> None:
        """Undo an edit returned with ``weights_copy`` (bit-exact)."""
        restore_weights(self.model, weights_copy)

    # ------------------------------------------------------------------ the one flow
    def _evaluate(self, requests, pre_records=None):
        return evaluate_requests(self.model, self.tok, requests, self.fmt, pre_records=pre_records,
                                 generation=self.generation_eval, fluency=self.fluency and pre_records is not None)

    def _run(self, requests: list[dict], chunk_size: int, sequential: bool, keep_edits: bool, verbose: bool,
             apply_kwargs: dict[str, Any], post_hook: Callable[[Any, list[dict], list[int]], Any] | None = None):
        chunks = [list(range(s, min(s + chunk_size, len(requests)))) for s in range(0, len(requests), chunk_size)]
        if keep_edits and not sequential and len(chunks) > 1:
            raise ValueError(f"keep_edits=True needs a single chunk when sequential_edit=False "
                             f"({len(requests)} requests in {len(chunks)} chunks); use sequential_edit=True")
        show = self.progress and verbose
        if sequential and self.method.sequence_kwargs is not None:  # state one sequence carries (caller's win)
            apply_kwargs = {**self.method.sequence_kwargs(), **apply_kwargs}
        if self.method.validate_fn is not None:  # method-specific checks: before any work, indices of this call
            self.method.validate_fn(self.model, self.tok, requests, self.hparams, **apply_kwargs)
        pre = self._evaluate(requests)  # untouched model, every request, before any edit
        post: list[dict | None] = [None] * len(requests)
        metas: list[dict | None] = [None] * len(requests)
        times: list[float] = [0.0] * len(requests)
        held: dict = {}  # restores every edit the model holds right now
        it = chunks
        if show:
            from tqdm.auto import tqdm

            it = tqdm(chunks, desc=f"{self.method.name} edits", unit="edit" if chunk_size == 1 else "batch")
        try:  # any failure (the method restores its own chunk) leaves the base model behind
            for chunk in it:
                batch = [requests[i] for i in chunk]
                meta: list[dict] = []
                t0 = time.perf_counter()
                _, wc = self.method.apply_fn(self.model, self.tok, batch, self.hparams, copy=False,
                                             return_orig_weights=True, metadata_out=meta, progress=False,
                                             **apply_kwargs)
                held = merge_weights_copy(held, wc)
                dt = time.perf_counter() - t0
                for j, i in enumerate(chunk):
                    times[i] = dt
                    metas[i] = meta[j] if j < len(meta) else None
                if not sequential:
                    for i, rec in zip(chunk, self._evaluate(batch, [pre[i] for i in chunk])):
                        post[i] = rec
                if post_hook is not None:
                    post_hook(self.model, batch, list(chunk))
                if not sequential and not keep_edits:
                    restore_weights(self.model, held)
                    held = {}
            if sequential:
                post = self._evaluate(requests, pre)
        except BaseException:
            restore_weights(self.model, held)
            raise
        records = []
        for i, r in enumerate(requests):
            records.append({
                "case_id": i,
                "requested_rewrite": r,
                "time": times[i],
                "chunk_size": chunk_size,
                "pre": pre[i],
                "post": post[i],
                "method_meta": metas[i],
            })
        state = ("edited (sequential): weights_copy restores the base model" if sequential else
                 "edited (keep_edits): weights_copy restores the base model" if keep_edits else
                 "restored to the base model after each chunk: weights_copy is empty")
        self.last_summary = summarize(records)
        self.last_summary.update(method=self.method.name, mode=("sequential" if sequential else
                                 "batch" if chunk_size > 1 else "single"), model_state=state)
        if verbose:
            log.info("%s: %d requests, model %s", self.method.name, len(requests), state)
        return records, self.model, held


# EasyEdit's names for the same class.
Editor = BaseEditor
