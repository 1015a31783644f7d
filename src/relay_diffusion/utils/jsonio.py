"""Strict JSON for the files the project writes: non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``.

``json.dumps`` writes ``float('inf')`` (EDM's default ``sigma_max``) as the token ``Infinity``, which is not
JSON: most parsers other than Python's reject it. :func:`dumps_strict` writes the three strings instead and
never emits ``Infinity`` or ``NaN``; :func:`restore_non_finite` turns them back into floats, either under the
keys a reader knows to be floats or everywhere (for files whose values are all numbers). Older files with the
tokens still load: Python's ``json.loads`` reads them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

#: The strings standing for the non-finite floats.
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _text(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def to_strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (also inside lists, tuples and dicts) replaced by its string."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _text(obj)
    if isinstance(obj, dict):
        return {k: to_strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that any JSON parser reads: non-finite floats become ``"inf"`` / ``"-inf"`` / ``"nan"``."""
    return json.dumps(to_strict(obj), allow_nan=False, **kwargs)


def restore_non_finite(obj: Any, keys: Collection[str] | None = None) -> Any:
    """The inverse of :func:`to_strict`: the strings ``"inf"``, ``"-inf"``, ``"nan"`` back to floats, in the
    values of ``keys`` (at any depth, and all that they contain), or everywhere when ``keys`` is None."""
    if isinstance(obj, dict):
        return {k: restore_non_finite(v, None if keys is None or k in keys else keys) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_non_finite(v, keys) for v in obj]
    if keys is None and isinstance(obj, str):
        return NON_FINITE.get(obj, obj)
    return obj


def loads_strict(text: str | bytes, keys: Collection[str] | None = None) -> Any:
    """``json.loads`` of a file written by :func:`dumps_strict` (or an older one with ``Infinity`` tokens),
    with the non-finite floats restored as :func:`restore_non_finite` does."""
    return restore_non_finite(json.loads(text), keys)
