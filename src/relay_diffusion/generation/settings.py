"""Generation settings: what the user asked for (on the command line or in Python) turned into a relay chain.

:class:`GenerationOptions` holds the options as given: which stages run, the network files, and, per group,
only the sampler / forward-process settings that were set (everything else comes from the preset, and a relay
stage's forward process from its file). :func:`resolve` checks them and applies the preset
(:class:`Resolved`); :func:`load` loads the networks into a :class:`~relay_diffusion.generation.build.Built`
pipeline. ``rdm generate`` and ``rdm export`` only parse their options into a :class:`GenerationOptions`, call
these and print; the Python API calls the same functions, so every option works in both::

    from relay_diffusion.generation.settings import GenerationOptions, load
    built = load(GenerationOptions(first={"num_steps": 9, "solver": "multistep"}), device="cpu")
    images = built.pipeline(seeds=range(8)).images

Errors are :class:`OptionError` s naming the setting through a :data:`~relay_diffusion.utils.naming.Namer`:
by default ``first.num_steps``, ``process.up_scale``, ``network_first``; the command line passes one that
names its flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH
from relay_diffusion.generation.configs import (BUNDLED_PRESET, PRESETS, EDMStageConfig, Enhancement, Preset,
                                                RelayStageConfig, SRStageConfig)
from relay_diffusion.utils.intlist import parse_int_list
from relay_diffusion.utils.naming import Namer, field_name

#: The settings of each group (the groups of a :data:`~relay_diffusion.utils.naming.Namer`).
GROUPS = {"first": EDMStageConfig, "second": RelayStageConfig, "process": BlurProcess, "sr": SRStageConfig}
STAGE_CHOICES = ("first", "second", "both")


class OptionError(ValueError):
    """A setting that cannot be used; ``option`` is its name (by the :data:`Namer` in use) when one is to
    blame, None when the combination is."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate with, as given: unset values are the preset's (sampler settings), the file's (a relay
    stage's forward process) or the bundled models (no network at all)."""

    preset: Optional[str] = None                # None: "emoji" when the bundled networks stand in, else "default"
    sampler_stages: str = "both"                # "first", "second" (relay stage alone, fed from indir) or "both"
    network_first: Optional[str] = None
    network_second: Optional[str] = None
    network_next: tuple[str, ...] = ()          # further relay stages after the second
    guide_first: Optional[str] = None           # autoguidance of stage 1: a network file or "self-dropout"
    guide_second: Optional[str] = None          # autoguidance of the (first) relay stage
    first: Mapping[str, Any] = field(default_factory=dict)    # EDMStageConfig fields that were set
    second: Mapping[str, Any] = field(default_factory=dict)   # RelayStageConfig fields (every relay stage)
    process: Mapping[str, Any] = field(default_factory=dict)  # BlurProcess fields (override the files')
    sr: Mapping[str, Any] = field(default_factory=dict)       # SRStageConfig fields (super-resolution stages)
    enhance: Optional[bool] = None              # the preset's post-processing; None: on unless stage 1 alone
    seeds: Optional[Sequence[int]] = None       # None: the preset's
    indir: Optional[str] = None                 # input images of a sampler_stages="second" run
    net_batch: Optional[int] = DEFAULT_NET_BATCH
    precision: Optional[str] = None
    compile: bool = False
    channels_last: bool = False
    tf32: Optional[bool] = None


@dataclass
class Resolved:
    """The checked settings of a run: each stage kind's sampler settings, the forward-process overrides, the
    post-processing, the seeds and the chain ``[(option, path), ...]`` in stage order."""

    preset: Preset
    first: EDMStageConfig
    second: RelayStageConfig
    sr: SRStageConfig
    process_overrides: dict[str, Any]
    enhancement: Enhancement
    seeds: list[int]
    chain: list[tuple[str, str]]
    preset_name: str = "default"


