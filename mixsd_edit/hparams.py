"""Strict hyperparameter dataclasses shared by every editing method.

Each method defines a frozen dataclass that subclasses :class:`HyperParams`. Loading a YAML file
is strict: a key the dataclass does not declare, or a declared key the file leaves out, is an
error that names the key and the file. Values are coerced by the declared field type, so YAML's
habit of reading ``5e-1`` as a string is handled once, here, instead of being patched per method.
Range checks live in each subclass's ``validate`` and run in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml


class HyperParamsError(ValueError):
    """A hyperparameter file or value is invalid. The message names the key and the source."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce a YAML value to the declared type or raise an error naming key and source."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise HyperParamsError(f"{source}: key '{key}' must not be null (expected {inner}).")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if inner is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)  # accepts "5e-1" strings from YAML
        if inner is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            (elem,) = typing.get_args(inner)[:1] or (Any,)
            return tuple(_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value))
        if inner is Any:
            return value
    except (TypeError, ValueError):
        raise HyperParamsError(
            f"{source}: key '{key}' has value {value!r}, which is not a valid {getattr(inner, '__name__', inner)}."
        ) from None
    return value


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """Base class. Subclasses declare every field without defaults and set ``ALG_NAME``.

    Fields every method has (read by the editor): ``alg_name``, ``model_name``, ``device``,
    ``batch_size`` (requests per apply call in ``batch_edit``), ``max_length``.
    """

    ALG_NAME: ClassVar[str] = ""

    alg_name: str
    model_name: str
    device: str
    batch_size: int
    max_length: int

    def __post_init__(self) -> None:
        if self.ALG_NAME and self.alg_name != self.ALG_NAME:
            raise HyperParamsError(
                f"{type(self).__name__}: alg_name is '{self.alg_name}', expected '{self.ALG_NAME}'."
            )
        if self.batch_size < 1:
            raise HyperParamsError(f"{type(self).__name__}: batch_size must be >= 1, got {self.batch_size}.")
        if self.max_length < 1:
            raise HyperParamsError(f"{type(self).__name__}: max_length must be >= 1, got {self.max_length}.")
        self.validate()

    def validate(self) -> None:
        """Range checks of the subclass; raise HyperParamsError naming the field."""

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>"):
        if not isinstance(data, Mapping):
            raise HyperParamsError(f"{source}: expected a mapping of hyperparameters, got {type(data).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise HyperParamsError(
                f"{source}: unknown key(s) {unknown} for {cls.__name__}; allowed keys: {sorted(fields)}."
            )
        missing = sorted(set(fields) - set(data))
        if missing:
            raise HyperParamsError(f"{source}: missing key(s) {missing} for {cls.__name__}.")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(data[name], hints[name], name, source) for name in fields}
        try:
            return cls(**values)
        except HyperParamsError as e:
            raise HyperParamsError(f"{source}: {e}") from None

    @classmethod
    def from_hparams(cls, path: str | os.PathLike):
        """Load ``hparams/<ALG>/<model>.yaml`` (a ``.yaml`` suffix is added when missing)."""
        p = Path(path)
        if p.suffix not in (".yaml", ".yml"):
            p = p.with_suffix(".yaml")
        if not p.is_file():
            raise HyperParamsError(f"hyperparameter file not found: {p}")
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        return cls.from_dict(data or {}, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Short stable hash of the values, for naming results and caches."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def hparams_dir() -> Path:
    """The shipped ``hparams/`` folder (inside the source tree or the installed package data)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "hparams", here.parent / "hparams"):
        if cand.is_dir():
            return cand
    raise HyperParamsError("the shipped hparams/ folder was not found next to the package")


def resolve_hparams_path(alg_name: str, model: str) -> Path:
    """``hparams/<alg_name>/<model>.yaml`` from the shipped folder."""
    p = hparams_dir() / alg_name / f"{model}.yaml"
    if not p.is_file():
        avail = sorted(x.stem for x in (hparams_dir() / alg_name).glob("*.yaml")) if (hparams_dir() / alg_name).is_dir() else []
        raise HyperParamsError(f"no shipped hparams for {alg_name} / {model}: {p} does not exist; available: {avail}")
    return p
