"""``rdm generate``: relay generation with the reference's options (docs/math.md §8, §9).

Option names are the reference's (``--network_first``, ``--S_churn``, ``--truncation_t_second``...); each is
derived from one config field (:mod:`relay_diffusion.cli.options`). Sampler options left out take the value of
``--preset``; a relay stage's forward process (relay factor, blur schedule, block noise) comes from its file,
and an explicit option overrides it with a note. Runs under ``torchrun``: seeds are split across processes,
and the files do not depend on that split.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from relay_diffusion.cli.options import FieldOptions
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH
from relay_diffusion.generation.configs import PRESETS, EDMStageConfig, RelayStageConfig, SRStageConfig
from relay_diffusion.generation.stages import stage_nfe
from relay_diffusion.utils.locks import RunFolderBusy
from relay_diffusion.utils.distributed import DEFAULT_TIMEOUT_MIN

_SUFFIX_FIRST = {"S_churn", "S_min", "S_max", "S_noise"}  # the reference names these without _first
_PROCESS_ALIASES = {"prob_length": "truncation_t", "block_scale": "s_block"}  # canonical -> reference name


def _default(note: str) -> Any:
    return lambda f: f"  [default: {'none' if f.default is None else f.default}, or {note}]"


FIRST = FieldOptions(
    EDMStageConfig, lambda k: [f"--{k}", f"--{k}_first"] if k in _SUFFIX_FIRST else [f"--{k}_first"], "first_",
    _default("the preset's"))
SECOND = FieldOptions(RelayStageConfig, lambda k: [f"--{k}_second"], "second_", _default("the preset's"))
SR = FieldOptions(SRStageConfig, lambda k: [f"--{k}_sr"], "sr_",
                  lambda f: f"  [super-resolution stages; default: {'none' if f.default is None else f.default}]")
PROCESS = FieldOptions(
    BlurProcess, lambda k: [f"--{k}_second"] + ([f"--{_PROCESS_ALIASES[k]}_second"] if k in _PROCESS_ALIASES else []),
    "process_", lambda f: f"  [default: the network file's, else {f.default} or the preset's]")


class _SeedList(click.ParamType):
    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        from relay_diffusion.cli.options import parse_seeds

        return value if isinstance(value, list) else parse_seeds(value)


def _options(command: Any) -> Any:
    """The sampler, forward-process and guide options (of ``generate`` and ``export``)."""
    for decorate in (SR.decorate, PROCESS.decorate, SECOND.decorate, FIRST.decorate):
        command = decorate(command)
    command = click.option("--guide_second", metavar="PATH|self-dropout", type=str,
                           help="Autoguidance of the relay stage with --cfg_scale_second > 1 (as --guide_first)")(command)
    return click.option("--guide_first", metavar="PATH|self-dropout", type=str,
                        help="Autoguidance of stage 1 with --cfg_scale_first > 1: a weaker network of the same stage "
                             "(smaller or trained shorter), or self-dropout (the network itself with its dropout on)"
                        )(command)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--indir", metavar="DIR", type=str, help="Input images of a --sampler_stages second run")
@click.option("--outdir", metavar="DIR", type=str, required=True, help="Where to save the output images")
@click.option("--seeds", type=_SeedList(), help=f"Random seeds (e.g. 1,2,5-10)  [default: {PRESETS['default'].seeds}, "
              "or the preset's]")
@click.option("--subdirs", is_flag=True, help="Create a sub-folder for every 1000 seeds")
@click.option("--class", "class_idx", metavar="INT", type=click.IntRange(min=0), help="Class label  [default: seed % classes]")
@click.option("--batch", "max_batch_size", metavar="INT", type=click.IntRange(min=1, max=65536), default=64,
              show_default=True, help="Maximum batch size")
@click.option("--sampler_stages", type=click.Choice(["first", "second", "both"]), default="both", show_default=True,
              help="Which stages to run")
@click.option("--network_first", metavar="PATH", type=str, help="Stage-1 network (.safetensors, .pkl or .pt)")
@click.option("--network_second", metavar="PATH", type=str, help="Relay (stage-2) network (.safetensors, .pkl or .pt), "
              "or a super-resolution network (sampled with the *_sr settings)")
@click.option("--network_next", metavar="PATH", type=str, multiple=True,
              help="A further relay stage after the second, e.g. 16 -> 64 -> 256 (repeatable; sampled with the "
                   "*_second settings and its own file's forward process)")
@_options
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="The reference's settings for: generate.py (default), generate_imagenet.py, generate_celebahq.py; "
                   "emoji: the bundled networks' (multistep solvers, both stages autoguided)  [default: emoji when "
                   "the bundled networks stand in, else default]")
@click.option("--enhance/--no-enhance", default=None, help="PIL post-processing of the preset (imagenet256, "
              "celebahq256)  [default: on with those presets, except for --sampler_stages first]")
@click.option("--device", type=str, help="cpu, cuda, cuda:N, ...  [default: cuda if available, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Network precision on CUDA; bf16 "
              "also on the CPU  [default: the network's own, on CUDA only]")
@click.option("--net_batch", type=click.IntRange(min=1, max=65536), default=DEFAULT_NET_BATCH,
              help="Samples per network call (padded); results depend on it, never on --batch  [default: 8 on the "
                   "CPU, the whole batch in one call on CUDA]")
@click.option("--timeout", metavar="MIN", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_MIN,
              show_default=True, help="With several processes: minutes a process waits for the others at a "
                                      "collective before it stops with an error")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the networks (the samplers stay eager)")
@click.option("--channels_last", is_flag=True, help="Run the networks in channels-last memory format")
@click.option("--tf32/--no-tf32", default=None, help="TF32 matrix products and convolutions on CUDA  [default: on "
              "when a network computes in fp16/bf16, off for fp32]")
@click.option("--grid", is_flag=True, help="Also write outdir/grid.png of the first 256 seeds")
@click.option("--overwrite", is_flag=True, help="Regenerate seeds whose PNG already exists")
def generate(**opts: Any) -> None:
    """Generate images: stage 1 (EDM) relayed into stage 2 (blur diffusion), one PNG per seed.

    \b
    Examples:
      rdm generate --outdir=out --network_first=a.pkl --network_second=b.pt --seeds=0-63
      rdm generate --outdir=out --network_first=s16.safetensors --network_second=s64.safetensors \\
          --network_next=s256.safetensors
      torchrun --standalone --nproc_per_node=8 -m relay_diffusion generate --preset=imagenet256 \\
          --outdir=out --network_first=imagenet64.pkl --network_second=imagenet256.pt
    """
    from relay_diffusion.generation.settings import load, resolve
    from relay_diffusion.utils import distributed

    options = cli_options(opts)
    resolved = checked(resolve, options, cli_name)
    ctx = init_processes(opts)
    failed = True
    try:
        built = checked(load, options, ctx.device, cli_name, resolved)
        if ctx.rank == 0:
            for note in built.notes:
                click.echo(f"Note: {note}")
            _print_config(opts, resolved, built.pipeline, ctx.device, ctx.world_size)
        write_images(built.pipeline, resolved.seeds, opts, ctx)
        failed = False
    except distributed.PeerFailure as exc:
        if exc.reported:  # the failing process prints its own error; this one only exits with failure
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(str(exc)) from None
    finally:
        distributed.shutdown(failed=failed and ctx.world_size > 1)


def cli_name(group: str, name: str) -> str:
    """The flag of a setting (:data:`relay_diffusion.generation.settings.Namer`): ``--num_steps_first``."""
    groups = {"first": FIRST, "second": SECOND, "process": PROCESS, "sr": SR}
    if not group:
        return f"--{name}"
    suffix = "second" if group == "process" else group
    return groups[group].names().get(name, f"--{name}_{suffix}")


def cli_options(opts: dict[str, Any]) -> Any:
    """The parsed command line as :class:`~relay_diffusion.generation.settings.GenerationOptions`."""
    from relay_diffusion.generation.settings import GenerationOptions

    return GenerationOptions(
        preset=opts["preset"], sampler_stages=opts.get("sampler_stages", "both"),
        network_first=opts["network_first"], network_second=opts["network_second"],
        network_next=tuple(opts["network_next"]), guide_first=opts.get("guide_first"),
        guide_second=opts.get("guide_second"), first=FIRST.given(opts), second=SECOND.given(opts),
        process=PROCESS.given(opts), sr=SR.given(opts), enhance=opts["enhance"], seeds=opts.get("seeds"),
        indir=opts.get("indir"), net_batch=opts.get("net_batch", DEFAULT_NET_BATCH), precision=opts.get("precision"),
        compile=opts.get("compile_net", False), channels_last=opts.get("channels_last", False), tf32=opts.get("tf32"))


def checked(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with an :class:`OptionError` as a usage error naming the option."""
    from relay_diffusion.generation.settings import OptionError

    try:
        return fn(*args)
    except OptionError as exc:
        if exc.option and exc.option not in str(exc):
            raise click.BadParameter(str(exc), param_hint=exc.option) from exc
        raise click.UsageError(str(exc)) from exc


