"""MixSD as an EasyEdit method: write mixed targets with the frozen model, then fine-tune on them."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.stats import check_corpus, corpus_file, second_moments
from mixsd_edit.methods.mixsd.hparams import MixSDHyperParams
from mixsd_edit.methods.mixsd.key_delta import (KeyDirectedDelta, PastEditKeys, key_directions,
                                                subject_key_positions, subject_keys, swapped_subject_moments)
from mixsd_edit.methods.mixsd.prefixes import context_prefixes, prefixed_requests
from mixsd_edit.methods.mixsd.preserve import PreservationKL
from mixsd_edit.methods.mixsd.swaps import entity_names
from mixsd_edit.methods.mixsd.targets import MixedTarget, build_mixed_targets
from mixsd_edit.prompting import PromptFormat, pad_id_of
from mixsd_edit.training import Example, LossFn, TrainConfig, TrainReport, target_nll_loss, train_nll
from mixsd_edit.weights import EditTransaction, begin_edit, select_parameters

log = logging.getLogger(__name__)


def num_train_steps(hp: MixSDHyperParams, n_examples: int) -> int:
    """``num_steps``, raised so that a batch of many edits still sees each target ``min_epochs`` times."""
    bs = max(1, min(hp.train_batch_size, n_examples))
    return max(hp.num_steps, math.ceil(hp.min_epochs * n_examples / bs)) if n_examples else 0


def train_config(hp: MixSDHyperParams, n_examples: int = 1) -> TrainConfig:
    return TrainConfig(lr=hp.lr, num_steps=num_train_steps(hp, n_examples), train_batch_size=hp.train_batch_size,
                       weight_decay=hp.weight_decay, adam_beta1=hp.adam_beta1, adam_beta2=hp.adam_beta2,
                       grad_clip=hp.grad_clip, norm_constraint=hp.norm_constraint,
                       early_stop_loss=hp.early_stop_loss, seed=hp.seed)


def execute_mixsd(model, tok, requests: list[dict], hp: MixSDHyperParams, params: dict, *,
                  progress: bool = False, past_keys: PastEditKeys | None = None,
                  keys_out: dict | None = None) -> tuple[list[MixedTarget], TrainReport]:
    """Targets from the model as it is, then train ``params`` in place (the caller restores on error).
    ``key_rank_one``: ``past_keys`` (with ``past_edit_key_weight`` > 0) steers the directions away from
    earlier edits' subject keys; this call's subject keys are put in ``keys_out`` when given (and the
    weight is > 0: nothing else reads them)."""
    targets = build_mixed_targets(model, tok, requests, hp, progress=progress)
    owners = [i for i, t in enumerate(targets) if t.target_ids]
    examples = [(targets[i].context_ids, targets[i].target_ids) for i in owners]
    # the key-statistics text (read once): where the context prefixes and the swapped names come from
    text = key_stats_text(model, tok, hp) if hp.context_prefixes > 0 or hp.subject_key_names > 0 else None
    prefixes = (context_prefixes(text, hp.context_prefixes, hp.context_prefix_words, hp.seed)
                if hp.context_prefixes > 0 else [])
    if prefixes:  # each target also after every opening (same target ids: the model continues the same text)
        fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
        copies = prefixed_requests([requests[i] for i in owners], prefixes)
        copy_owners = [i for i in owners for _ in prefixes]
        examples += [(fmt.context_ids(tok, hp.naive_text(c)), targets[i].target_ids) for c, i in zip(copies, copy_owners)]
        owners += copy_owners
    cfg = train_config(hp, len(examples))
    warn_partial_batches(hp, len(set(owners)), len(examples), cfg)
    preserve = PreservationKL(model, tok, hp, requests) if hp.preserve_weight > 0 and examples else None
    if hp.delta == "full":
        loss_fn = mixsd_loss(preserve, hp.preserve_weight)
        report = train_nll(model, params, examples, cfg, pad_id_of(tok), progress=progress, loss_fn=loss_fn)
        return record_updates(targets, owners, report), report
    # key_rank_one: train one vector per request and matrix, then write U Vᵀ into the weights
    modules = [n[: -len(".weight")] for n in params]
    keys = edit_subject_keys(model, tok, requests, hp, modules, prefixes)
    covs = edit_key_covariances(model, tok, hp, modules, requests, text)
    covs = with_batch_keys(with_past_edit_keys(covs, keys, hp, past_keys), keys, hp)
    if keys_out is not None and hp.past_edit_key_weight > 0:
        keys_out.update(keys)
    delta = KeyDirectedDelta(model, {m: key_directions(keys[m], covs.get(m), hp.exclude_batch_mean) for m in modules})
    owner_of = {id(ex): i for ex, i in zip(examples, owners)} if hp.isolate_requests else None
    loss_fn = mixsd_loss(preserve, hp.preserve_weight, delta, owner_of, hp.delta_l2)
    with delta.attached():
        report = train_nll(model, delta.params, examples, cfg, pad_id_of(tok), progress=progress, loss_fn=loss_fn)
    delta.write_into_weights()
    return record_updates(targets, owners, report), report


def record_updates(targets: list[MixedTarget], owners: list[int], report: TrainReport) -> list[MixedTarget]:
    """Set each trained target's ``train_updates``: the steps whose minibatch held its bare example (the
    first example of each owner; context-prefixed copies come later). With more examples than
    ``train_batch_size`` a request is trained in only part of the steps, which the metadata shows."""
    seen: set[int] = set()
    for owner, n in zip(owners, report.updates):
        if owner not in seen:
            seen.add(owner)
            targets[owner].train_updates = n
    return targets


def warn_partial_batches(hp: MixSDHyperParams, n_requests: int, n_examples: int, cfg: TrainConfig) -> None:
    """``delta: key_rank_one`` with a batch larger than ``train_batch_size``: each request's own vectors get
    their target's gradient in only about bs/n of the steps, so it is trained less than in a smaller batch
    (``full`` fine-tunes shared matrices, where minibatches are the design and ``min_epochs`` covers them).
    Logged; the per-request ``train_updates`` metadata has the counts."""
    if hp.delta == "key_rank_one" and n_examples > hp.train_batch_size and cfg.num_steps > 0:
        share = hp.train_batch_size / n_examples
        log.warning("MixSD: %d training examples (%d requests) > train_batch_size %d: each target is in about "
                    "%.0f%% of the %d steps (~%.0f updates); raise train_batch_size to train every request in "
                    "every step (more steps via min_epochs gave efficacy back but cost locality: BENCHMARKS.md §24)",
                    n_examples, n_requests, hp.train_batch_size, 100 * share, cfg.num_steps, share * cfg.num_steps)


def mixsd_loss(preserve: PreservationKL | None, weight: float, delta: KeyDirectedDelta | None = None,
               owner_of: dict[int, int] | None = None, l2: float = 0.0) -> LossFn:
    """NLL of the mixed targets (with ``owner_of``: each example's row sees only its own request's
    key-directed change), plus ``weight`` x the preservation KL (with every change switched on), plus
    ``l2`` x the mean squared size of the requests' changes (:meth:`KeyDirectedDelta.mean_sq_norm`)."""
    def loss(model, batch: Sequence[Example], pad_id: int, device):
        if owner_of is None:
            nll = target_nll_loss(model, batch, pad_id, device)
        else:
            with delta.only_own_request([owner_of[id(ex)] for ex in batch]):
                nll = target_nll_loss(model, batch, pad_id, device)
        total = nll if preserve is None else nll + weight * preserve(model)
        return total + l2 * delta.mean_sq_norm() if l2 > 0 else total
    return loss


