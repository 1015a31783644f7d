"""The solver registry is the one place a solver is chosen: a new entry is a new choice everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from relay_diffusion.core import registry
from relay_diffusion.core.registry import SOLVERS, Solver, nfe_first, solver, solver_names
from relay_diffusion.generation import EDMStage, EDMStageConfig, RelayPipeline

SRC = Path(__file__).resolve().parents[1] / "src" / "relay_diffusion"


def test_no_solver_is_chosen_by_comparing_its_name_outside_the_registry():
    pattern = re.compile(r"solver\s*(==|!=|in \()")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "registry.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_defaults_and_counts_come_from_the_table():
    assert solver_names("edm") == ("heun", "multistep", "multistep3")
    assert solver_names("relay") == ("reference", "multistep", "multistep3")
    assert EDMStageConfig().solver == "heun" and nfe_first("heun", 18) == 35
    with pytest.raises(ValueError, match="solver_first must be one of heun, multistep, multistep3, got 'euler'"):
        nfe_first("euler", 18)


def test_a_new_entry_is_a_new_solver_for_configs_stages_and_counts(monkeypatch):
    calls = []

    def euler(net, latents, rng, class_labels=None, callback=None, num_steps=18, **kwargs):
        calls.append(num_steps)
        return latents.to(torch.float64) * 0

    entry = Solver("euler", "edm", euler, "first order", lambda n: n, unused=("S_churn", "sde_scale"),
                   refuses=(("sde_scale", None),))
    monkeypatch.setitem(SOLVERS, ("edm", "euler"), entry)
    assert solver("edm", "euler") is entry and "euler" in registry.solver_names("edm")
    config = EDMStageConfig(num_steps=5, solver="euler").validate()
    assert config.nfe() == 5 and "S_churn" not in config.sampler_kwargs()
    with pytest.raises(ValueError, match="takes no sde_scale"):
        EDMStageConfig(solver="euler", sde_scale=0.5).validate()
    pipe = RelayPipeline.from_bundled()
    stage = EDMStage(pipe.stages[0].net, config)
    out = RelayPipeline([stage]).run([0, 1])[0]
    assert calls == [5] and out.shape == (2, 3, 16, 16)
