"""Edit requests: one canonical form, built from EasyEdit's two call styles and validated.

Canonical request (a plain dict, the form every method's apply function receives)::

    {"prompt": str, "target_new": str, "ground_truth": str | None, "subject": str | None,
     "rephrase_prompt": list[str],
     "locality":    {name: {"prompt": list[str], "ground_truth": list[str]}},
     "portability": {name: {"prompt": list[str], "ground_truth": list[str]}},
     "case_id": <dataset id or None>}

``rephrase_prompt``, ``locality`` and ``portability`` are evaluation data: methods must not train
on them. Every error names the request index and the field, and is raised before any model work.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

EVAL_FIELDS = ("rephrase_prompt", "locality", "portability")
_KNOWN = {"prompt", "target_new", "ground_truth", "subject", "case_id", *EVAL_FIELDS}


class RequestError(ValueError):
    """An edit request is malformed. The message names the request index and the field."""


def _as_str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{where} must be a string or a list of strings, got {type(value).__name__}")
    for j, v in enumerate(value):
        if not isinstance(v, str):
            raise RequestError(f"{where}[{j}] must be a string, got {type(v).__name__}")
        if not v.strip():
            raise RequestError(f"{where}[{j}] is empty")
    return list(value)


def _qa_block(value: Any, where: str) -> dict[str, dict[str, list[str]]]:
    """Normalise a locality/portability mapping ``{name: {prompt, ground_truth}}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RequestError(f"{where} must be a mapping {{name: {{'prompt': ..., 'ground_truth': ...}}}}, got {type(value).__name__}")
    out = {}
    for name, qa in value.items():
        w = f"{where}['{name}']"
        if qa is None:
            continue
        if not isinstance(qa, Mapping) or "prompt" not in qa or "ground_truth" not in qa:
            raise RequestError(f"{w} must be a mapping with 'prompt' and 'ground_truth'")
        prompts = _as_str_list(qa["prompt"], f"{w}['prompt']")
        truths = qa["ground_truth"]
        # EasyEdit allows a list of acceptable answers per prompt; we score the first.
        if isinstance(truths, (list, tuple)) and truths and all(isinstance(t, (list, tuple)) for t in truths):
            truths = [t[0] if t else "" for t in truths]
        truths = _as_str_list(truths, f"{w}['ground_truth']")
        if len(prompts) != len(truths):
            raise RequestError(f"{w}: {len(prompts)} prompt(s) but {len(truths)} ground_truth value(s)")
        if prompts:
            out[str(name)] = {"prompt": prompts, "ground_truth": truths}
    return out


def validate_request(req: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Check one request dict and return its canonical form."""
    where = f"request {index}"
    if not isinstance(req, Mapping):
        raise RequestError(f"{where}: expected a dict, got {type(req).__name__}")
    for key in ("prompt", "target_new"):
        if key not in req or req[key] is None:
            raise RequestError(f"{where}: field '{key}' is missing")
        if not isinstance(req[key], str):
            raise RequestError(f"{where}: field '{key}' must be a string, got {type(req[key]).__name__}")
        if not req[key].strip():
            raise RequestError(f"{where}: field '{key}' is empty")
    for key in ("ground_truth", "subject"):
        v = req.get(key)
        if v is not None and not isinstance(v, str):
            raise RequestError(f"{where}: field '{key}' must be a string or None, got {type(v).__name__}")
    subject = req.get("subject") or None
    out = {
        "prompt": req["prompt"],
        "target_new": req["target_new"],
        "ground_truth": req.get("ground_truth") or None,
        "subject": subject,
        "rephrase_prompt": _as_str_list(req.get("rephrase_prompt"), f"{where}: field 'rephrase_prompt'"),
        "locality": _qa_block(req.get("locality"), f"{where}: field 'locality'"),
        "portability": _qa_block(req.get("portability"), f"{where}: field 'portability'"),
        "case_id": req.get("case_id"),
    }
    return out


def normalize_requests(requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate a list of request dicts (the call our users write) and canonicalise them."""
    if isinstance(requests, Mapping):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        raise RequestError(f"requests must be a list of dicts, got {type(requests).__name__}")
    if not requests:
        raise RequestError("requests is empty: nothing to edit")
    return [validate_request(r, i) for i, r in enumerate(requests)]


def _per_edit(value: Any, n: int, field: str) -> list[Any]:
    """Broadcast a keyword argument to one entry per edit, checking the length."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        if n != 1:
            raise RequestError(f"field '{field}': got one string for {n} edits; pass a list of {n}")
        return [value]
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"field '{field}' must be a string or a list, got {type(value).__name__}")
    if len(value) != n:
        raise RequestError(f"field '{field}' has {len(value)} entries but there are {n} prompts")
    return list(value)


def _split_qa_inputs(inputs: Any, n: int, field: str) -> list[dict[str, Any] | None]:
    """EasyEdit's ``{name: {"prompt": [per edit], "ground_truth": [per edit]}}`` -> per-edit blocks."""
    per = [dict() for _ in range(n)]
    if inputs is None:
        return [None] * n
    if not isinstance(inputs, Mapping):
        raise RequestError(f"field '{field}' must be a mapping {{name: {{'prompt': [...], 'ground_truth': [...]}}}}")
    for name, qa in inputs.items():
        if not isinstance(qa, Mapping) or "prompt" not in qa or "ground_truth" not in qa:
            raise RequestError(f"field '{field}['{name}']' must have 'prompt' and 'ground_truth'")
        prompts = _per_edit(qa["prompt"], n, f"{field}['{name}']['prompt']")
        truths = _per_edit(qa["ground_truth"], n, f"{field}['{name}']['ground_truth']")
        for i, (p, t) in enumerate(zip(prompts, truths)):
            if p is None and t is None:
                continue
            per[i][name] = {"prompt": p, "ground_truth": t}
    return per


def requests_from_keywords(prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
                           locality_inputs=None, portability_inputs=None) -> list[dict[str, Any]]:
    """Build canonical requests from EasyEdit's keyword form (``prompts=..., target_new=...``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("field 'prompts' must be a non-empty string or list of strings")
    n = len(prompts)
    targets = _per_edit(target_new, n, "target_new")
    truths = _per_edit(ground_truth, n, "ground_truth")
    subjects = _per_edit(subject, n, "subject")
    rephrase = _per_edit(rephrase_prompts, n, "rephrase_prompts")
    loc = _split_qa_inputs(locality_inputs, n, "locality_inputs")
    port = _split_qa_inputs(portability_inputs, n, "portability_inputs")
    raw = [
        {"prompt": prompts[i], "target_new": targets[i], "ground_truth": truths[i], "subject": subjects[i],
         "rephrase_prompt": rephrase[i], "locality": loc[i], "portability": port[i]}
        for i in range(n)
    ]
    return normalize_requests(raw)