def key_stats_text(model, tok, hp: MixSDHyperParams) -> str:
    """The text behind ``key_stats_dataset`` (the sampled corpus is the same file the key statistics and the
    preservation term read), where the swapped names and the context prefixes come from."""
    n_sample = max(hp.key_stats_n_tokens, hp.preserve_n_tokens)
    corpus = corpus_file(model, tok, hp.key_stats_dataset, n_sample, hp.key_stats_seq_len)
    return corpus.read_text(encoding="utf-8", errors="replace")


def edit_subject_keys(model, tok, requests: Sequence[dict], hp: MixSDHyperParams, modules: list[str],
                      prefixes: Sequence[str]) -> dict:
    """:func:`subject_keys`; with prefixes and ``context_prefix_key: mean``, each request's key is the mean
    over its bare context and its prefixed ones (as ROME averages its key over prefixed contexts); with
    ``bare`` the prefixed copies are trained on but the direction is the bare prompt's key."""
    keys = subject_keys(model, tok, requests, hp, modules)
    if not prefixes or hp.context_prefix_key == "bare":
        return keys
    more = subject_keys(model, tok, prefixed_requests(requests, prefixes), hp, modules)
    n, k = len(requests), len(prefixes)
    return {m: (keys[m] + more[m].view(n, k, -1).sum(1)) / (k + 1) for m in modules}


