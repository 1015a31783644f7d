"""One strict decoder for the config dataclasses read from files (training options, forward processes,
super-resolution conditions, a pipeline's sampler settings).

A JSON value becomes a field only when it has the field's type: ``"no"`` is not a boolean, ``1.5`` is not an
integer, ``1e999`` (which JSON reads as infinity) is not a finite number, and a key that is not a field is an
error, never a silently ignored setting. Every error is one ``ValueError`` naming the field (and where it was
read, e.g. the file), so that the command-line tools can report it in one line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from relay_diffusion.utils import jsonio

T = TypeVar("T")

#: The strings strict JSON holds for non-finite floats (``utils.jsonio``), and JSON's own token spellings.
NON_FINITE = {**jsonio.NON_FINITE, "Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


class DecodeError(ValueError):
    """A value that does not fit its field; ``field`` is the field's name (None for the object as a whole)."""

    def __init__(self, where: str, field: str | None, message: str) -> None:
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        self.where, self.field, self.message = where, field, message


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(tp: Any, value: Any, finite: bool) -> Any:
    """``value`` as type ``tp``, or a ``TypeError`` whose text says what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # Optional[X]: X's own error says best what was expected
            return _value(inner[0], value, finite)
        errors = []
        for a in inner:
            try:
                return _value(a, value, finite)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(" or ".join(errors) + (" or null" if type(None) in args else ""))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected a whole number")
        return value
    if tp is float:
        if isinstance(value, str) and value in NON_FINITE:
            value = NON_FINITE[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        if finite and not math.isfinite(value):
            raise TypeError("expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        item = args[0] if args else Any
        if len(args) > 1 and args[-1] is not Ellipsis:  # a fixed-length tuple
            if len(value) != len(args):
                raise TypeError(f"expected a list of {len(args)}")
            return tuple(_value(a, v, finite) for a, v in zip(args, value))
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_value(item if args else Any, v, finite))
            except TypeError as exc:
                raise TypeError(f"item {i}: {exc}") from None
        return tuple(out) if (origin or tp) is tuple else out
    raise TypeError(f"unsupported field type {tp!r}")  # a programming error: every config type is listed above


def decode(cls: type[T], data: Any, where: str, what: str = "settings", non_finite: Iterable[str] = (),
           aliases: Mapping[str, str] | None = None, validate: bool = True) -> T:
    """An instance of the dataclass ``cls`` from the mapping ``data`` read at ``where`` (a file, an entry).

    Unknown keys (after ``aliases``, e.g. the reference's names) are refused, each value must have its field's
    type (floats finite, except the fields named in ``non_finite``, which also take ``"inf"``), and the class's
    own ``validate()`` then checks ranges (unless ``validate`` is false). Missing keys take the field's default."""
    if not isinstance(data, Mapping):
        raise DecodeError(where, None, f"expected a JSON object of {what}, got {type(data).__name__}")
    data = {(aliases or {}).get(k, k): v for k, v in data.items()}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise DecodeError(where, None, f"unknown {what} {unknown}")
    hints = typing.get_type_hints(cls)
    allowed = set(non_finite)
    values = {}
    for name, value in data.items():
        try:
            values[name] = _value(hints[name], value, finite=name not in allowed)
        except TypeError as exc:
            raise DecodeError(where, name, f"{exc}, got {_describe(value)}") from None
    try:
        obj = cls(**values)
        check = getattr(obj, "validate", None) if validate else None
        if callable(check):
            obj = check() or obj
    except (TypeError, ValueError) as exc:
        raise DecodeError(where, None, str(exc)) from None
    return obj
