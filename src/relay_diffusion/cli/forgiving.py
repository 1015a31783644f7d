"""A command line that forgives: ``--num-steps-first`` and ``--num_steps_first`` are the same option (the
reference mixes both styles: ``--batch-gpu`` in training, ``--num_steps_first`` in generation; help shows the
declared one), a misspelt command gets a suggestion, and the long option lists of ``generate``, ``export`` and
``train`` are shown in sections."""

from __future__ import annotations

import difflib
import types
from typing import Any, Callable

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


#: Help sections of the long commands: (title, test on the option's name). An option goes to the first section
#: whose test it passes; the ones of no section stay under "Options".
HELP_SECTIONS: dict[str, list[tuple[str, Callable[[str], bool]]]] = {
    "generation": [
        ("Input and output", lambda n: n in {"indir", "outdir", "seeds", "subdirs", "class", "grid", "overwrite",
                                              "preset", "enhance", "sampler_stages"}),
        ("Networks", lambda n: n.startswith("network")),
        ("Guidance", lambda n: n.startswith(("cfg_scale", "guidance_interval", "guide_"))),
        ("Stage 1 sampler", lambda n: n.endswith("_first") or n in {"S_churn", "S_min", "S_max", "S_noise"}),
        ("Relay stage sampler and forward process", lambda n: n.endswith("_second")),
        ("Super-resolution stage", lambda n: n.endswith("_sr")),
        ("Performance and devices", lambda n: n in {"device", "precision", "net_batch", "compile", "channels_last",
                                                     "batch", "tf32", "timeout"}),
    ],
    "training": [
        ("Data and output", lambda n: n in {"outdir", "data", "config", "cond", "xflip", "cache", "cache_dir",
                                             "workers", "desc",
                                             "nosubdir", "resume", "transfer", "n", "dry_run", "seed"}),
        ("Network", lambda n: n in {"arch", "precond", "cbase", "cres", "num_blocks", "attn", "dropout",
                                     "eff_attn"}),
        ("Optimisation", lambda n: n in {"duration", "batch", "lr", "lr_rampup", "ema", "ema_profiles",
                                          "label_dropout", "augment", "ls"}),
        ("Relay stage (--precond blur / sr)", lambda n: n in {"up_scale", "noise_aug", "block_scale", "prob_length",
                                                               "blur_sigma_max"}),
        ("Progress, snapshots and states", lambda n: n in {"tick", "snap", "dump", "grid", "checkpoint_minutes"}),
        ("Performance and devices", lambda n: n in {"fp16", "precision", "bench", "compile", "channels_last",
                                                     "device", "batch_gpu", "tf32", "timeout"}),
    ],
}
#: Which commands get which sections.
SECTIONED = {"generate": "generation", "export": "generation", "train": "training"}


def _name(param: click.Parameter) -> str:
    opt = next((o for o in param.opts if o.startswith("--")), param.opts[0] if param.opts else "")
    return opt.lstrip("-").replace("-", "_")


def sectioned_help(command: click.Command, sections: list[tuple[str, Callable[[str], bool]]]) -> None:
    """Show ``command``'s options in ``sections`` (in place)."""

    def format_options(self: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {title: [] for title, _ in sections}
        rest: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name = _name(param)
            title = next((t for t, test in sections if test(name)), None)
            (groups[title] if title is not None else rest).append(record)
        for title, rows in groups.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)

    command.format_options = types.MethodType(format_options, command)  # type: ignore[method-assign]


def forgive(command: click.Command) -> click.Command:
    """Make ``command`` (and, for a group, its sub-commands as they are looked up) accept both spellings of
    its options. Returns ``command`` (changed in place)."""
    if getattr(command, "_forgiving", False):
        return command
    parse = command.parse_args

    def parse_args(self: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
        return parse(ctx, respell(list(args), option_names(self)))

    command.parse_args = types.MethodType(parse_args, command)  # type: ignore[method-assign]
    if command.name in SECTIONED:
        sectioned_help(command, HELP_SECTIONS[SECTIONED[command.name]])
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
