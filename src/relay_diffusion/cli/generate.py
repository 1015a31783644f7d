"""``rdm generate``: relay generation with the reference's options (SPEC 8, 9).

Option names are the reference's (``--network_first``, ``--S_churn``, ``--truncation_t_second``...).
Sampler options left out take the value of ``--preset`` (``default``, ``imagenet256``, ``celebahq256``:
the reference's ``generate.py``, ``generate_imagenet.py`` and ``generate_celebahq.py``). Runs under
``torchrun``: seeds are split across processes, and the files do not depend on that split.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import click

from relay_diffusion.generation.pipeline import DEFAULT_NET_BATCH, PRESETS, EDMStageConfig, RelayStageConfig

FIRST_FIELDS = tuple(f.name for f in dataclasses.fields(EDMStageConfig))
SECOND_FIELDS = tuple(f.name for f in dataclasses.fields(RelayStageConfig))
_D1, _D2 = PRESETS["default"].first, PRESETS["default"].second


def default_network_paths() -> dict[str, str] | None:
    """Networks to use when ``--network_first`` / ``--network_second`` are left out: the bundled tiny emoji
    models (``relay_diffusion.checkpoints.bundled``) when this copy has them, else None."""
    from relay_diffusion.checkpoints.bundled import bundled_network_paths

    return bundled_network_paths()


class _SeedList(click.ParamType):
    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        from relay_diffusion.core.rng import parse_int_list

        if isinstance(value, list):
            return value
        try:
            seeds = parse_int_list(value)
        except ValueError as exc:
            self.fail(f"{value!r} is not a list of seeds like 0-63,100 ({exc})", param, ctx)
        if not seeds or min(seeds) < 0:
            self.fail(f"{value!r}: seeds must be non-negative and at least one", param, ctx)
        return seeds


class _FloatOrNone(click.ParamType):
    """A float, or ``none`` (given explicitly, unlike a left-out option)."""

    name = "FLOAT|none"
    NONE = "none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or value == self.NONE or isinstance(value, float):
            return value
        if str(value).lower() == self.NONE:
            return self.NONE
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


def _d(value: Any) -> str:
    return f"  [default: {value}, or the preset's]"


_POS = click.FloatRange(min=0, min_open=True)
_NONNEG = click.FloatRange(min=0)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--indir", metavar="DIR", type=str, help="Input images of a --sampler_stages second run")
@click.option("--outdir", metavar="DIR", type=str, required=True, help="Where to save the output images")
@click.option("--seeds", type=_SeedList(), help="Random seeds (e.g. 1,2,5-10)" + _d(PRESETS["default"].seeds))
@click.option("--subdirs", is_flag=True, help="Create a sub-folder for every 1000 seeds")
@click.option("--class", "class_idx", metavar="INT", type=click.IntRange(min=0), help="Class label  [default: seed % classes]")
@click.option("--batch", "max_batch_size", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True,
              help="Maximum batch size")
@click.option("--sampler_stages", type=click.Choice(["first", "second", "both"]), default="both", show_default=True,
              help="Which stages to run")
# first stage
@click.option("--network_first", metavar="PATH", type=str, help="Stage-1 network (.safetensors, .pkl or .pt)")
@click.option("--num_steps_first", type=click.IntRange(min=1), help="Stage-1 sampling steps" + _d(_D1.num_steps))
@click.option("--sigma_min_first", type=_POS, help="Lowest noise level" + _d(_D1.sigma_min))
@click.option("--sigma_max_first", type=_POS, help="Highest noise level" + _d(_D1.sigma_max))
@click.option("--rho_first", type=_POS, help="Time step exponent" + _d(_D1.rho))
@click.option("--cfg_scale_first", type=_NONNEG, help="Classifier-free guidance scale" + _d(_D1.cfg_scale))
@click.option("--S_churn", "S_churn_first", type=_NONNEG, help="Stochasticity strength" + _d(_D1.S_churn))
@click.option("--S_min", "S_min_first", type=_NONNEG, help="Stoch. min noise level" + _d(_D1.S_min))
@click.option("--S_max", "S_max_first", type=_NONNEG, help="Stoch. max noise level" + _d(_D1.S_max))
@click.option("--S_noise", "S_noise_first", type=float, help="Stoch. noise inflation" + _d(_D1.S_noise))
@click.option("--sde_scale_first", type=_FloatOrNone(), help="SDE steps with g = sde_scale * t (SPEC 6b); "
              "'none' = Heun steps" + _d("none"))
# second stage
@click.option("--network_second", metavar="PATH", type=str, help="Stage-2 network (.safetensors, .pkl or .pt)")
@click.option("--num_steps_second", type=click.IntRange(min=1), help="Stage-2 steps before truncation" + _d(_D2.num_steps))
@click.option("--sigma_min_second", type=_POS, help="Lowest noise level" + _d(_D2.sigma_min))
@click.option("--sigma_max_second", type=_POS, help="Highest noise level" + _d(_D2.sigma_max))
@click.option("--blur_sigma_max_second", type=_NONNEG, help="Maximum blur strength" + _d(_D2.blur_sigma_max))
@click.option("--rho_second", type=_POS, help="Time step exponent" + _d(_D2.rho))
@click.option("--cfg_scale_second", type=_NONNEG, help="Classifier-free guidance scale" + _d(_D2.cfg_scale))
@click.option("--up_scale_second", type=click.IntRange(min=1), help="Relay factor: stage-2 / stage-1 resolution"
              + _d(_D2.up_scale))
@click.option("--truncation_sigma_second", type=_POS, help="Truncation point of the noise schedule"
              + _d(_D2.truncation_sigma))
@click.option("--truncation_t_second", type=_POS, help="Truncation point of the time schedule" + _d(_D2.truncation_t))
@click.option("--s_block_second", type=_NONNEG, help="Strength of block noise" + _d(_D2.s_block))
@click.option("--s_noise_second", type=click.FloatRange(0, 1), help="Strength of stochasticity" + _d(_D2.s_noise))
@click.option("--churn_second/--no-churn_second", default=None, help="EDM churn inside the relay sampler (CelebA-HQ)"
              + _d("off"))
@click.option("--S_churn_second", "S_churn_second", type=_NONNEG, help="Stage-2 churn strength (with --churn_second)" + _d(_D2.S_churn))
@click.option("--S_min_second", "S_min_second", type=_NONNEG, help="Stage-2 churn min noise level" + _d(_D2.S_min))
@click.option("--S_max_second", "S_max_second", type=_NONNEG, help="Stage-2 churn max noise level" + _d(_D2.S_max))
@click.option("--S_noise_second", "S_noise_second", type=float, help="Stage-2 churn noise inflation" + _d(_D2.S_noise))
# new
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
              help="The reference's settings for: generate.py (default), generate_imagenet.py, generate_celebahq.py")
@click.option("--enhance/--no-enhance", default=None, help="PIL post-processing of the preset (imagenet256, "
              "celebahq256)  [default: on with those presets, except for --sampler_stages first]")
@click.option("--device", type=str, help="cpu, cuda, cuda:N, ...  [default: cuda if available, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Network precision on CUDA  "
              "[default: the network's own]")
@click.option("--net_batch", type=click.IntRange(min=1), default=DEFAULT_NET_BATCH, show_default=True,
              help="Samples per network call; results depend on it, never on --batch (1 = exact on any hardware)")
@click.option("--grid", is_flag=True, help="Also write outdir/grid.png of the first 256 seeds")
@click.option("--overwrite", is_flag=True, help="Regenerate seeds whose PNG already exists")
def generate(**opts: Any) -> None:
    """Generate images: stage 1 (EDM) relayed into stage 2 (blur diffusion), one PNG per seed.

    \b
    Examples:
      rdm generate --outdir=out --network_first=a.pkl --network_second=b.pt --seeds=0-63
      torchrun --standalone --nproc_per_node=8 -m relay_diffusion generate --preset=imagenet256 \\
          --outdir=out --network_first=imagenet64.pkl --network_second=imagenet256.pt
    """
    from relay_diffusion.generation.pipeline import generate_images, save_seed_grid

    preset = PRESETS[opts["preset"]]
    stages_kind = opts["sampler_stages"]
    first, second = _stage_configs(preset, opts)
    seeds = opts["seeds"] if opts["seeds"] is not None else _parse_seeds(preset.seeds)
    enhancement = _enhancement(preset, opts["enhance"], stages_kind)
    stages = ("first", "second") if stages_kind == "both" else (stages_kind,)
    paths = network_paths(opts["network_first"], opts["network_second"], stages)
    if stages_kind == "second" and not opts["indir"]:
        raise click.UsageError("--sampler_stages second needs --indir (the stage-1 images)")

    from relay_diffusion.utils import distributed

    try:
        ctx = distributed.init(opts["device"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    rank, world_size, device = ctx.rank, ctx.world_size, ctx.device
    try:
        pipeline = _build_pipeline(paths, first, second, enhancement, opts, device)
        if rank == 0:
            _print_config(opts, pipeline, seeds, device, world_size)
        try:
            generate_images(
                pipeline, seeds, opts["outdir"], max_batch_size=opts["max_batch_size"], class_idx=opts["class_idx"],
                indir=opts["indir"], subdirs=opts["subdirs"], overwrite=opts["overwrite"], rank=rank,
                world_size=world_size, progress=rank == 0,
            )
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
        distributed.barrier()
        if rank == 0:
            if opts["grid"]:
                click.echo(f"Grid: {save_seed_grid(opts['outdir'], seeds, opts['subdirs'])}")
            click.echo("Done.")
    finally:
        distributed.shutdown()


def _parse_seeds(text: str) -> list[int]:
    from relay_diffusion.core.rng import parse_int_list

    return parse_int_list(text)


def _stage_configs(preset: Any, opts: dict[str, Any]) -> tuple[EDMStageConfig, RelayStageConfig]:
    """The preset's stage configs with every option that was given on the command line."""
    first = {k: opts[f"{k}_first"] for k in FIRST_FIELDS if opts.get(f"{k}_first") is not None}
    if first.get("sde_scale") == _FloatOrNone.NONE:
        first["sde_scale"] = None
    second = {k: opts[f"{k}_second"] for k in SECOND_FIELDS if opts.get(f"{k}_second") is not None}
    first_cfg = dataclasses.replace(preset.first, **first)
    second_cfg = dataclasses.replace(preset.second, **second)
    try:
        first_cfg.validate("_first")
        second_cfg.validate("_second")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return first_cfg, second_cfg


