"""Command-line options derived from config dataclasses: each field is one option, with the field's help.

Used by ``rdm generate`` (stage sampler settings and the forward process) so that every knob is declared
once, as a dataclass field; the reference's option names are aliases of the field's canonical flag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import click

NONE = "none"


class FloatOrNone(click.ParamType):
    """A float, or ``none`` (given explicitly, unlike a left-out option)."""

    name = "FLOAT|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == NONE:
            return NONE
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite unless the bound allows infinity (``inf`` is allowed for S_max)."""

    def __init__(self, *args: Any, allow_inf: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_inf = allow_inf

    def _describe_range(self) -> str:
        """No ``[x<=None]`` in the help of a float without bounds."""
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        v = super().convert(value, param, ctx)
        if math.isnan(v) or (math.isinf(v) and not self.allow_inf):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class Interval(click.ParamType):
    """``LO,HI``: two noise levels, or ``none``."""

    name = "LO,HI|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or isinstance(value, tuple):
            return value
        if str(value).lower() == NONE:
            return NONE
        try:
            lo, hi = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two noise levels LO,HI (e.g. 0.28,2.9)", param, ctx)
        if not (0 <= lo < hi) or math.isnan(hi):
            self.fail(f"{value!r}: need 0 <= LO < HI", param, ctx)
        return (lo, hi)


def _click_type(f: dataclasses.Field) -> Any:
    meta, kind = f.metadata, str(f.type)
    if meta.get("kind") == "interval":
        return Interval()
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if "Optional" in kind or "None" in kind:
        return FloatOrNone()
    bounds = dict(min=meta.get("min"), max=meta.get("max"), min_open=meta.get("min_open", False))
    if kind == "int":
        return click.IntRange(min=bounds["min"], max=bounds["max"])
    return FiniteFloat(**bounds, allow_inf=f.default == math.inf)


class FieldOptions:
    """The options of one config dataclass: field ``k`` is ``flags(k)`` (canonical first, then aliases),
    stored under ``f'{dest_prefix}{k}'``. ``None`` (not given) leaves the field to the preset or the file."""

    def __init__(self, cls: type, flags: Callable[[str], Sequence[str]], dest_prefix: str,
                 default_help: Callable[[dataclasses.Field], str] = lambda f: "",
                 fields: Sequence[str] | None = None) -> None:
        self.cls, self.dest_prefix = cls, dest_prefix
        self.fields = [f for f in dataclasses.fields(cls) if fields is None or f.name in fields]
        self.flags = {f.name: list(flags(f.name)) for f in self.fields}
        self.default_help = default_help

    def dest(self, name: str) -> str:
        return f"{self.dest_prefix}{name}"

    def decorate(self, command: Callable) -> Callable:
        for f in reversed(self.fields):
            flags, help_text = self.flags[f.name], f.metadata.get("help", "") + self.default_help(f)
            if str(f.type) == "bool":
                on, off = flags[0], "--no-" + flags[0].lstrip("-")
                command = click.option(f"{on}/{off}", self.dest(f.name), default=None, help=help_text)(command)
            else:
                command = click.option(*flags, self.dest(f.name), type=_click_type(f), default=None,
                                       help=help_text)(command)
        return command

    def given(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """``{field: value}`` of the options given on the command line (``none`` -> None)."""
        out = {}
        for f in self.fields:
            v = opts.get(self.dest(f.name))
            if v is not None:
                out[f.name] = None if v == NONE else v
        return out

    def names(self) -> dict[str, str]:
        """``{field: canonical flag}``, for error messages."""
        return {k: v[0] for k, v in self.flags.items()}


def parse_seeds(text: str, option: str = "--seeds", max_count: int = 10_000_000) -> list[int]:
    """``'0-63,100'`` -> seeds, at least one, all non-negative; else a ``click.BadParameter`` naming ``option``."""
    from relay_diffusion.utils.intlist import parse_int_list

    try:
        seeds = parse_int_list(text, max_count=max_count)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a list of seeds like 0-63,100 ({exc})", param_hint=option)
    if not seeds or min(seeds) < 0:
        raise click.BadParameter(f"{text!r}: seeds must be non-negative and at least one", param_hint=option)
    if max(seeds) >= 1 << 63:  # seeds are stored as 64-bit signed integers (manifests, tensors of positions)
        raise click.BadParameter(f"{text!r}: seeds must be below 2**63, got {max(seeds)}", param_hint=option)
    return seeds
