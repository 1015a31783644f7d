"""The library's numerics do not depend on the caller's ``torch.set_default_dtype``.

Networks are float32 by design and the samplers draw their noise as float32 from per-seed generators; a
caller's default of float64 would build float64 networks and change every random draw (images differed by up
to 255 grey levels). Entry points run under :func:`float32_default`, which restores the caller's default.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def float32_default_dtype() -> Iterator[None]:
    """``torch.get_default_dtype()`` is float32 inside, the caller's again after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float32_default(fn: F) -> F:
    """Decorate ``fn`` to run under :func:`float32_default_dtype`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with float32_default_dtype():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