def _enhancement(preset: Any, enhance: bool | None, stages_kind: str) -> Any:
    """The preset's post-processing: on for final images unless --no-enhance; stage-1-only outputs (inputs
    of a later --sampler_stages second run) get it only with an explicit --enhance."""
    from relay_diffusion.generation.pipeline import Enhancement

    on = enhance if enhance is not None else stages_kind != "first"
    return preset.enhancement if on else Enhancement()


def network_paths(network_first: str | None, network_second: str | None,
                  stages: tuple[str, ...] = ("first", "second")) -> dict[str, str]:
    """The networks of ``stages`` (``'first'``, ``'second'``). The bundled ones stand in only when no network
    is given at all: a network of the user's is never paired with a bundled one."""
    given = {"first": network_first, "second": network_second}
    any_given = network_first or network_second
    defaults = {} if any_given else (default_network_paths() or {})
    paths = {}
    for which in stages:
        path = given[which] or defaults.get(which)
        if not path:
            why = ("when the other network is given" if any_given
                   else "(this copy of relay-diffusion has no bundled networks; recipes/emoji.sh trains them)")
            raise click.UsageError(f"--network_{which} is required {why}")
        paths[which] = path
    return paths


def _build_pipeline(paths: dict[str, str], first: EDMStageConfig, second: RelayStageConfig, enhancement: Any,
                    opts: dict[str, Any], device: Any) -> Any:
    from relay_diffusion.checkpoints.loading import load_network
    from relay_diffusion.generation.pipeline import EDMStage, RelayPipeline, RelayStage

    nets = {}
    for which, path in paths.items():
        try:
            nets[which] = load_network(path, device)
        except (ValueError, OSError, pickle.UnpicklingError) as exc:
            raise click.BadParameter(str(exc), param_hint=f"--network_{which}") from exc
        if opts["precision"] is not None:
            if not hasattr(nets[which], "precision"):
                raise click.BadParameter(f"{path}: this network has no precision setting", param_hint="--precision")
            nets[which].precision = opts["precision"]
    stages = ([EDMStage(nets["first"], first)] if "first" in nets else []) + (
        [RelayStage(nets["second"], second)] if "second" in nets else []
    )
    try:
        return RelayPipeline(stages, enhancement=enhancement, net_batch=opts["net_batch"])
    except ValueError as exc:
        raise click.UsageError(f"{exc}\n(check --network_first, --network_second and --up_scale_second)") from exc


def _print_config(opts: dict[str, Any], pipeline: Any, seeds: list[int], device: Any, world_size: int) -> None:
    from relay_diffusion.generation.pipeline import EDMStage

    click.echo(f"Preset: {opts['preset']}")
    for i, stage in enumerate(pipeline.stages):
        kind = "EDM" if isinstance(stage, EDMStage) else "relay"
        res = stage.resolution
        click.echo(f"Stage {i + 1} ({kind}, {res}x{res}): {json.dumps(dataclasses.asdict(stage.config))}")
    enhancement = json.dumps(dataclasses.asdict(pipeline.enhancement)) if pipeline.enhancement.enabled else "off"
    click.echo(f"Post-processing (PIL ImageEnhance): {enhancement}")
    click.echo(f"Generating {len(seeds)} images ({pipeline.resolution}x{pipeline.resolution}) to {opts['outdir']!r} "
               f"on {device} x {world_size} process(es), network batch {pipeline.net_batch}...")
