"""The command line forgives the two spellings of an option and a misspelt command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO
from relay_diffusion.cli import main as rdm
from relay_diffusion.cli.forgiving import respell


def test_respell_takes_the_declared_spelling_only_where_one_exists():
    known = {"--num_steps_first", "--batch-gpu", "--enhance", "--no-enhance"}
    assert respell(["--num-steps-first", "4", "--batch_gpu=8", "--no_enhance", "--other-thing", "--", "--batch_gpu"],
                   known) == ["--num_steps_first", "4", "--batch-gpu=8", "--no-enhance", "--other-thing", "--",
                              "--batch_gpu"]


def test_both_spellings_run_the_same_generation(tmp_path):
    def run(folder, *flags):
        res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path / folder}", "--seeds=0", "--device=cpu",
                                       *flags])
        assert res.exit_code == 0, res.output
        return (tmp_path / folder / "000000.png").read_bytes()

    assert run("a", "--num-steps-first", "3", "--num-steps-second=3", "--sampler-stages=first") == \
        run("b", "--num_steps_first", "3", "--num_steps_second=3", "--sampler_stages=first")


@pytest.mark.parametrize("args, needle", [(["generat"], "Did you mean 'generate'?"),
                                          (["evaluate", "fd"], "Did you mean 'fid'?")])
def test_a_misspelt_command_gets_a_suggestion(args, needle):
    res = CliRunner().invoke(rdm, args)
    assert res.exit_code == 2 and needle in res.output


@pytest.mark.parametrize("command", ["generate", "export", "train", "dataset", "evaluate fid", "ema"])
def test_help_shows_no_empty_range(command):
    res = CliRunner().invoke(rdm, [*command.split(), "--help"])
    assert res.exit_code == 0 and "None]" not in res.output


def test_the_reference_scripts_forgive_too(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "generate.py"), f"--outdir={tmp_path}", "--seeds=0",
                          "--num-steps-first=2", "--sampler-stages=first", "--device=cpu"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "000000.png").is_file()


@pytest.mark.parametrize("command, sections", [
    ("generate", ["Input and output:", "Networks:", "Guidance:", "Stage 1 sampler:",
                  "Relay stage sampler and forward process:", "Performance and devices:"]),
    ("train", ["Data and output:", "Network:", "Optimisation:", "Performance and devices:"]),
])
def test_long_helps_come_in_sections_with_every_option_placed(command, sections):
    out = CliRunner().invoke(rdm, [command, "--help"]).output
    positions = [out.index(s) for s in sections]
    assert positions == sorted(positions)
    other = out[out.index("Other options:"):]
    assert [line.split()[0] for line in other.splitlines()[1:] if line.startswith("  -")] == ["-h,"]


def test_one_network_alone_is_answered_with_the_option_that_was_meant(tmp_path):
    from relay_diffusion.checkpoints.bundled import bundled_network_paths

    paths = bundled_network_paths()
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path}", f"--network_first={paths['first']}"])
    assert res.exit_code == 2 and "add --sampler_stages first" in res.output
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path}", f"--network_second={paths['second']}"])
    assert res.exit_code == 2 and "add --sampler_stages second with --indir" in res.output