def resolve(options: GenerationOptions, names: Namer = field_name) -> Resolved:
    """Check ``options`` and apply the preset; an :class:`OptionError` names the first bad setting."""
    if options.sampler_stages not in STAGE_CHOICES:
        raise OptionError(f"{names('', 'sampler_stages')} must be one of {', '.join(STAGE_CHOICES)}, got "
                          f"{options.sampler_stages!r}", names("", "sampler_stages"))
    name = preset_name(options, names)
    preset = PRESETS[name]
    first = _configured(preset.first, options.first, "first", names)
    second = _configured(preset.second, options.second, "second", names)
    _configured(preset.process, options.process, "process", names)  # checked here; applied per file
    sr = _configured(SRStageConfig(), options.sr, "sr", names)
    if options.sampler_stages == "second" and not options.indir:
        raise OptionError(f"{names('', 'sampler_stages')} second needs {names('', 'indir')} (the stage-1 images)")
    seeds = list(options.seeds) if options.seeds is not None else parse_int_list(preset.seeds)
    return Resolved(preset, first, second, sr, dict(options.process), _enhancement(preset, options),
                    seeds, chain(options, names), name)


def preset_name(options: GenerationOptions, names: Namer = field_name) -> str:
    """The preset ``options`` run with: the one given, else :data:`BUNDLED_PRESET` when the bundled networks
    stand in (no network given and they are installed), else ``"default"`` (the reference's generate.py). The
    bundled preset's guides are the bundled networks' own, so it is refused with a network of the user's."""
    from relay_diffusion.checkpoints.bundled import bundled_network_paths

    option = names("", "preset")
    bundled = not (options.network_first or options.network_second) and bundled_network_paths() is not None
    if options.preset is None:
        return BUNDLED_PRESET if bundled else "default"
    if options.preset not in PRESETS:
        raise OptionError(f"{option} must be one of {', '.join(sorted(PRESETS))}, got {options.preset!r}", option)
    if options.preset == BUNDLED_PRESET and not bundled:
        raise OptionError(f"{option} {BUNDLED_PRESET} is the setting of the bundled networks (their guides "
                          f"included); with networks of your own use another preset and set the options", option)
    return options.preset


def _configured(base: Any, given: Mapping[str, Any], group: str, names: Namer) -> Any:
    """``base`` with the settings ``given``, validated; errors name the setting."""
    cls = GROUPS[group]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise OptionError(f"{names(group, unknown[0])} is not a setting of {cls.__name__}", names(group, unknown[0]))
    config = dataclasses.replace(base, **given)
    try:
        config.validate({k: names(group, k) for k in known})
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    return config


def _enhancement(preset: Preset, options: GenerationOptions) -> Enhancement:
    """The preset's post-processing: on for final images unless ``enhance=False``; stage-1-only outputs (inputs
    of a later ``sampler_stages="second"`` run) get it only with an explicit ``enhance=True``."""
    on = options.enhance if options.enhance is not None else options.sampler_stages != "first"
    return preset.enhancement if on else Enhancement()


def network_paths(network_first: str | None, network_second: str | None,
                  stages: tuple[str, ...] = ("first", "second"), names: Namer = field_name) -> dict[str, str]:
    """The networks of ``stages`` (``'first'``, ``'second'``). The bundled ones stand in only when no network
    is given at all: a network of the user's is never paired with a bundled one."""
    from relay_diffusion.checkpoints.bundled import bundled_network_paths

    given = {"first": network_first, "second": network_second}
    any_given = network_first or network_second
    defaults = {} if any_given else (bundled_network_paths() or {})
    paths = {}
    for which in stages:
        path = given[which] or defaults.get(which)
        if not path:
            raise OptionError(_missing_network(which, bool(any_given), names), names("", f"network_{which}"))
        paths[which] = path
    return paths


def _missing_network(which: str, any_given: bool, names: Namer) -> str:
    """Why stage ``which`` has no network, and what was probably meant."""
    option = names("", f"network_{which}")
    if not any_given:
        return (f"{option} is required (this copy of relay-diffusion has no bundled networks; recipes/emoji.sh "
                "trains them)")
    alone = "second" if which == "first" else "first"  # the stage whose network was given
    what = "stage-1" if alone == "first" else "relay"
    with_indir = f" with {names('', 'indir')} (its input images)" if alone == "second" else ""
    return (f"{option} is required when the other network is given; to run the {what} network alone, add "
            f"{names('', 'sampler_stages')} {alone}{with_indir}")


