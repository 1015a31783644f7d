"""How error messages name a setting: the library names fields, a command line its flags.

A :data:`Namer` maps ``(group, field)`` to the name a message uses. The library's functions take one (default
:func:`field_name`: ``first.num_steps``, ``outdir``); the command line passes one that returns its flags
(``--num_steps_first``, ``--outdir``), so the same check gives each caller its own words.
"""

from __future__ import annotations

from typing import Callable

#: ``(group, field) -> name``; group is e.g. ``"first"``, ``"second"``, ``"process"``, ``"sr"``, or ``""`` for
#: top-level settings (``network_first``, ``outdir``...).
Namer = Callable[[str, str], str]


def field_name(group: str, name: str) -> str:
    """The library's :data:`Namer`: ``first.num_steps``, ``network_first``."""
    return f"{group}.{name}" if group else name
