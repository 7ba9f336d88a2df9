"""Second moments C = E[k kᵀ] of the keys (inputs of the rewrite module) at given layers.

ROME whitens its update with C⁻¹ and MEMIT regularises its least squares with λ·C, so both need C
for every edited layer. It is estimated from a plain-text corpus (a path, or ``model_samples``: text the model samples
itself, see ``sampled_corpus.py``) and cached on disk:

- one streamed pass over the corpus collects every layer still missing from the cache (the forward
  pass stops after the deepest of them); only the d×d float64 sums are kept, never the keys;
- ``n_tokens`` key positions are accumulated, in chunks of ``seq_len`` tokens; a BOS token the
  tokenizer prepends is fed to the model but not counted (its activations are atypical and never
  at a subject token);
- cache: ``<cache>/stats/<module>-<hash>.pt`` with ``<cache>`` = ``$MIXSD_EDIT_CACHE``, else
  ``$XDG_CACHE_HOME/mixsd_edit``, else ``~/.cache/mixsd_edit``. The file stores its full key (model
  identity, tokenizer, module, corpus sha256, n_tokens, seq_len, dtype) and a checksum of the
  matrix; a file that cannot be read, is truncated, fails the checksum or has another key is
  logged and recomputed, never used. Files are written atomically (temp file + rename).

Model identity = class, shape fields of the config and a strided sample of the input embedding.
ROME/MEMIT never edit embeddings, so the statistics of a base model stay valid — as in the papers —
while edits accumulate on it; a different model (other embeddings) gets its own statistics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mixsd_edit.methods.locate.cachefiles import model_identity, tokenizer_identity, write_atomic
from mixsd_edit.methods.locate.repr import StopForward, module_by_name
from mixsd_edit.methods.locate.sampled_corpus import MODEL_SAMPLES, sampled_corpus
from mixsd_edit.models import default_cache_root

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class StatsError(ValueError):
    """The statistics cannot be computed (missing corpus, unknown module...)."""


def check_corpus(path: str | os.PathLike) -> None:
    """Raise :class:`StatsError` now if ``path`` is neither ``model_samples`` nor an existing file."""
    if str(path) != MODEL_SAMPLES:
        resolve_corpus(path)


def resolve_corpus(path: str | os.PathLike) -> Path:
    """Expand ``~`` and ``$VARS``; a corpus that does not exist is an error raised before any work."""
    raw = str(path)
    p = Path(os.path.expandvars(os.path.expanduser(raw)))
    if "$" in str(p):
        raise StatsError(f"statistics corpus path {raw!r} uses an environment variable that is not set")
    if not p.is_file():
        raise StatsError(f"statistics corpus not found: {p} (from {raw!r}); give a plain-text file")
    return p


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[memo] = h.hexdigest()
    return _SHA_MEMO[memo]


def _matrix_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy()).hexdigest()


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / "stats" / f"{key['module'].replace('/', '_')}-{digest}.pt"


# The matrices of the latest call, so that repeated edits do not re-read and re-verify large files.
# An entry is used only while its file is unchanged (same size and mtime) and the key is equal.
_RECENT: dict[str, tuple[tuple[int, int], dict, torch.Tensor]] = {}


def _file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def load_cached(path: Path, key: dict) -> torch.Tensor | None:
    """The cached matrix, or None (absent, unreadable, truncated, corrupt or another key: logged)."""
    if not path.is_file():
        return None
    recent = _RECENT.get(str(path))
    if recent is not None and recent[0] == _file_state(path) and recent[1] == key:
        return recent[2]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        mom2 = payload["mom2"]
        if payload.get("format") != FORMAT_VERSION or payload.get("key") != key:
            log.warning("statistics cache %s was computed for another key (model/corpus/settings): %s; recomputing",
                        path, payload.get("key"))
            return None
        if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1] or _matrix_sha256(mom2) != payload["sha256"]:
            log.warning("statistics cache %s fails its checksum (corrupt); recomputing", path)
            return None
    except Exception as exc:  # noqa: BLE001 — truncated zip, garbage bytes, missing fields: all mean 'recompute'
        log.warning("statistics cache %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    return mom2


def save_atomic(path: Path, key: dict, mom2: torch.Tensor, count: int) -> None:
    payload = {"format": FORMAT_VERSION, "key": key, "count": int(count), "mom2": mom2.cpu(),
               "sha256": _matrix_sha256(mom2)}
    write_atomic(path, lambda fh: torch.save(payload, fh))


def token_chunks(tok, corpus: Path, n_tokens: int, seq_len: int) -> Iterator[tuple[list[int], int]]:
    """Stream ``(ids, n_lead)`` chunks of the corpus: at most ``seq_len`` ids each, ``n_lead``
    leading ids (a BOS) not counted; the counted ids add up to ``n_tokens`` (or the corpus end)."""
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = [probe[0]] if tok.bos_token_id is not None and probe[0] == tok.bos_token_id else []
    room = seq_len - len(bos)
    if room < 1:
        raise StatsError(f"mom2_seq_len={seq_len} leaves no room for text")
    buf: list[int] = []
    left = n_tokens
    with open(corpus, encoding="utf-8", errors="replace") as fh:
        lines: list[str] = []
        for line in fh:
            if line.strip():
                lines.append(line)
            if len(lines) < 64:
                continue
            for ids in tok(lines, add_special_tokens=False)["input_ids"]:
                buf.extend(ids)
            lines = []
            while len(buf) >= room and left > 0:
                take = min(room, left)
                yield bos + buf[:take], len(bos)
                del buf[:take]
                left -= take
            if left <= 0:
                return
        if lines:
            for ids in tok(lines, add_special_tokens=False)["input_ids"]:
                buf.extend(ids)
        while buf and left > 0:
            take = min(room, left, len(buf))
            yield bos + buf[:take], len(bos)
            del buf[:take]
            left -= take


@torch.no_grad()
def accumulate_second_moments(model, tok, module_names: Sequence[str], corpus: Path, n_tokens: int, seq_len: int,
                              *, progress: bool = True, seqs_per_batch: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """One pass over the corpus: ``({module: E[k kᵀ] float64 on CPU}, count)``."""
    from tqdm.auto import tqdm

    from mixsd_edit.prompting import pad_id_of, pad_right

    dev = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    keep_box: list[torch.Tensor] = []
    fired: set[str] = set()

    def make_hook(name):
        def hook(module, args, output):
            x = args[0][keep_box[0].to(args[0].device)].to(torch.float64)  # [kept tokens, d]
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            sums[name].addmm_(x.T, x)
            fired.add(name)
            if len(fired) == len(module_names):
                raise StopForward
        return hook

    handles = [module_by_name(model, n).register_forward_hook(make_hook(n)) for n in module_names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    count = 0
    bar = tqdm(total=n_tokens, unit="tok", desc="second moments", disable=not progress)
    try:
        batch: list[tuple[list[int], int]] = []
        for item in _with_end(token_chunks(tok, corpus, n_tokens, seq_len)):  # None marks the end
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == seqs_per_batch):
                ids, mask = pad_right([b[0] for b in batch], pad_id_of(tok))
                keep = mask.bool()
                for j, (_, lead) in enumerate(batch):
                    keep[j, :lead] = False
                keep_box[:] = [keep.to(dev)]
                fired.clear()
                try:
                    model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
                except StopForward:
                    pass
                n = int(keep.sum())
                count += n
                bar.update(n)
                batch = []
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    if count == 0:
        raise StatsError(f"statistics corpus {corpus} produced no tokens")
    if count < n_tokens:
        log.warning("corpus %s has only %d tokens; mom2_n_samples asks for %d", corpus, count, n_tokens)
    return {n: (s / count).cpu() for n, s in sums.items()}, count


def _with_end(it):
    yield from it
    yield None


def corpus_file(model, tok, corpus_path: str | os.PathLike, n_tokens: int, seq_len: int, *,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """The text file behind ``corpus_path``: the path itself, or for ``model_samples`` the cached text the
    model samples itself (sampled_corpus.py), ``n_tokens`` long in ``seq_len``-token samples."""
    if str(corpus_path) == MODEL_SAMPLES:
        # 5% more than needed: decoding the samples and re-tokenising the text can shorten them a little
        return sampled_corpus(model, tok, n_tokens + n_tokens // 20, seq_len, cache_dir=cache_dir)
    return resolve_corpus(corpus_path)


def second_moments(model, tok, module_names: Sequence[str], corpus_path: str | os.PathLike, n_tokens: int,
                   seq_len: int, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   seqs_per_batch: int = 4) -> dict[str, torch.Tensor]:
    """``{module name: E[k kᵀ]}`` (float64, CPU) of each module's input, from cache or one corpus pass.

    The tensors are shared with a small in-process cache (the latest call's): do not modify them.
    """
    corpus = corpus_file(model, tok, corpus_path, n_tokens, seq_len, cache_dir=cache_dir)
    for n in module_names:
        module_by_name(model, n)
    if n_tokens < 1 or seq_len < 2:
        raise StatsError(f"need n_tokens >= 1 and seq_len >= 2, got {n_tokens}, {seq_len}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    base = {"model": model_identity(model), "tokenizer": tokenizer_identity(tok), "corpus_sha256": file_sha256(corpus),
            "n_tokens": int(n_tokens), "seq_len": int(seq_len), "dtype": str(next(model.parameters()).dtype)}
    keys = {n: {**base, "module": n} for n in module_names}
    out: dict[str, torch.Tensor] = {}
    for n in module_names:
        cached = load_cached(cache_path(root, keys[n]), keys[n])
        if cached is not None:
            out[n] = cached
    missing = [n for n in module_names if n not in out]
    if missing:
        log.info("computing second moments for %s from %s (%d tokens)", missing, corpus, n_tokens)
        computed, count = accumulate_second_moments(model, tok, missing, corpus, n_tokens, seq_len,
                                                    progress=progress, seqs_per_batch=seqs_per_batch)
        for n in missing:
            out[n] = computed[n]
            try:
                save_atomic(cache_path(root, keys[n]), keys[n], computed[n], count)
            except OSError as exc:
                log.warning("could not write statistics cache under %s: %s", root, exc)
    _RECENT.clear()
    for n in module_names:
        path = cache_path(root, keys[n])
        if path.is_file():
            _RECENT[str(path)] = (_file_state(path), keys[n], out[n])
    return {n: out[n] for n in module_names}


def layer_second_moments(model, tok, hparams, layers: Sequence[int], **kwargs) -> dict[int, torch.Tensor]:
    """``{layer: C}`` for ``hparams.rewrite_module_tmp`` at ``layers`` (corpus, sizes from hparams)."""
    names = {l: hparams.rewrite_module_tmp.format(layer=l) for l in layers}
    got = second_moments(model, tok, list(names.values()), hparams.mom2_dataset, hparams.mom2_n_samples,
                         hparams.mom2_seq_len, **kwargs)
    return {l: got[n] for l, n in names.items()}