def chain(options: GenerationOptions, names: Namer = field_name) -> list[tuple[str, str]]:
    """``[(option, path), ...]`` of the stages to run, in chain order (``option`` named by ``names``)."""
    kind = options.sampler_stages
    stages = ("first", "second") if kind == "both" else (kind,)
    nxt = names("", "network_next")
    if options.network_next and kind == "first":
        raise OptionError(f"{nxt} adds relay stages; it cannot be used with {names('', 'sampler_stages')} first", nxt)
    if options.network_next and not (options.network_first or options.network_second):
        raise OptionError(f"{nxt} needs {names('', 'network_first')} and {names('', 'network_second')}", nxt)
    paths = network_paths(options.network_first, options.network_second, stages, names)
    return [(names("", f"network_{w}"), paths[w]) for w in stages] + [(nxt, p) for p in options.network_next]


def load(options: GenerationOptions, device: torch.device | str = "cpu", names: Namer = field_name,
         resolved: Resolved | None = None) -> Any:
    """The :class:`~relay_diffusion.generation.build.Built` pipeline of ``options`` (``resolved``: the
    :func:`resolve` of them, when the caller has it) with its networks on ``device``."""
    from relay_diffusion.generation.build import StageFileError, build_pipeline

    r = resolved or resolve(options, names)
    try:
        built = build_pipeline(
            [p for _, p in r.chain], first=r.first, relay=r.second, sr=r.sr,
            first_is_relay=options.sampler_stages == "second", default_process=r.preset.process,
            process_overrides=r.process_overrides, enhancement=r.enhancement, net_batch=options.net_batch,
            precision=options.precision, device=device, compile=options.compile,
            channels_last=options.channels_last, tf32=options.tf32)
    except StageFileError as exc:
        raise OptionError(str(exc), r.chain[exc.index][0]) from exc
    except ValueError as exc:
        raise OptionError(f"{exc}\n(check the network options and {names('process', 'up_scale')})") from exc
    check_options_apply(built.pipeline, options, names)
    attach_guides(built.pipeline, options, device, names, r.preset)
    return built


def attach_guides(pipeline: Any, options: GenerationOptions, device: torch.device | str,
                  names: Namer = field_name, preset: Preset | None = None) -> None:
    """Give stage 1 its ``guide_first`` and the first refining stage its ``guide_second`` (autoguidance:
    :mod:`relay_diffusion.generation.guides`); a guide for a stage the chain does not have is an error. Where
    none is given, the ``preset``'s guide (a bundled file) is used for a stage whose guidance scale is above 1
    (a scale set to 1 turns it off)."""
    from relay_diffusion.checkpoints.bundled import ASSETS
    from relay_diffusion.generation.guides import load_guide
    from relay_diffusion.generation.stages import takes_input

    stages = pipeline.stages
    relay = next((i for i, s in enumerate(stages) if takes_input(s)), None)
    for which, index in (("first", None if takes_input(stages[0]) else 0), ("second", relay)):
        spec, option = getattr(options, f"guide_{which}"), names("", f"guide_{which}")
        preset_guide = getattr(preset, f"guide_{which}", None) if preset is not None else None
        if spec is None and preset_guide and index is not None and stages[index].config.cfg_scale > 1:
            spec = str(ASSETS / preset_guide)
        if spec is None:
            continue
        if index is None:
            raise OptionError(f"{option}: this chain has no {'stage 1' if which == 'first' else 'relay stage'}",
                              option)
        stage = stages[index]
        if stage.config.cfg_scale <= 1:  # before loading: the guide would never be called
            raise OptionError(f"{option} guides only with a guidance scale above 1 "
                              f"({names(which, 'cfg_scale')})", option)
        try:
            stage.guide, stage.guide_source = load_guide(spec, stage, device, options.precision)
        except (ValueError, OSError) as exc:
            raise OptionError(str(exc), option) from exc


def check_options_apply(pipeline: Any, options: GenerationOptions, names: Namer = field_name) -> None:
    """Refuse settings for the kind of refining stage the chain does not have (they would do nothing): relay
    settings with a super-resolution stage and the reverse. A stage-1-only run ignores them all."""
    kinds = {stage.kind for stage in pipeline.stages}
    if kinds == {"edm"}:
        return
    for group, kind, what in (("second", "relay", "relay stages"), ("process", "relay", "relay stages"),
                              ("sr", "sr", "super-resolution stages")):
        given = sorted(getattr(options, group))
        if given and kind not in kinds:
            hint = f" (use the {names('sr', '*')} settings)" if kind == "relay" and "sr" in kinds else ""
            option = names(group, given[0])
            raise OptionError(f"{option} applies to {what}; this chain has none{hint}", option)
