"""The solver registry: one table of every sampler a stage can use, looked up by (stage kind, name).

Stages call ``solver(kind, name).sampler``; the sampler settings take their ``--solver_*`` choices, their checks
and their network-evaluation count from here; the command line's choices and help come from the same entries.
Adding a solver is one :class:`Solver` in :data:`SOLVERS`.

Kinds: ``"edm"`` (stage 1 and the super-resolution stages, EDM's grid from pure noise) and ``"relay"`` (a relay
stage: the blur process from the previous stage's upsampled output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from relay_diffusion.core.predictor_corrector import multistep3_edm_sampler, multistep3_relay_sampler
from relay_diffusion.core.samplers import edm_sampler, relay_sampler, relay_time_steps
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler

#: The stage kinds that have solvers.
KINDS = ("edm", "relay")


@dataclass(frozen=True)
class Solver:
    """One sampler of one stage kind."""

    name: str
    kind: str                                   # "edm" or "relay"
    sampler: Callable                           # the function a stage calls (uniform signature per kind)
    help: str                                   # one line for --help
    evaluations: Callable[[int], int]           # denoiser evaluations for a grid of N steps (after truncation)
    unused: tuple[str, ...] = ()                # sampler settings it has no use for (left out of its kwargs)
    refuses: tuple[tuple[str, object], ...] = ()  # (setting, its only allowed value): what it cannot do


SOLVERS: dict[tuple[str, str], Solver] = {}  # filled below, in the order shown in help


def _register(*solvers: Solver) -> None:
    for s in solvers:
        SOLVERS[(s.kind, s.name)] = s


_register(
    Solver("heun", "edm", edm_sampler, "the reference's sampler (2 NFE per step)", lambda n: 2 * n - 1),
    Solver("multistep", "edm", multistep_edm_sampler, "DPM-Solver++(2M)-style, 1 NFE per step, deterministic",
           lambda n: n, unused=("S_churn", "S_min", "S_max", "S_noise", "sde_scale"),
           refuses=(("S_churn", 0.0), ("sde_scale", None))),
    Solver("multistep3", "edm", multistep3_edm_sampler,
           "third-order multistep predictor-corrector (UniPC-style), 1 NFE per step, deterministic", lambda n: n,
           unused=("S_churn", "S_min", "S_max", "S_noise", "sde_scale"), refuses=(("S_churn", 0.0), ("sde_scale", None))),
    Solver("reference", "relay", relay_sampler, "the reference's relay sampler (2 NFE per step)",
           lambda n: 2 * n - 1),
    Solver("multistep", "relay", multistep_relay_sampler, "second order with 1 NFE per step", lambda n: n,
           unused=("churn", "S_churn", "S_min", "S_max", "S_noise"), refuses=(("churn", False),)),
    Solver("multistep3", "relay", multistep3_relay_sampler,
           "third-order predictor-corrector, 1 NFE per step, deterministic (needs s_noise 0)", lambda n: n,
           unused=("churn", "S_churn", "S_min", "S_max", "S_noise"), refuses=(("churn", False), ("s_noise", 0.0))),
)


def solver_names(kind: str) -> tuple[str, ...]:
    """The solvers of a stage kind, in registry order (the first is the default)."""
    return tuple(name for k, name in SOLVERS if k == kind)


def solver(kind: str, name: str, setting: str = "solver") -> Solver:
    """The :class:`Solver` ``name`` of stage kind ``kind``; a ``ValueError`` naming ``setting`` and the choices
    otherwise."""
    found = SOLVERS.get((kind, name))
    if found is None:
        raise ValueError(f"{setting} must be one of {', '.join(solver_names(kind))}, got {name!r}")
    return found


def solver_help(kind: str) -> str:
    """``name: help; name: help`` for the command line."""
    return "; ".join(f"{s.name}: {s.help}" for (k, _), s in SOLVERS.items() if k == kind)


#: The solvers of stage 1 and of a relay stage (``--solver_first``, ``--solver_second``).
SOLVERS_FIRST = solver_names("edm")
SOLVERS_SECOND = solver_names("relay")


def nfe_first(name: str, num_steps: int) -> int:
    """Denoiser evaluations of stage 1 (network calls are twice as many with classifier-free guidance)."""
    return solver("edm", name, "solver_first").evaluations(num_steps)


def nfe_second(name: str, num_steps: int, sigma_min: float = 0.008, sigma_max: float = 80.0, rho: float = 7.0,
               truncation_sigma: float = 0.9, net: object = None) -> int:
    """Denoiser evaluations of a relay stage: its grid after truncation has ``N'`` steps."""
    found = solver("relay", name, "solver_second")
    return found.evaluations(len(relay_time_steps(num_steps, sigma_min, sigma_max, rho, truncation_sigma, net)) - 1)
