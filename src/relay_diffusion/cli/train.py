"""``rdm train`` (and ``train.py``): the reference's training options, parsed into a TrainingConfig.

Bool options take the reference's spellings (``--fp16=1``, ``--eff-attn=True``). Every bad option is
reported once, naming it, before any work starts.
"""

from __future__ import annotations

import dataclasses

import click

from relay_diffusion.training.config import (
    ARCHS, PRECISIONS, PRECOND_CHOICES, ConfigError, TrainingConfig, merge_options, saved_config,
)
from relay_diffusion.utils.distributed import DEFAULT_TIMEOUT_MIN, LaunchError, PeerFailure

#: The defaults of the stage-2 options are the forward process's (TrainingConfig takes them from BlurProcess).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``'1,2,2'`` -> ``[1, 2, 2]``; ``''`` or ``'none'`` -> ``[]``."""
    if value is None:
        return None
    text = value.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """``'0.05,0.1'`` -> ``[0.05, 0.1]``; ``''`` or ``'none'`` -> None (off)."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _bad(exc: ConfigError) -> click.BadParameter:
    return click.BadParameter(exc.message, param_hint=f"'{exc.option}'")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
# Main options.
@click.option("--outdir", metavar="DIR", type=str, help="Where to save the results  [required]")
@click.option("--data", metavar="ZIP|DIR", type=str, help="Path to the dataset  [required]")
@click.option("--config", "config_file", metavar="JSON", type=str,
              help="Take every option not given here from a run's training_options.json (rerun, or resume "
                   "with --resume); its recorded seed is reused")
@click.option("--cond", type=bool, default=False, show_default=True, help="Train class-conditional model")
@click.option("--arch", type=click.Choice(ARCHS), default="adm", show_default=True, help="Network architecture")
@click.option("--precond", type=click.Choice(PRECOND_CHOICES), default="edm", show_default=True,
              help="Preconditioning & loss function (blur: the stage-2 relay loss; sr: a cascaded "
                   "super-resolution stage conditioned on the --up-scale times smaller image)")
# Hyperparameters.
@click.option("--duration", metavar="MIMG", type=float, default=200, show_default=True, help="Training duration")
@click.option("--batch", metavar="INT", type=int, default=512, show_default=True, help="Total batch size")
@click.option("--batch-gpu", metavar="INT", type=int, help="Limit batch size per process (accumulate gradients)")
@click.option("--cbase", metavar="INT", type=int, help="Channel multiplier  [default: varies]")
@click.option("--cres", metavar="LIST", type=str, callback=_int_list, help="Channels per resolution  [default: varies]")
@click.option("--num-blocks", metavar="INT", type=int, help="Residual blocks per resolution  [default: varies]")
@click.option("--attn", metavar="LIST", type=str, callback=_int_list,
              help="Attention resolutions ('' for none where optional)  [default: varies]")
@click.option("--lr", metavar="FLOAT", type=float, default=1e-4, show_default=True, help="Learning rate")
@click.option("--lr-rampup", metavar="MIMG", type=float, default=10, show_default=True, help="Learning rate warm-up")
@click.option("--ema", metavar="MIMG", type=float, default=0.5, show_default=True, help="EMA half-life")
@click.option("--ema-profiles", metavar="LIST", type=str, callback=_float_list,
              help="Post-hoc EMA: also track power-function EMAs of these lengths (sigma_rel, e.g. 0.05,0.10) "
                   "and save them at every --snap for `rdm ema`  [default: off]")
@click.option("--dropout", metavar="FLOAT", type=float, default=0.13, show_default=True, help="Dropout probability")
@click.option("--label-dropout", metavar="FLOAT", type=float, default=0.0, show_default=True,
              help="Probability of dropping the class label (classifier-free guidance)")
@click.option("--augment", metavar="FLOAT", type=float, default=0.0, show_default=True, help="Augment probability")
@click.option("--xflip", type=bool, default=False, show_default=True, help="Enable dataset x-flips")
# Performance-related.
@click.option("--fp16", type=bool, default=False, show_default=True, help="Enable mixed-precision training")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Network precision (overrides --fp16; bf16 also on the CPU)")
@click.option("--ls", metavar="FLOAT", type=float, default=1, show_default=True, help="Loss scaling")
@click.option("--bench", type=bool, default=True, show_default=True, help="Enable cuDNN benchmarking")
@click.option("--cache", type=bool, default=False, show_default=True,
              help="Decode the dataset once into a file that every process of the machine memory-maps (one copy "
                   "per machine, shared by all ranks and workers; refused if larger than the available memory). "
                   "Off: loader workers decode images as they are read and keep none")
@click.option("--cache-dir", metavar="DIR", type=str,
              help="Where --cache keeps the decoded copy (a local disk)  [default: ~/.cache/relay-diffusion/datasets]")
@click.option("--workers", metavar="INT", type=click.IntRange(min=0),
              help="DataLoader worker processes per process  [default: 2, fewer if the machine has under 3 cores "
                   "per process]")
@click.option("--compile", type=bool, default=False, show_default=True, help="torch.compile the network")
@click.option("--channels-last", type=bool, default=False, show_default=True, help="Channels-last memory format")
@click.option("--tf32/--no-tf32", default=None, help="TF32 matrix products and convolutions on CUDA  [default: on "
              "with --precision fp16/bf16, off with fp32]")
@click.option("--eff-attn", type=bool, default=False,
              help="Accepted for compatibility: attention always runs through SDPA, laid out for the fused kernels "
                   "(flash / memory-efficient on CUDA)")
@click.option("--device", metavar="STR", type=str, help="cpu, cuda, cuda:N, mps  [default: cuda if available]")
@click.option("--timeout", metavar="MIN", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_MIN,
              show_default=True, help="With several processes: minutes a process waits for the others at a "
                                      "collective before it stops with an error")
# I/O-related.
@click.option("--desc", metavar="STR", type=str, help="String to include in result dir name")
@click.option("--nosubdir", is_flag=True, help="Do not create a subdirectory for results")
@click.option("--tick", metavar="KIMG", type=float, default=50, show_default=True, help="How often to print progress")
@click.option("--snap", metavar="TICKS", type=click.IntRange(min=1), default=50, show_default=True,
              help="How often to save snapshots")
@click.option("--dump", metavar="TICKS", type=click.IntRange(min=1), default=500, show_default=True,
              help="How often to dump state")
@click.option("--checkpoint-minutes", metavar="MIN", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Also a snapshot and a resumable state at least this often, in wall-clock minutes (a kill never "
                   "loses more; 0: only at --snap / --dump)")
@click.option("--grid", metavar="INT", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images in the sample grid of every snapshot (0: none)")
@click.option("--seed", metavar="INT", type=int, help="Random seed  [default: random]")
@click.option("--transfer", metavar="SAFETENSORS", type=str, help="Transfer learning from network snapshot")
@click.option("--resume", metavar="DIR|PT", type=str, help="Resume: a run folder (latest state) or a state file")
@click.option("-n", "--dry-run", is_flag=True, help="Print training options and exit")
# Stage 2 (precond blur or sr).
@click.option("--up-scale", metavar="INT", type=int, default=_DEFAULTS["up_scale"], show_default=True, help="Relay factor")
@click.option("--noise-aug", metavar="FLOAT", type=float, default=_DEFAULTS["noise_aug"], show_default=True,
              help="sr: largest noise-conditioning augmentation level of the low-resolution input (0: off)")
@click.option("--block-scale", metavar="FLOAT", type=float, default=_DEFAULTS["block_scale"], show_default=True,
              help="Block noise strength")
@click.option("--prob-length", metavar="FLOAT", type=float, default=_DEFAULTS["prob_length"], show_default=True,
              help="Part of the noise distribution covered by stage 2")
@click.option("--blur-sigma-max", metavar="FLOAT", type=float, default=_DEFAULTS["blur_sigma_max"], show_default=True,
              help="Maximum blur strength")
@click.pass_context
def train(ctx: click.Context, config_file: str | None, fp16: bool, precision: str | None, eff_attn: bool,
          dry_run: bool, timeout: float, **opts) -> None:
    """Train a stage-1 (EDM) or stage-2 (blur) relay diffusion model.

    \b
    Examples:
      rdm train --outdir=training-runs --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
      torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
          --data=datasets/imagenet-256x256.zip --cond=1 --batch=4096 --batch-gpu=8 --lr=1e-4 \\
          --dropout=0.1 --fp16=1 --ls=1 --arch=adm --precond=blur --up-scale=4 --block-scale=0.15 \\
          --prob-length=0.93 --blur-sigma-max=3.0
    """
    from relay_diffusion.training import NonFiniteLossError, plan_training, preview_run_dir, run_training
    from relay_diffusion.utils.accel import resolve_tf32

    del eff_attn  # attention always runs through scaled_dot_product_attention, laid out for the fused kernels
    if precision is not None and fp16 and precision != "fp16":
        raise click.BadParameter(f"{precision} contradicts --fp16=1", param_hint="'--precision'")
    opts["precision"] = precision or ("fp16" if fp16 else "fp32")
    try:
        given = {name for name in (*opts, "fp16") if _given(ctx, name)}
        if "fp16" in given:
            given.add("precision")
        if config_file is not None:
            opts = merge_options(saved_config(config_file), opts, given)
        if opts.get("resume"):  # options left out continue with the resumed run's own
            saved = _resumed_options(opts["resume"])
            if saved is not None:
                opts = merge_options(saved, opts, given | {"resume"})
        opts["tf32"] = resolve_tf32(opts["precision"], opts.get("tf32"))  # recorded with the run
        for name in ("outdir", "data"):
            if opts[name] is None:
                raise ConfigError(f"--{name}", "missing (give it, or --config with a run's training_options.json)")
        plan = plan_training(TrainingConfig(**opts))
    except ConfigError as exc:
        raise _bad(exc) from None
    except LaunchError as exc:  # e.g. a stale WORLD_SIZE without the rest of torchrun's environment
        raise click.ClickException(str(exc)) from None
    if dry_run:
        click.echo(plan.to_json(preview_run_dir(plan)))
        return
    from relay_diffusion.training.rundir import RunFolderBusy

    try:
        run_training(plan, timeout_min=timeout)
    except PeerFailure as exc:
        if exc.reported:  # the failing process prints its own error; this one only exits with failure
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(str(exc)) from None
    except ConfigError as exc:  # found only once the training state is read (e.g. --ema-profiles on resume)
        raise _bad(exc) from None
    except (NonFiniteLossError, RunFolderBusy, LaunchError) as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, OSError) as exc:  # e.g. a damaged dataset image found while training (in a worker)
        from relay_diffusion.utils.errors import one_line

        raise click.ClickException(one_line(exc)) from None


def _resumed_options(resume: str) -> dict | None:
    """The config of the run that ``--resume`` names (a run folder or a state file), or None."""
    import os

    from relay_diffusion.training.plan import saved_run_config
    from relay_diffusion.training.state import latest_intact_state

    if os.path.isdir(resume):
        state, _ = latest_intact_state(resume)
        return saved_run_config(str(state), True) if state is not None else None
    return saved_run_config(resume, False) if os.path.isfile(resume) else None


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was set on the command line (or the environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (click.core.ParameterSource.DEFAULT,
                                                 click.core.ParameterSource.DEFAULT_MAP)