def edit_key_covariances(model, tok, hp: MixSDHyperParams, modules: list[str], requests: Sequence[dict],
                         text: str | None = None) -> dict:
    """:func:`key_covariances`, plus ``subject_key_weight`` x the second moments of other names' keys in
    the requests' prompts when ``subject_key_names`` > 0 (new tensors; the cached ones are not touched).
    The names come from ``text`` (default: :func:`key_stats_text`)."""
    covs = key_covariances(model, tok, hp, modules)
    if hp.subject_key_names <= 0:
        return covs
    names = entity_names(text if text is not None else key_stats_text(model, tok, hp))
    extra = swapped_subject_moments(model, tok, requests, hp, modules, names)
    return {m: covs[m] + hp.subject_key_weight * extra[m].to(covs[m].dtype) for m in modules}


def plus_key_moments(covs: dict, modules, weight: float, held: dict) -> dict:
    """``C + weight x Kᵀ K`` for each of ``modules`` that ``held`` has keys for (``K`` [n, in], keys as
    rows; ``C`` = identity where there are no key statistics). New tensors: the cached ``C`` are not touched."""
    out = dict(covs)
    for m in modules:
        K = held.get(m)
        if K is None:
            continue
        C = covs.get(m)
        if C is None:
            C = torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
        K = K.to(C.device, C.dtype)
        out[m] = C + weight * (K.T @ K)
    return out


def with_past_edit_keys(covs: dict, keys: dict, hp: MixSDHyperParams, past_keys: PastEditKeys | None) -> dict:
    """``C + past_edit_key_weight x Σ_j k_j k_jᵀ`` over the earlier edits' subject keys (``C`` = identity
    where there are no key statistics); ``covs`` unchanged when the weight is 0 or nothing was edited yet."""
    if hp.past_edit_key_weight <= 0 or past_keys is None or past_keys.count == 0:
        return covs
    return plus_key_moments(covs, keys, hp.past_edit_key_weight, past_keys.keys)


def batch_keys_avoided(hp: MixSDHyperParams, n_requests: int) -> int:
    """How many other requests' subject keys each direction of a call avoids (:func:`with_batch_keys`; the
    per-request metadata ``batch_keys_avoided``): 0 when the weight is 0 or the call has one request."""
    return n_requests - 1 if hp.batch_key_weight > 0 else 0


def with_batch_keys(covs: dict, keys: dict, hp: MixSDHyperParams) -> dict:
    """``C + batch_key_weight x Σ_j k_j k_jᵀ`` over this call's subject keys (``C`` = identity where there
    are no key statistics), so that request ``i``'s direction reaches the other requests' subjects
    less. The sum includes ``k_i`` itself: by Sherman-Morrison ``(A + w kᵢkᵢᵀ)⁻¹kᵢ`` is parallel to
    ``A⁻¹kᵢ``, so after the normalisation ``vᵢᵀkᵢ = 1`` each direction equals the one built from the
    *other* requests' keys alone, with one matrix for the whole batch (``exclude_batch_mean``'s
    projection then works in this matrix's metric, own key included). ``covs`` unchanged when the
    weight is 0 or the call has one request (then the term would not change the direction)."""
    if batch_keys_avoided(hp, next(iter(keys.values())).shape[0]) == 0:
        return covs
    return plus_key_moments(covs, keys, hp.batch_key_weight, keys)


def key_covariances(model, tok, hp: MixSDHyperParams, modules: list[str]) -> dict:
    """``{module: C}`` from ``key_stats_dataset`` (a text file, or ``model_samples``: text the model
    samples itself; cached on disk like ROME's), or ``{}`` (identity)."""
    if hp.key_stats_dataset is None:
        return {}
    return second_moments(model, tok, modules, hp.key_stats_dataset, hp.key_stats_n_tokens, hp.key_stats_seq_len,
                          progress=False)


_warned_no_past_keys = False


def past_keys_protected(hp: MixSDHyperParams, past_keys: PastEditKeys | None, n_past: int) -> int | None:
    """The per-request metadata ``past_edit_keys_protected``: how many earlier edits' keys this call avoided;
    None when ``past_edit_key_weight`` asks for it but the caller passed no ``past_edit_keys`` (logged once:
    right for single edits, but a sequence run by the caller's own loop then protects nothing; the EasyEdit
    adapter passes them)."""
    global _warned_no_past_keys
    if hp.past_edit_key_weight <= 0:  # (> 0 is only valid with delta key_rank_one)
        return 0
    if past_keys is None:
        if not _warned_no_past_keys:
            _warned_no_past_keys = True
            log.warning("MixSD: past_edit_key_weight %g but no past_edit_keys passed, so earlier edits are not "
                        "protected (the editor's sequential_edit and the EasyEdit adapter pass them; in your own "
                        "loop pass the same PastEditKeys() to every call)", hp.past_edit_key_weight)
        return None
    return n_past


