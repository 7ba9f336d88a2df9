"""Key-directed weight change for MixSD (hparam ``delta: key_rank_one``).

With ``delta: full`` MixSD fine-tunes whole matrices, and a change ``ΔW`` of a projection acts on
every input ``k`` the layer ever sees — which is how a single CounterFact edit ends up changing the
answers for neighbouring subjects (low locality). ``key_rank_one`` keeps MixSD's targets and NLL
objective but restricts what can change, the way locate-then-edit methods do: for each trained
Linear ``W`` (``out × in``) and request ``i``, ``ΔW = Σᵢ uᵢ vᵢᵀ`` where

- ``kᵢ`` is the layer's input at the last token of the request's subject, in the naive context the
  model is trained on;
- ``vᵢ = C⁻¹ kᵢ / (kᵢᵀ C⁻¹ kᵢ)`` is fixed (``C = E[k kᵀ]`` on a text corpus, the second moments
  ROME/MEMIT use, or the identity when ``key_stats_dataset`` is null), so ``vᵢᵀ kᵢ = 1`` while
  ``vᵢᵀ k`` is small for keys that are typical of ordinary text;
- only the ``uᵢ`` (``out``-vectors, starting at zero) are trained, by the same loop, loss and
  optimiser as ``full``.

With ``isolate_requests`` each ``uᵢ`` is trained on request ``i``'s target only (the other requests'
changes are switched off on that example's row), so a batch of edits is the sum of the edits each
request would make alone. It is an ablation: subject keys share a large common component, so every
request's key also carries the others' changes; joint training compensates for that on the batch's
own subjects, and without it a batch of 100 collapses (BENCHMARKS.md §12).

``subject_key_names: k`` (with ``subject_key_weight: w``) whitens that common component away in
closed form: per request, k copies of its prompt with the subject swapped for a name taken from the
key-statistics text (:mod:`~mixsd_edit.methods.mixsd.swaps`) give keys ``h`` at the name's last token,
and the directions use ``C + w·E[h hᵀ]`` instead of ``C`` — MEMIT's "keep these keys' outputs" term,
with the keys of other subjects in the same prompts instead of ordinary text. A neighbour's key then
reaches less of each change (``benchmarks/subject_overlap.py`` measures it).

``past_edit_key_weight: w`` protects the edits already made in a sequence: :class:`PastEditKeys`
(one per sequence; the editor makes it for ``sequential_edit``) keeps the subject keys ``k_j`` of the
edits applied so far, and the directions use ``C + w·Σ_j k_j k_jᵀ``. With ``C`` a
mean over corpus tokens, ``k_jᵀ C⁻¹ k_j`` is of the order of the key size, so already ``w = 1`` shrinks
``vᵀ k_j`` (how much a new change reaches an earlier subject) about that many times: the new edit
writes into the part of key space the earlier subjects do not use (AlphaEdit's null-space idea, for
the earlier edits' keys only, in closed form).

``batch_key_weight: w`` does the same inside one call: the directions use ``C + w·Σ_j k_j k_jᵀ`` over
the subject keys of the call's own requests, so request ``i``'s change reaches the other requests'
subjects less (MEMIT's joint solve keeps the batch's keys for the same reason). One matrix serves the
whole batch: with ``k_i`` itself in the sum, ``vᵢ`` after normalisation is the direction built from the
other requests' keys alone (``apply.with_batch_keys``).

During training the change is applied by forward hooks (``y = W k + U (Vᵀ k)``); afterwards it is
written into ``W`` once. The caller's :class:`~mixsd_edit.weights.EditTransaction` holds ``W``'s
original value, so restore stays bit-exact.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from mixsd_edit.data.requests import RequestError
from mixsd_edit.methods.locate.repr import capture_at_positions, encode_with_lookup, module_by_name
from mixsd_edit.methods.mixsd.swaps import swap_pairs
from mixsd_edit.prompting import PromptFormat, pad_id_of


def subject_key_positions(tok, requests: Sequence[dict], hp) -> tuple[list[list[int]], list[int]]:
    """-> (naive context ids, position of the subject's last token) per request. The ids equal those
    MixSD trains on (``PromptFormat.context_ids``). Errors name the request."""
    fmt = PromptFormat(hp.use_chat_template, hp.system_prompt)
    seqs, positions = [], []
    for i, r in enumerate(requests):
        subject = r.get("subject")
        if not subject:
            raise RequestError(f"request {i}: field 'subject' is missing (MixSD with delta 'key_rank_one' "
                               "or preserve_swaps needs it)")
        naive = hp.naive_text(r)
        text = fmt.context(tok, naive)
        start = text.rfind(subject)
        if start < 0:
            raise RequestError(f"request {i}: subject {subject!r} does not occur in the naive context {naive!r}")
        try:
            ids, pos = encode_with_lookup(tok, text, (start, start + len(subject)), "subject_last",
                                          add_special_tokens=not hp.use_chat_template)
        except ValueError as exc:
            raise RequestError(f"request {i}: {exc}") from None
        seqs.append(ids)
        positions.append(pos)
    return seqs, positions


@torch.no_grad()
def subject_keys(model, tok, requests: Sequence[dict], hp, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{module: [n_requests, in]}`` float32 inputs of each module at each request's subject token."""
    seqs, positions = subject_key_positions(tok, requests, hp)
    got = capture_at_positions(model, seqs, positions, pad_id_of(tok), inputs_of=list(modules))
    return {m: got[("in", m)] for m in modules}


def name_swapped_requests(requests: Sequence[dict], names: Sequence[str], k: int, seed: int) -> list[dict]:
    """Per request, ``k`` requests whose prompt has the subject swapped for a name (seeded), with that
    name as the subject: their subject keys are other subjects' keys in the same contexts."""
    pairs = swap_pairs([r["prompt"] for r in requests], [r["subject"] for r in requests], names, k, seed,
                       what="subject_key_names")
    owners = [r for r in requests for _ in range(k)]
    return [{"prompt": text, "subject": name, "target_new": r["target_new"]} for (text, name), r in zip(pairs, owners)]


@torch.no_grad()
def swapped_subject_moments(model, tok, requests: Sequence[dict], hp, modules: Sequence[str],
                            names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{module: E[h hᵀ]}`` (float64) over the keys ``h`` of ``hp.subject_key_names`` name-swapped copies
    of each request's prompt (seed ``hp.seed + 1``, so not the names ``preserve_swaps`` draws)."""
    swapped = name_swapped_requests(requests, names, hp.subject_key_names, hp.seed + 1)
    keys = subject_keys(model, tok, swapped, hp, modules)
    return {m: (h.double().T @ h.double()) / h.shape[0] for m, h in keys.items()}


def key_directions(keys: torch.Tensor, cov: torch.Tensor | None, exclude_batch_mean: bool = False) -> torch.Tensor:
    """``V`` [in, n] with column ``i`` = ``C⁻¹ kᵢ / (kᵢᵀ C⁻¹ kᵢ)`` (``C`` = identity when None).

    ``exclude_batch_mean`` (n ≥ 2): the numerator becomes ``C⁻¹`` of the part of ``kᵢ`` orthogonal (in
    the ``C⁻¹`` metric) to ``μᵢ``, the mean key of the *other* requests, so ``vᵢᵀ μᵢ = 0`` while still
    ``vᵢᵀ kᵢ = 1``. Subject keys share a large common component that ordinary text does not whiten
    away; without this, every subject (the batch's and any other) sees the sum of all the batch's
    changes along it (BENCHMARKS.md §12). It is the limit of adding ``a μᵢ μᵢᵀ`` to ``C`` as a → ∞."""
    K = keys.double()
    singular = ("key directions: the key statistics C are singular (fewer corpus tokens than the "
                f"{K.shape[1]} key dimensions?); raise key_stats_n_tokens or use a larger corpus")
    if cov is None:
        CK = K.T  # [in, n]
    else:
        C = cov.to(K.device, torch.float64)
        try:
            CK = torch.linalg.solve(C, K.T)
        except torch.linalg.LinAlgError:
            raise ValueError(singular) from None
        # a numerically singular C gives a finite but wrong solve: its residual shows it
        if not torch.isfinite(CK).all() or (C @ CK - K.T).norm() > 1e-6 * K.norm():
            raise ValueError(singular)
    n = K.shape[0]
    if exclude_batch_mean and n >= 2:
        C_mu = (CK.sum(1, keepdim=True) - CK) / (n - 1)        # [in, n]: C⁻¹ μᵢ
        mu = (K.sum(0, keepdim=True) - K) / (n - 1)            # [n, in]: μᵢ
        coef = (mu * CK.T).sum(-1) / (mu * C_mu.T).sum(-1).clamp(min=1e-12)
        CK = CK - C_mu * coef
    return (CK / (K * CK.T).sum(-1).clamp(min=1e-12)).float()


class KeyDirectedDelta:
    """Trainable ``U`` [out, n] per module with fixed ``V`` [in, n]; ``ΔW = U Vᵀ``."""

    def __init__(self, model, directions: Mapping[str, torch.Tensor]):
        self.modules = {m: module_by_name(model, m) for m in directions}
        self.V = {}
        self.U: dict[str, torch.nn.Parameter] = {}
        for m, V in directions.items():
            W = self.modules[m].weight
            if V.shape[0] != W.shape[1]:
                raise ValueError(f"{m}: key size {V.shape[0]} != input size {W.shape[1]}")
            self.V[m] = V.to(W.device)
            self.U[m] = torch.nn.Parameter(torch.zeros(W.shape[0], V.shape[1], device=W.device))
        self._rows: torch.Tensor | None = None  # [B, n] 0/1: which requests' vectors act on which batch row

    @contextmanager
    def only_own_request(self, owners: Sequence[int]) -> Iterator[None]:
        """Inside, batch row ``b`` sees only request ``owners[b]``'s change (``isolate_requests``); outside,
        every row sees all of them, as the written weights will."""
        n = next(iter(self.V.values())).shape[1]
        dev = next(iter(self.V.values())).device
        rows = torch.zeros(len(owners), n, device=dev)
        rows[torch.arange(len(owners)), torch.as_tensor(list(owners), dtype=torch.long)] = 1.0
        self._rows = rows
        try:
            yield
        finally:
            self._rows = None

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{m}.delta_U": u for m, u in self.U.items()}

    def mean_sq_norm(self) -> torch.Tensor:
        """Mean over requests of ``Σ_modules |uᵢ|²`` (the size of each request's change; what
        ``delta_l2`` penalises). Since ``vᵢᵀkᵢ = 1``, ``|uᵢ|`` is how far the subject's output moves, and
        any other key ``h`` moves by ``(vᵢᵀh)·|uᵢ|``."""
        n = next(iter(self.U.values())).shape[1]
        return sum((u ** 2).sum() for u in self.U.values()) / n

    @contextmanager
    def attached(self) -> Iterator[None]:
        def make_hook(m):
            def hook(module, args, output):
                z = args[0].float() @ self.V[m]  # [B, T, n]: how much each request's key is present
                if self._rows is not None:
                    z = z * self._rows[:, None, :]
                return output + (z @ self.U[m].T).to(output.dtype)
            return hook

        handles = [mod.register_forward_hook(make_hook(m)) for m, mod in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def write_into_weights(self) -> None:
        for m, mod in self.modules.items():
            W = mod.weight
            W.add_((self.U[m].detach() @ self.V[m].T).to(W.dtype))


class PastEditKeys:
    """The subject keys of the edits already applied in one sequence (``{module: K}``, ``K`` [n, in],
    float32 on the CPU: n x in numbers per module, far less than a d x d moment for the sequences edited in
    practice). :func:`~mixsd_edit.methods.mixsd.apply.apply_mixsd_to_model` reads them and
    adds the call's keys after the call succeeded (only with ``past_edit_key_weight`` > 0), so a failed
    edit leaves them as they were. Keys are taken on the model as it was when each edit was made."""

    def __init__(self) -> None:
        self.keys: dict[str, torch.Tensor] = {}

    @property
    def count(self) -> int:
        """How many edits' keys are held (every module holds one row per edit)."""
        return next(iter(self.keys.values())).shape[0] if self.keys else 0

    def add(self, keys: Mapping[str, torch.Tensor]) -> None:
        for m, K in keys.items():
            K = K.detach().to("cpu", torch.float32)
            self.keys[m] = torch.cat([self.keys[m], K]) if m in self.keys else K.clone()