def init_processes(opts: dict[str, Any]) -> Any:
    """This process's :class:`~relay_diffusion.utils.distributed` context (device, rank, world size)."""
    from relay_diffusion.utils import distributed

    try:
        return distributed.init(opts["device"], opts["timeout"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    except distributed.LaunchError as exc:
        raise click.ClickException(str(exc)) from None


def write_images(pipeline: Any, seeds: list[int], opts: dict[str, Any], ctx: Any) -> None:
    """This process's share of the seeds to PNGs (then, on rank 0, the grid); errors as one line."""
    from relay_diffusion.generation.files import save_seed_grid
    from relay_diffusion.generation.run import generate_images
    from relay_diffusion.utils import distributed

    try:
        generate_images(
            pipeline, seeds, opts["outdir"], max_batch_size=opts["max_batch_size"], class_labels=opts["class_idx"],
            indir=opts["indir"], subdirs=opts["subdirs"], overwrite=opts["overwrite"], rank=ctx.rank,
            world_size=ctx.world_size, progress=ctx.rank == 0, names=cli_name)
    except (ValueError, FileNotFoundError, RunFolderBusy) as exc:  # RunFolderBusy: --outdir in use
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # e.g. no space left on device, a read-only --outdir
        where = f" {exc.filename}" if exc.filename else f" into {opts['outdir']}"
        raise click.ClickException(f"cannot write{where}: {exc.strerror or exc}") from exc
    distributed.barrier()
    if ctx.rank == 0:
        if opts["grid"]:
            click.echo(f"Grid: {save_seed_grid(opts['outdir'], seeds, opts['subdirs'])}")
        click.echo("Done.")


def _print_config(opts: dict[str, Any], resolved: Any, pipeline: Any, device: Any, world_size: int) -> None:
    from relay_diffusion.generation.stages import stage_extras, stage_name
    from relay_diffusion.utils.jsonio import to_strict

    seeds = resolved.seeds
    click.echo(f"Preset: {resolved.preset_name}")
    for i, stage in enumerate(pipeline.stages):
        settings = {**dataclasses.asdict(stage.config), **stage_extras(stage)}
        if stage.guide_source:
            settings["guide"] = stage.guide_source
        click.echo(f"{stage_name(i, stage).capitalize()}: {json.dumps(to_strict(settings))}")
    nfe = [stage_nfe(stage) for stage in pipeline.stages]
    guided = ", guides included" if any(s.guide is not None for s in pipeline.stages) else ""
    click.echo(f"NFE per image (denoiser evaluations{guided}): {' + '.join(map(str, nfe))} = {sum(nfe)}"
               + (" (x2 network calls where classifier-free guidance applies)"
                  if any(s.config.cfg_scale > 1 and s.guide is None for s in pipeline.stages)
                  else ""))
    enhancement = json.dumps(dataclasses.asdict(pipeline.enhancement)) if pipeline.enhancement.enabled else "off"
    click.echo(f"Post-processing (PIL ImageEnhance): {enhancement}")
    click.echo(f"Generating {len(seeds)} images ({pipeline.resolution}x{pipeline.resolution}) to {opts['outdir']!r} "
               f"on {device} x {world_size} process(es), network batch {pipeline.resolved_net_batch or 'whole batch'}...")
