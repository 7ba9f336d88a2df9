"""Dataset files -> canonical edit requests (see :mod:`mixsd_edit.data.requests`).

Formats read:
  * ``counterfact``: CounterFact in EasyEdit form, a JSON list of ``{case_id, prompt, target_new,
    subject, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}``.
  * ``counterfact_rome``: ROME's ``counterfact.json`` (``requested_rewrite`` with a ``{}`` template).
  * ``zsre``: ZsRE in MEND/EasyEdit form (``src``, ``alt``, ``answers``, ``loc``, ``loc_ans``, ...).
  * ``requests``: a JSON list of canonical request dicts, as :func:`normalize_requests` accepts.
A ``.jsonl`` file (one record per line) is read as well as a JSON list.

``n`` and ``start`` select ``records[start:start + n]`` of the usable records, in file order;
``case_id`` always refers to the record's place in the file, so it does not depend on slicing.
The data layer imports nothing from the rest of the package but :mod:`mixsd_edit.data.requests`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from mixsd_edit.data.requests import RequestError, validate_request

logger = logging.getLogger(__name__)

FORMATS = ("counterfact", "counterfact_rome", "zsre", "requests")
SAMPLE_NAME = "sample"


class DatasetError(ValueError):
    """A dataset file is unreadable or malformed. The message names the file and the record."""


def sample_path() -> Path:
    """The hand-written CounterFact-style sample that ships with the package."""
    return Path(__file__).resolve().with_name("sample_counterfact.json")


# ----------------------------------------------------------------------------- reading
def _read_records(path: str | os.PathLike) -> tuple[Path, list[Any]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        with open(p, encoding="utf-8") as fh:
            if p.suffix == ".jsonl":
                records = [json.loads(line) for line in fh if line.strip()]
            else:
                records = json.load(fh)
    except ValueError as e:
        raise DatasetError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise DatasetError(f"{p}: expected a JSON list of records, got a {type(records).__name__}")
    return p, records


def _check_slice(n: int | None, start: int) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DatasetError(f"n must be a non-negative integer or None, got {n!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise DatasetError(f"start must be a non-negative integer, got {start!r}")


def _select(indices: list[int], n: int | None, start: int) -> list[int]:
    return indices[start:] if n is None else indices[start:start + n]


def _field(rec: Any, key: str, where: str) -> Any:
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise DatasetError(f"{where}: field '{key}' is missing")
    return rec[key]


def _first(value: Any) -> Any:
    """EasyEdit sometimes lists several acceptable answers; the first is the one scored."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _canonical(raw: dict[str, Any], index: int, path: Path) -> dict[str, Any]:
    try:
        return validate_request(raw, index)
    except RequestError as e:
        raise DatasetError(f"{path}: {e}") from None


def _convert_records(p: Path, records: list[Any], n, start, convert: Callable[[Any, str], dict[str, Any]],
                     usable=None) -> list[dict[str, Any]]:
    """Pick the usable records, slice, convert each picked record and validate it."""
    _check_slice(n, start)
    indices = [i for i, r in enumerate(records) if usable is None or usable(r)]
    out = []
    for i in _select(indices, n, start):
        raw = convert(records[i], f"{p}: record {i}")
        raw.setdefault("case_id", i)
        out.append(_canonical(raw, i, p))
    return out


# ----------------------------------------------------------------------------- CounterFact
def _counterfact_record(rec: Any, where: str) -> dict[str, Any]:
    out = {k: _field(rec, k, where) for k in ("prompt", "target_new")}
    out.update(subject=rec.get("subject"), ground_truth=_first(rec.get("ground_truth")),
               rephrase_prompt=rec.get("rephrase_prompt"))
    if "case_id" in rec:
        out["case_id"] = rec["case_id"]
    loc_prompt = rec.get("locality_prompt")
    if loc_prompt is not None:
        truth = rec.get("locality_ground_truth")
        if isinstance(loc_prompt, str):
            truth = _first(truth)
        out["locality"] = {"neighborhood": {"prompt": loc_prompt, "ground_truth": truth}}
    return out


def _counterfact(p, records, n, start):
    return _convert_records(p, records, n, start, _counterfact_record)


