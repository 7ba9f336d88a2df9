"""Which method variants a benchmark runs: ``--methods``, ``--set`` and ``--sweep-lambda`` parsed.

A ``--methods`` entry is ``NAME`` (a registered method with its shipped hparams) or
``LABEL=NAME:key=value;key=value`` (a variant with hparams overrides, values read as YAML), e.g.
``MixSD,MixSD-l0=MixSD:mix_lambda=0.0,FT-M:layers=[3,4]``. Commas inside brackets or quotes do not
split entries. The label names the row of the table and the folder ``cases/<label>/``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import yaml

SWEEP_METHOD, SWEEP_PARAM = "MixSD", "mix_lambda"
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class SpecError(ValueError):
    """A --methods / --set / --sweep-lambda value is malformed; the message names the entry."""


@dataclass(frozen=True)
class MethodSpec:
    label: str                                   # row name and folder name
    name: str                                    # registered method (alg_name)
    overrides: dict[str, Any] = field(default_factory=dict)  # hparams changes of this variant
    sweep: dict[str, Any] | None = None          # {"param": "mix_lambda", "value": λ} for sweep points


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces, parentheses and quotes; drop empty pieces."""
    parts, buf, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def parse_assignments(items: Iterable[str], where: str) -> dict[str, Any]:
    """``key=value`` strings -> {key: YAML value}."""
    out: dict[str, Any] = {}
    for it in items:
        key, eq, value = it.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"{where}: expected key=value, got '{it}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SpecError(f"{where}: value of '{key.strip()}' is not valid YAML: {value!r} ({e})") from None
    return out


def parse_method_entry(entry: str) -> MethodSpec:
    """``NAME`` | ``NAME:k=v;k=v`` | ``LABEL=NAME`` | ``LABEL=NAME:k=v;k=v``."""
    text = entry.strip()
    label = None
    eq, colon = text.find("="), text.find(":")
    if eq != -1 and (colon == -1 or eq < colon):
        label, text = text[:eq].strip(), text[eq + 1:].strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise SpecError(f"--methods entry '{entry}': no method name")
    overrides = parse_assignments(split_top_level(rest, ";"), f"--methods entry '{entry}'")
    if label is None:
        if overrides:
            raise SpecError(f"--methods entry '{entry}' overrides hparams, so it needs a label: "
                            f"LABEL={entry.strip()}")
        label = name
    if not _LABEL_RE.match(label):
        raise SpecError(f"--methods entry '{entry}': label '{label}' must be letters, digits, '.', '_', '+' "
                        f"or '-' (it names a folder)")
    return MethodSpec(label, name, overrides)


def parse_methods(text: str, registered: Sequence[str] | None = None) -> list[MethodSpec]:
    """Parse a --methods value; with ``registered`` given, unknown names are an error naming them."""
    specs = [parse_method_entry(e) for e in split_top_level(text, ",")]
    if not specs:
        raise SpecError("--methods is empty")
    if registered is not None:
        for s in specs:
            if s.name not in registered:
                raise SpecError(f"unknown method '{s.name}' in --methods; registered methods: {sorted(registered)}")
    check_unique(specs)
    return specs


def check_unique(specs: Sequence[MethodSpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.label in seen:
            raise SpecError(f"label '{s.label}' appears twice in --methods; give variants distinct labels "
                            f"(LABEL=NAME:key=value)")
        seen.add(s.label)


def parse_floats(text: str, where: str) -> list[float]:
    try:
        return [float(x) for x in split_top_level(text, ",")]
    except ValueError:
        raise SpecError(f"{where}: expected comma-separated numbers, got '{text}'") from None


def sweep_label(base: str, value: float) -> str:
    return f"{base}-lam{value:g}"


def expand_lambda_sweep(specs: Sequence[MethodSpec], lambdas: Sequence[float]) -> list[MethodSpec]:
    """Replace every MixSD entry that does not fix ``mix_lambda`` by one variant per λ (labels
    ``<label>-lam<λ>``); without such an entry the sweep variants come first."""
    if not lambdas:
        return list(specs)
    out: list[MethodSpec] = []
    expanded = False
    for s in specs:
        if s.name == SWEEP_METHOD and SWEEP_PARAM not in s.overrides:
            expanded = True
            out += [MethodSpec(sweep_label(s.label, lam), s.name, {**s.overrides, SWEEP_PARAM: lam},
                               {"param": SWEEP_PARAM, "value": lam}) for lam in lambdas]
        else:
            out.append(s)
    if not expanded:
        out = [MethodSpec(sweep_label(SWEEP_METHOD, lam), SWEEP_METHOD, {SWEEP_PARAM: lam},
                          {"param": SWEEP_PARAM, "value": lam}) for lam in lambdas] + out
    check_unique(out)
    return out


def effective_overrides(spec: MethodSpec, hparams_cls: type, global_set: dict[str, Any]) -> dict[str, Any]:
    """``--set`` values the method's hparams declare, then the entry's own overrides (which win)."""
    fields = {f.name for f in dataclasses.fields(hparams_cls)}
    return {**{k: v for k, v in global_set.items() if k in fields}, **spec.overrides}


def with_overrides(hp, overrides: dict[str, Any], source: str | None = None):
    """``hp`` with ``overrides`` applied through the loader (YAML strings such as ``3e-2`` coerced and every
    field validated, as for a YAML file); a YAML variant equals its default ``with_overrides`` of the variant's keys."""
    return type(hp).from_dict({**hp.to_dict(), **overrides}, source=source)


def check_global_set(global_set: dict[str, Any], hparams_classes: Iterable[type]) -> None:
    """A --set key that no selected method declares is a typo, not something to ignore silently."""
    fields = set().union(*({f.name for f in dataclasses.fields(c)} for c in hparams_classes))
    unknown = sorted(set(global_set) - fields)
    if unknown:
        raise SpecError(f"--set key(s) {unknown} are hyperparameters of none of the selected methods")
