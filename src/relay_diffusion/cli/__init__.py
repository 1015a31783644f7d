"""The ``rdm`` command line. Each sub-command lives in its own module and is imported only when used,
so ``rdm dataset`` does not pay for importing the training code and vice versa."""

from __future__ import annotations

import importlib
import importlib.util

import click

from relay_diffusion.cli.forgiving import SuggestingGroup, forgive

# name -> (module, attribute, one-line help). Modules are imported lazily.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "smoke": ("relay_diffusion.cli.smoke", "smoke", "Run the core relay sampler on a toy denoiser and write an image."),
    "dataset": ("relay_diffusion.cli.dataset", "dataset", "Build EDM-format datasets (one per resolution)."),
    "train": ("relay_diffusion.cli.train", "train", "Train a stage-1 (EDM) or stage-2 (blur) model."),
    "ema": ("relay_diffusion.cli.ema", "ema", "Post-hoc EMA: rebuild any EMA length from a run's profile snapshots."),
    "generate": ("relay_diffusion.cli.generate", "generate", "Generate images by relaying stage 1 into stage 2."),
    "convert": ("relay_diffusion.cli.convert", "convert", "Convert a reference .pkl/.pt checkpoint to safetensors + JSON."),
    "evaluate": ("relay_diffusion.cli.evaluate", "evaluate", "Compute activations and FID, sFID, IS, precision/recall, KID."),
    "demo": ("relay_diffusion.cli.demo", "demo", "Write a grid of relayed samples from the bundled tiny models."),
    "export": ("relay_diffusion.cli.export", "export", "Write a pipeline folder that RelayPipeline.from_pretrained loads."),
}


class _LazyGroup(SuggestingGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in _COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        try:
            return forgive(getattr(importlib.import_module(module), attr))
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relay-diffusion")
def main() -> None:
    """Relay Diffusion Models: datasets, training, relay generation and evaluation."""
