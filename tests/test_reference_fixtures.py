"""Every case of the reference fixture set, dispatched on its ``kind`` (docs/math.md §12).

The folder comes from ``$RDM_FIXTURES`` (default: the repository's copy, ``tests/fixtures``); a missing
folder is a failure.
Nothing here depends on case names or on the particular settings of the shipped set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fixtures_dir
from relay_diffusion.core import blur as forward
from relay_diffusion.core import losses
from relay_diffusion.core.process import REFERENCE_SAMPLING_NAMES, BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import edm_sampler, relay_sampler
from relay_diffusion.core.toy import GaussianToyDenoiser

SAMPLER_RTOL = 1e-6
NETWORK_RTOL = 1e-5


def _load():
    folder = fixtures_dir()
    if not (folder / "reference.json").is_file() or not (folder / "reference.npz").is_file():
        pytest.fail(f"reference fixtures (reference.json, reference.npz) not found in {folder} (RDM_FIXTURES)")
    meta = json.loads((folder / "reference.json").read_text())
    arrays = np.load(folder / "reference.npz")
    return meta["cases"], {k: arrays[k] for k in arrays.files}


CASES, ARRAYS = _load() if fixtures_dir().is_dir() else ({}, {})


def test_fixture_folder_present():
    _load()  # fails, rather than skips, when the folder is missing
    assert CASES, "the fixture set has no cases"


def rel_err(actual, expected) -> float:
    a = np.asarray(torch.as_tensor(actual).detach().cpu(), dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def arr(case: str, field: str) -> torch.Tensor:
    return torch.from_numpy(np.array(ARRAYS[f"{case}/{field}"]))


def one_hot_labels(seeds, label_dim: int):
    if not label_dim:
        return None
    return F.one_hot(torch.tensor([s % label_dim for s in seeds]), label_dim).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Forward process


def check_dct(name, case):
    p, x = case["patch"], arr(name, "x")
    assert rel_err(forward.dct(x, p), ARRAYS[f"{name}/dct"]) < SAMPLER_RTOL
    assert rel_err(forward.idct(x, p), ARRAYS[f"{name}/idct"]) < SAMPLER_RTOL


def check_blur(name, case):
    x, out = arr(name, "x"), ARRAYS[f"{name}/out"]
    for i, b in enumerate(case["blur_sigmas"]):
        got = forward.blur(x, b, case["patch"], case.get("min_scale", forward.MIN_SCALE))
        assert rel_err(got, out[i]) < SAMPLER_RTOL, f"blur sigma {b}"


def check_block_noise(name, case):
    rng = SeedGenerators(case["seeds"])
    eps = rng.randn(case["shape"][1:], dtype=torch.float64)
    assert rel_err(forward.block_noise(eps, case["patch"]), ARRAYS[f"{name}/out"]) < SAMPLER_RTOL


def check_blur_schedule(name, case):
    t, expected = arr(name, "t"), ARRAYS[f"{name}/alpha"]
    a = forward.blur_schedule(t, case["patch"], case["blur_sigma_max"], case["prob_length"],
                              case.get("min_scale", forward.MIN_SCALE))
    assert rel_err(forward.tile_factors(a, *expected.shape[-2:]), expected) < SAMPLER_RTOL


def check_blur_loss(name, case):
    process = BlurProcess(up_scale=case["up_scale"], prob_length=case["prob_length"],
                          blur_sigma_max=case["blur_sigma_max"], block_scale=case["block_scale"],
                          min_scale=case["min_scale"])
    cfg = losses.BlurLossConfig(
        process=process, P_mean=case["P_mean"], P_std=case["P_std"],
        sigma_data=case["sigma_data"], truncate_sigma=case["truncate_sigma"],
    )
    u, y = arr(name, "u"), arr(name, "y")
    sigma, b, weight = losses.blur_loss_levels(u, cfg)
    assert rel_err(sigma, ARRAYS[f"{name}/sigma"]) < SAMPLER_RTOL
    assert rel_err(b, ARRAYS[f"{name}/blur_sigma"]) < SAMPLER_RTOL
    assert rel_err(weight, ARRAYS[f"{name}/weight"]) < SAMPLER_RTOL
    noisy = losses.blur_loss_input(y, sigma, b, arr(name, "eps"), arr(name, "eps_block"), cfg)
    assert rel_err(noisy, ARRAYS[f"{name}/noisy"]) < SAMPLER_RTOL


# ----------------------------------------------------------------------------------------------------------
# Samplers with the exact Gaussian denoiser (docs/math.md §12); chained cases share generators (docs/math.md §8).

_STATE: dict[str, tuple[SeedGenerators, torch.Tensor]] = {}


def run_sampler_case(name: str):
    if name in _STATE:
        return _STATE[name]
    case = CASES[name]
    seeds, label_dim = case["seeds"], case.get("label_dim", 0)
    labels = one_hot_labels(seeds, label_dim)
    kwargs = dict(case["kwargs"])
    if case["kind"] == "edm_sampler":
        res = case["res"]
        channels = ARRAYS[f"{name}/out"].shape[1]
        net = GaussianToyDenoiser(channels, res, label_dim)
        rng = SeedGenerators(seeds)
        latents = rng.randn([channels, res, res])
        sde_scale = kwargs.pop("sde_scale", None)
        if case.get("variant") == "sde":
            kwargs.pop("cfg_scale", None)  # no CFG in the SDE variant (docs/math.md §6b)
            out = edm_sampler(net, latents, rng, labels, sde_scale=sde_scale, **kwargs)
        else:
            out = edm_sampler(net, latents, rng, labels, **kwargs)
    else:
        if case.get("continues"):
            rng, low = run_sampler_case(case["continues"])
        else:
            rng, low = SeedGenerators(seeds), arr(name, "low")
        latents = F.interpolate(low.to(torch.float64), scale_factor=case["up_scale"], mode="nearest")
        net = GaussianToyDenoiser(latents.shape[1], latents.shape[-1], label_dim)
        process, kwargs = split_process_kwargs(kwargs, up_scale=case["up_scale"])
        out = relay_sampler(net, latents, rng, labels, process=process, churn=case.get("variant") == "churn",
                            **kwargs)
    _STATE[name] = (rng, out)
    return rng, out


def split_process_kwargs(kwargs, **extra):
    """The reference's relay-sampler keyword arguments -> (:class:`BlurProcess`, the sampler's own)."""
    process = {REFERENCE_SAMPLING_NAMES[k]: kwargs[k] for k in kwargs if k in REFERENCE_SAMPLING_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in REFERENCE_SAMPLING_NAMES}
    return BlurProcess(**process, **extra), rest


def check_sampler(name, case):
    if f"{name}/low" in ARRAYS and case.get("continues"):  # the chained input itself is part of the check
        _, low = run_sampler_case(case["continues"])
        assert rel_err(low, ARRAYS[f"{name}/low"]) < SAMPLER_RTOL
    _, out = run_sampler_case(name)
    assert out.dtype == torch.float64
    assert rel_err(out, ARRAYS[f"{name}/out"]) < SAMPLER_RTOL


# ----------------------------------------------------------------------------------------------------------
# Networks


def check_network(name, case):
    from relay_diffusion.networks.precond import build_network

    net = build_network(case["precond"], **case["config"])
    prefix = f"{name}/weights/"
    state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in ARRAYS.items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    net.eval()
    x, sigma = arr(name, "x"), arr(name, "sigma")
    labels = arr(name, "labels") if f"{name}/labels" in ARRAYS else None
    aug = arr(name, "augment_labels") if f"{name}/augment_labels" in ARRAYS else None
    with torch.no_grad():
        out = net(x, sigma, class_labels=labels, augment_labels=aug)
        # The reference's unconditional call (as in classifier-free guidance) of a conditional network also
        # leaves out the augmentation labels; an unconditional network keeps them.
        conditional = case["config"].get("label_dim", 0) > 0
        out_nl = net(x, sigma, class_labels=None, augment_labels=None if conditional else aug)
    assert out.dtype == torch.float32
    assert rel_err(out, ARRAYS[f"{name}/out"]) < NETWORK_RTOL
    if f"{name}/out_no_label" in ARRAYS:
        assert rel_err(out_nl, ARRAYS[f"{name}/out_no_label"]) < NETWORK_RTOL


CHECKS = {
    "dct": check_dct,
    "blur": check_blur,
    "block_noise": check_block_noise,
    "blur_schedule": check_blur_schedule,
    "blur_loss": check_blur_loss,
    "edm_sampler": check_sampler,
    "relay_sampler": check_sampler,
    "network": check_network,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name):
    case = CASES[name]
    kind = case["kind"]
    assert kind in CHECKS, f"unknown fixture kind {kind!r} in case {name!r}"
    CHECKS[kind](name, case)
