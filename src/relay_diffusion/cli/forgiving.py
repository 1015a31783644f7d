"""A command line that forgives: ``--num-steps-first`` and ``--num_steps_first`` are the same option (the
reference mixes both styles: ``--batch-gpu`` in training, ``--num_steps_first`` in generation; help shows the
declared one), and a misspelt command gets a suggestion."""

from __future__ import annotations

import difflib
import types
from typing import Any

import click


def option_names(command: click.Command) -> set[str]:
    """Every long option string the command declares (both sides of ``--x/--no-x`` flags)."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


def respell(args: list[str], known: set[str]) -> list[str]:
    """``args`` with each ``--a-b`` / ``--a_b`` that is not declared but whose other spelling is, respelt.
    Everything after a bare ``--`` is left alone."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            if name not in known:
                for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if other in known:
                        name = other
                        break
            arg = name + eq + value
        out.append(arg)
    return out


def forgive(command: click.Command) -> click.Command:
    """Make ``command`` (and, for a group, its sub-commands as they are looked up) accept both spellings of
    its options. Returns ``command`` (changed in place)."""
    if getattr(command, "_forgiving", False):
        return command
    parse = command.parse_args

    def parse_args(self: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
        return parse(ctx, respell(list(args), option_names(self)))

    command.parse_args = types.MethodType(parse_args, command)  # type: ignore[method-assign]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            forgive(sub)
    command._forgiving = True  # type: ignore[attr-defined]
    return command


class SuggestingGroup(click.Group):
    """A group that answers a misspelt command with the closest ones it has."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            if close:
                ctx.fail(f"No such command {name!r}. Did you mean {close[0]!r}?")
        return super().resolve_command(ctx, args)