def load_counterfact(path: str | os.PathLike, n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """CounterFact in EasyEdit form; the locality prompt becomes ``locality['neighborhood']``."""
    return _counterfact(*_read_records(path), n, start)


def _rome_prompt_list(value: Any, where: str) -> list[str]:
    """ROME lists prompts as strings; some derived files use ``{"prompt": ...}`` objects."""
    if not isinstance(value, list):
        raise DatasetError(f"{where}: expected a list of prompts, got {type(value).__name__}")
    return [v["prompt"] if isinstance(v, Mapping) and "prompt" in v else v for v in value]


def _rome_record(rec: Any, where: str) -> dict[str, Any]:
    rw = _field(rec, "requested_rewrite", where)
    template = _field(rw, "prompt", f"{where}: requested_rewrite")
    subject = _field(rw, "subject", f"{where}: requested_rewrite")
    if not isinstance(template, str) or "{}" not in template:
        raise DatasetError(f"{where}: requested_rewrite.prompt must contain '{{}}' for the subject, got {template!r}")
    target_new = _field(_field(rw, "target_new", f"{where}: requested_rewrite"), "str", f"{where}: target_new")
    target_true = _field(_field(rw, "target_true", f"{where}: requested_rewrite"), "str", f"{where}: target_true")
    neighbours = _rome_prompt_list(rec.get("neighborhood_prompts") or [], f"{where}: neighborhood_prompts")
    out = {"prompt": template.replace("{}", subject), "target_new": target_new, "ground_truth": target_true,
           "subject": subject,
           "rephrase_prompt": _rome_prompt_list(rec.get("paraphrase_prompts") or [], f"{where}: paraphrase_prompts"),
           # Neighbourhood subjects share the TRUE object, so target_true is their answer.
           "locality": {"neighborhood": {"prompt": neighbours, "ground_truth": [target_true] * len(neighbours)}}}
    if "case_id" in rec:
        out["case_id"] = rec["case_id"]
    return out


def _counterfact_rome(p, records, n, start):
    return _convert_records(p, records, n, start, _rome_record)


def load_counterfact_rome(path: str | os.PathLike, n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """ROME's ``counterfact.json``: paraphrases -> rephrase_prompt, neighbourhood -> locality.

    The attribute and generation prompts have no place in a request; read them with
    :func:`load_counterfact_rome_extras`, which returns one entry per request, in the same order."""
    return _counterfact_rome(*_read_records(path), n, start)


def load_counterfact_rome_extras(path: str | os.PathLike, n: int | None = None,
                                 start: int = 0) -> list[dict[str, Any]]:
    """``{case_id, relation_id, attribute_prompts, generation_prompts}`` per record, aligned with
    :func:`load_counterfact_rome` called with the same ``n`` and ``start``."""
    _check_slice(n, start)
    p, records = _read_records(path)
    out = []
    for i in _select(list(range(len(records))), n, start):
        rec, where = records[i], f"{p}: record {i}"
        rw = _field(rec, "requested_rewrite", where)
        out.append({"case_id": rec.get("case_id", i), "relation_id": rw.get("relation_id"),
                    "attribute_prompts": _rome_prompt_list(rec.get("attribute_prompts") or [], where),
                    "generation_prompts": _rome_prompt_list(rec.get("generation_prompts") or [], where)})
    return out


# ----------------------------------------------------------------------------- ZsRE
def _zsre_alt(rec: Any) -> str:
    alt = rec.get("alt") if isinstance(rec, Mapping) else None
    return alt.strip() if isinstance(alt, str) else ""


def _zsre_record(rec: Any, where: str) -> dict[str, Any]:
    answers = _field(rec, "answers", where)
    out = {"prompt": _field(rec, "src", where), "target_new": _zsre_alt(rec), "subject": rec.get("subject"),
           "ground_truth": _first(answers) if isinstance(answers, list) else answers,
           "rephrase_prompt": rec.get("rephrase")}
    if rec.get("loc") is not None:
        # Kept verbatim, "nq question: " prefix included, as EasyEdit scores it.
        out["locality"] = {"nq": {"prompt": rec["loc"], "ground_truth": _first(rec.get("loc_ans"))}}
    port = rec.get("portability")
    if isinstance(port, Mapping) and port.get("New Question") and port.get("New Answer"):
        out["portability"] = {"one_hop": {"prompt": port["New Question"], "ground_truth": _first(port["New Answer"])}}
    return out


def _zsre(p, records, n, start):
    skipped = sum(1 for r in records if not _zsre_alt(r))
    if skipped:
        logger.warning("%s: skipped %d of %d ZsRE records with an empty 'alt'", p, skipped, len(records))
    padded = sum(1 for r in records if isinstance(r, Mapping) and isinstance(r.get("alt"), str)
                 and r["alt"].strip() and r["alt"] != r["alt"].strip())
    if padded:
        logger.info("%s: stripped surrounding spaces from %d 'alt' values", p, padded)
    same = sum(1 for r in records if _zsre_alt(r) and isinstance(r.get("answers"), list) and r["answers"]
               and _zsre_alt(r) == str(r["answers"][0]).strip())
    if same:  # kept, as EasyEdit keeps them; probability-comparison scores are meaningless for these
        logger.info("%s: %d records have 'alt' equal to the gold answer (edits that change nothing)", p, same)
    return _convert_records(p, records, n, start, _zsre_record, usable=lambda r: bool(_zsre_alt(r)))


def load_zsre(path: str | os.PathLike, n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """ZsRE in MEND/EasyEdit form: src -> prompt, alt -> target_new, answers[0] -> ground_truth,
    rephrase -> rephrase_prompt, loc/loc_ans -> locality['nq'], portability -> portability['one_hop'].

    Records with an empty ``alt`` are skipped (there is nothing to edit to); surrounding spaces of
    ``alt`` (15 records of the EasyEdit eval file have a leading one) are removed."""
    return _zsre(*_read_records(path), n, start)


# ----------------------------------------------------------------------------- dispatch
def _plain_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return dict(rec)


def _plain(p, records, n, start):
    return _convert_records(p, records, n, start, _plain_record)


def load_request_file(path: str | os.PathLike, n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """A JSON list of canonical request dicts (``case_id`` defaults to the record's index)."""
    return _plain(*_read_records(path), n, start)


_CONVERTERS = {"counterfact": _counterfact, "counterfact_rome": _counterfact_rome, "zsre": _zsre,
               "requests": _plain}


def detect_format(record: Any) -> str | None:
    """The format a record belongs to, judged by its keys; None when unrecognised."""
    if not isinstance(record, Mapping):
        return None
    if "requested_rewrite" in record:
        return "counterfact_rome"
    if "src" in record and "alt" in record:
        return "zsre"
    if "prompt" in record and "target_new" in record:
        if "locality_prompt" in record or isinstance(record.get("rephrase_prompt"), str):
            return "counterfact"
        return "requests"
    return None


def load_requests(path_or_name: str | os.PathLike | None = None, n: int | None = None, start: int = 0,
                  fmt: str = "auto") -> list[dict[str, Any]]:
    """Load canonical requests from a file (format detected when ``fmt="auto"``) or, for None or
    ``"sample"``, from the sample shipped with the package."""
    if fmt != "auto" and fmt not in _CONVERTERS:
        raise DatasetError(f"unknown dataset format '{fmt}'; choose 'auto' or one of {list(FORMATS)}")
    if path_or_name is None or path_or_name == SAMPLE_NAME:
        return load_counterfact(sample_path(), n=n, start=start)
    _check_slice(n, start)
    if not Path(path_or_name).expanduser().exists():
        raise FileNotFoundError(f"dataset file not found: {path_or_name} (pass a path to a JSON or JSONL file, "
                                f"or '{SAMPLE_NAME}' for the shipped sample)")
    p, records = _read_records(path_or_name)
    if fmt == "auto":
        if not records:
            raise DatasetError(f"{p}: the file holds no records")
        fmt = detect_format(records[0])
        if fmt is None:
            keys = sorted(records[0]) if isinstance(records[0], Mapping) else type(records[0]).__name__
            raise DatasetError(
                f"{p}: unrecognised dataset format (first record has keys {keys}); expected CounterFact "
                f"(prompt, target_new, locality_prompt...), ROME CounterFact (requested_rewrite), ZsRE (src, alt, "
                f"answers...) or canonical requests; pass fmt= one of {list(FORMATS)}")
        logger.info("%s: detected format '%s'", p, fmt)
    return _CONVERTERS[fmt](p, records, n, start)


def load_sample(n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """The shipped hand-written sample as canonical requests."""
    return load_counterfact(sample_path(), n=n, start=start)