def check_mixsd_inputs(model, tok, requests, hparams: MixSDHyperParams, **kwargs) -> list[dict]:
    """Everything MixSD refuses, checked without model work: hparams type, request fields (errors
    name the request index), parameter patterns. Returns the canonical requests. The editor calls it
    on all requests of a call."""
    if not isinstance(hparams, MixSDHyperParams):
        raise TypeError(f"apply_mixsd_to_model needs MixSDHyperParams, got {type(hparams).__name__}")
    requests = normalize_requests(requests)
    params = select_parameters(model, hparams.trainable_params, hparams.layers)
    if hparams.preserve_weight > 0:
        check_corpus(hparams.preserve_dataset)
    if hparams.delta == "key_rank_one":
        for name, p in params.items():
            if not name.endswith(".weight") or p.dim() != 2:
                raise ValueError(f"MixSD delta 'key_rank_one' trains Linear weights only; trainable_params matched {name!r}")
    if hparams.key_stats_dataset is not None and (hparams.delta == "key_rank_one" or hparams.context_prefixes > 0):
        check_corpus(hparams.key_stats_dataset)  # a missing corpus fails before any model work
    if hparams.delta == "key_rank_one" or hparams.preserve_swaps > 0:
        subject_key_positions(tok, requests, hparams)  # every request's subject occurs in its naive context
    return requests


def apply_mixsd_to_model(model, tok, requests: list[dict], hparams: MixSDHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any):
    """EasyEdit contract -> (edited model, weights_copy).

    The mixed targets of all requests are written first by the unedited model, then the requests are
    trained jointly. Only ``prompt``/``target_new``/``subject`` are read; rephrase, locality and
    portability fields are evaluation data and never reach training. ``weights_copy`` holds the
    original value of every trainable parameter when ``return_orig_weights`` or
    ``keep_original_weight`` is set (EasyEdit ignores the latter; we treat it as "I need the
    originals back"). On any error the model is restored bit-exactly before the error propagates.

    Per-request MixSD metadata (target text, realised naive fraction, attempts, fallback, and with
    ``key_rank_one`` how many earlier edits' and other requests' subject keys the change avoided:
    ``past_edit_keys_protected``, ``batch_keys_avoided``) is appended to the list passed as
    ``metadata_out`` if given.

    ``past_edit_keys`` (a :class:`PastEditKeys`, one per sequence of calls; the editor passes a new
    one to every ``sequential_edit``): with ``past_edit_key_weight`` > 0 and ``delta: key_rank_one``
    this call's change avoids the subject keys of the edits made before it, and its own keys are
    added once the call succeeded.
    """
    requests = check_mixsd_inputs(model, tok, requests, hparams)
    metadata_out = kwargs.get("metadata_out")
    progress = bool(kwargs.get("progress", False))
    past_keys = kwargs.get("past_edit_keys")
    if past_keys is not None and not isinstance(past_keys, PastEditKeys):
        raise TypeError(f"past_edit_keys must be a PastEditKeys, got {type(past_keys).__name__}")
    n_past = past_keys.count if past_keys is not None else 0
    model = begin_edit(model, copy)
    params = select_parameters(model, hparams.trainable_params, hparams.layers)
    new_keys: dict = {}
    with EditTransaction(model, params) as tx:
        targets, report = execute_mixsd(model, tok, requests, hparams, params, progress=progress,
                                        past_keys=past_keys, keys_out=new_keys)
    if past_keys is not None and new_keys:
        past_keys.add(new_keys)
    protected = past_keys_protected(hparams, past_keys, n_past)
    if metadata_out is not None:
        for t in targets:
            meta = t.metadata()
            meta.update(train_steps=report.steps, train_loss_first=report.first_loss,
                        train_loss_final=report.final_loss, past_edit_keys_protected=protected,
                        batch_keys_avoided=batch_keys_avoided(hparams, len(requests)))
            metadata_out.append(meta)
    return model, tx.result(return_orig_weights, keep_original_weight)
