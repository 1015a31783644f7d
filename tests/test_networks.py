"""Networks and preconditioning (docs/math.md §7): layouts, fixtures, round trips, precision, labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import fixtures_dir, missing_fixtures_message, read_fixtures
from relay_diffusion.networks.layers import init_weights, self_attention
from relay_diffusion.networks.precond import PRECONDS, arch_config, build_network, iddpm_grid
from relay_diffusion.networks.unets import DhariwalUNet, SongUNet

RTOL = 1e-5


def _fixtures():
    """Network cases, layouts and arrays of the fixture folder (conftest); None when it is missing."""
    found = read_fixtures()
    if found is None:
        return None, {}, {}, {}
    meta, arrays = found
    cases = {k: c for k, c in meta["cases"].items() if c["kind"] == "network"}
    return meta, cases, meta.get("layouts", {}), arrays


FIXTURE_META, NET_CASES, LAYOUTS, ARRAYS = _fixtures()
# a fixture set without network cases skips these tests; a missing folder fails test_fixture_folder_present
needs_fixtures = pytest.mark.skipif(not NET_CASES, reason=f"no network cases in the fixtures of {fixtures_dir()}")


def rel_err(actual: torch.Tensor, expected) -> float:
    """max |a - b| / max(1, max |b|)."""
    a = actual.detach().double().cpu().numpy()
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def tiny_config(model_type: str, resolution: int = 16, label_dim: int = 0, **extra) -> dict:
    common = dict(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type=model_type,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], dropout=0.0, augment_dim=9)
    size = dict(model_channels=16) if model_type == "SongUNet" else dict(model_channels=32, channel_mult_emb=2)
    return {**common, **size, **extra}


def inputs(n: int = 2, resolution: int = 16, label_dim: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, resolution, resolution, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g))
    labels = torch.nn.functional.one_hot(torch.arange(n) % max(label_dim, 1), max(label_dim, 1)).float()
    aug = torch.randn(n, 9, generator=g)
    return x, sigma, (labels if label_dim else None), aug


def randomised(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Draw every parameter (zero-initialised ones included) so that all paths affect the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


# --------------------------------------------------------------------------------------------------
# Reference fixtures


def test_fixture_folder_present():
    if FIXTURE_META is None:
        pytest.fail(missing_fixtures_message())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_names_and_shapes(name):
    layout = LAYOUTS[name]
    with torch.device("meta"):
        net = build_network(layout["precond"], **layout["config"])
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(got) == list(layout["params"])
    assert got == layout["params"]


@needs_fixtures
def test_iddpm_grid_matches_reference_buffer():
    for name, case in NET_CASES.items():
        key = f"{name}/weights/u"
        if case["precond"] == "iDDPMPrecond" and key in ARRAYS:
            # float32 step by step, like the reference; the vectorised float32 sin differs in the last bit
            # between CPUs (SIMD paths), which the recurrence amplifies to ~1e-6 relative
            want = torch.from_numpy(np.array(ARRAYS[key]))
            torch.testing.assert_close(iddpm_grid(0.001, 0.008, 1000), want, rtol=4e-6, atol=0)
            # a float64 evaluation is 5e-4 off: the check can tell the two apart
            assert not torch.allclose(_iddpm_grid_float64(), want, rtol=4e-6, atol=0)


def _iddpm_grid_float64(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> torch.Tensor:
    j = torch.arange(M + 1, dtype=torch.float64)
    alpha_bar = (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)
    u = torch.zeros(M + 1, dtype=torch.float64)
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / ratio[i - 1] - 1).sqrt()
    return u.float()


# --------------------------------------------------------------------------------------------------
# Construction, round trips and configuration


ROUND_TRIP = [
    ("EDMPrecond", tiny_config("DhariwalUNet", label_dim=10)),
    ("iDDPMPrecond", tiny_config("DhariwalUNet")),
    ("VPPrecond", tiny_config("SongUNet", label_dim=4)),
    ("VEPrecond", tiny_config("SongUNet", embedding_type="fourier", encoder_type="residual",
                              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    ("edm", tiny_config("SongUNet", encoder_type="skip", decoder_type="skip", attn_resolutions=[])),
]


@pytest.mark.parametrize("precond,config", ROUND_TRIP, ids=[p for p, _ in ROUND_TRIP])
def test_round_trip_from_init_kwargs(precond, config):
    net = randomised(build_network(precond, **config))
    kwargs = json.loads(json.dumps(net.init_kwargs))
    assert kwargs == net.init_kwargs and "model_type" in kwargs
    again = build_network(type(net).__name__, **kwargs).eval()
    assert again.init_kwargs == net.init_kwargs
    assert list(again.state_dict()) == list(net.state_dict())
    again.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels, aug = inputs(label_dim=config["label_dim"])
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels, augment_labels=aug), again(x, sigma, labels, augment_labels=aug))


def test_init_weights_depends_on_generator_only():
    config = tiny_config("SongUNet", embedding_type="fourier")
    a = init_weights(build_network("VEPrecond", **config), torch.Generator().manual_seed(3))
    b = init_weights(build_network("VEPrecond", **config), torch.Generator().manual_seed(3))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_meta_build_then_init_weights():
    config = tiny_config("DhariwalUNet")
    with torch.device("meta"):
        net = build_network("iDDPMPrecond", **config)
    net = init_weights(net.to_empty(device="cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(net.u, iddpm_grid(0.001, 0.008, 1000))
    resample = [v for k, v in net.state_dict().items() if k.endswith("resample_filter")]
    assert resample and all(torch.allclose(f, torch.full_like(f, 0.25)) for f in resample)
    x, sigma, _, aug = inputs()
    with torch.no_grad():
        assert torch.isfinite(net(x, sigma, augment_labels=aug)).all()


@pytest.mark.parametrize("arch,resolution,model_type,channels", [
    ("ddpmpp", 32, "SongUNet", 128), ("ncsnpp", 32, "SongUNet", 128),
    ("adm", 64, "DhariwalUNet", 192), ("adm", 256, "DhariwalUNet", 256),
])
def test_arch_config(arch, resolution, model_type, channels):
    config = arch_config(arch, resolution)
    assert config["model_type"] == model_type and config["model_channels"] == channels
    with torch.device("meta"):
        build_network("EDMPrecond", img_resolution=resolution, img_channels=3, **config)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="ddpmpp"):
        arch_config("unet", 64)
    with pytest.raises(ValueError, match="EDMPrecond"):
        build_network("Precond", img_resolution=16, img_channels=3)
    with pytest.raises(ValueError, match="precision"):
        build_network("edm", precision="fp8", **tiny_config("DhariwalUNet"))
    with pytest.raises(ValueError, match="model_type"):
        build_network("edm", **{**tiny_config("DhariwalUNet"), "model_type": "UNet"})
    with pytest.raises(ValueError, match="encoder_type"):
        build_network("ve", **tiny_config("SongUNet", encoder_type="fancy"))
    with pytest.raises(ValueError, match="img_resolution"):
        build_network("edm", **tiny_config("DhariwalUNet", resolution=15))
    with pytest.raises(TypeError):
        build_network("edm", **tiny_config("DhariwalUNet", model_chanels=8))


# --------------------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("option", [dict(precision="bf16"), dict(precision="fp16"), dict(use_fp16=True)])
def test_reduced_precision_is_cuda_only(option):
    config = tiny_config("DhariwalUNet", label_dim=10)
    ref = randomised(build_network("EDMPrecond", **config))
    net = build_network("EDMPrecond", **config, **option).eval()
    net.load_state_dict(ref.state_dict())
    x, sigma, labels, aug = inputs(label_dim=10)
    with torch.no_grad():
        out = net(x, sigma, labels, augment_labels=aug)
        assert out.dtype == torch.float32
        assert torch.equal(out, ref(x, sigma, labels, augment_labels=aug))
        assert torch.equal(out, net(x.double(), sigma.double(), labels, augment_labels=aug))


@pytest.mark.parametrize("model_type,resolution,extra", [
    ("SongUNet", 24, dict(channel_mult=[1, 2, 2], encoder_type="residual", resample_filter=[1, 3, 3, 1],
                          embedding_type="fourier", channel_mult_noise=2)),
    ("SongUNet", 24, dict(encoder_type="skip", decoder_type="skip")),
    ("DhariwalUNet", 48, dict(channel_mult=[1, 1, 2, 2])),
    ("DhariwalUNet", 24, dict(channel_mult=[1, 2, 2])),
])
def test_other_resolutions(model_type, resolution, extra):
    net = randomised(build_network("EDMPrecond", **tiny_config(model_type, resolution, label_dim=3, **extra)))
    x, sigma, labels, aug = inputs(2, resolution, label_dim=3)
    with torch.no_grad():
        out = net(x, sigma, labels, augment_labels=aug)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_no_label_means_zero_label(model_type):
    net = randomised(build_network("EDMPrecond", **tiny_config(model_type, label_dim=5)))
    x, sigma, labels, aug = inputs(3, label_dim=5)
    with torch.no_grad():
        none = net(x, sigma, None, augment_labels=aug)
        assert torch.equal(none, net(x, sigma, torch.zeros_like(labels), augment_labels=aug))
        assert not torch.allclose(none, net(x, sigma, labels, augment_labels=aug))
        raw = net.model(x, sigma.log() / 4, None, augment_labels=aug)
        assert torch.equal(raw, net.model(x, sigma.log() / 4, torch.zeros_like(labels), augment_labels=aug))


def test_forward_leaves_global_rng_alone():
    net = build_network("EDMPrecond", **tiny_config("SongUNet", label_dim=5, label_dropout=0.5))
    assert net.model.label_dropout == 0.5
    net.train()  # dropout 0: training mode must still draw nothing
    x, sigma, labels, aug = inputs(label_dim=5)
    state = torch.get_rng_state()
    net(x, sigma, labels, augment_labels=aug)
    assert torch.equal(state, torch.get_rng_state())


def test_scalar_sigma_broadcasts():
    net = randomised(build_network("VPPrecond", **tiny_config("SongUNet")))
    x, _, _, aug = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, 0.5, augment_labels=aug), net(x, torch.full((2,), 0.5), augment_labels=aug))


def test_iddpm_round_sigma():
    net = build_network("iddpm", **tiny_config("DhariwalUNet"))
    u = net.u
    sigma = torch.tensor([u[10] * 1.001, u[500] * 0.999, 1e9, 0.0])
    assert torch.equal(net.round_sigma(sigma), torch.stack([u[10], u[500], u[0], u[-1]]))
    assert net.sigma_max == float(u[0]) and net.sigma_min == float(u[net.M - 1])
    assert torch.equal(build_network("edm", **tiny_config("DhariwalUNet")).round_sigma(sigma), sigma)


def test_multi_head_attention_matches_explicit_softmax():
    """Head split ``[head, C / heads, (q, k, v)]`` and scale ``1 / sqrt(C / heads)``, softmax in float32."""
    g = torch.Generator().manual_seed(0)
    n, c, heads, h, w = 2, 12, 3, 4, 5
    qkv = torch.randn(n, 3 * c, h, w, generator=g)
    q, k, v = qkv.reshape(n, heads, c // heads, 3, h * w).unbind(3)  # [N, heads, C', HW]
    logits = torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(c // heads)
    expected = torch.einsum("nhqk,nhck->nhcq", logits.softmax(dim=-1), v).reshape(n, c, h, w)
    assert torch.allclose(self_attention(qkv, heads), expected, atol=1e-6)


def test_preconds_registry():
    assert {"EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "edm", "vp", "ve", "iddpm"} <= set(PRECONDS)
    assert PRECONDS["iddpm"] is PRECONDS["iDDPMPrecond"]
    assert isinstance(build_network("ve", **tiny_config("SongUNet")).model, SongUNet)
    assert isinstance(build_network("edm", **tiny_config("DhariwalUNet")).model, DhariwalUNet)


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_backbone_runs_in_bfloat16(model_type):
    """The reduced-precision path of the layers (weights cast to the input dtype), exercised on the CPU."""
    net = randomised(build_network("EDMPrecond", **tiny_config(model_type, label_dim=5))).model
    x, sigma, labels, aug = inputs(label_dim=5)
    with torch.no_grad():
        ref = net(x, sigma.log() / 4, labels, augment_labels=aug)
        out = net(x.bfloat16(), sigma.log() / 4, labels, augment_labels=aug)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref.numpy()) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cuda(precision):
    config = tiny_config("DhariwalUNet", label_dim=10)
    ref = randomised(build_network("EDMPrecond", **config)).cuda()
    net = build_network("EDMPrecond", precision=precision, **config).cuda().eval()
    net.load_state_dict(ref.state_dict())
    x, sigma, labels, aug = (t.cuda() for t in inputs(label_dim=10))
    with torch.no_grad():
        out = net(x, sigma, labels, augment_labels=aug)
        exact = ref(x, sigma, labels, augment_labels=aug)
        assert out.dtype == torch.float32
        assert torch.equal(net(x, sigma, labels, force_fp32=True, augment_labels=aug), exact)
    assert rel_err(out, exact.cpu().numpy()) < 0.1


def test_architecture_presets_are_typed_and_the_imagenet256_network_is_named():
    import dataclasses

    from relay_diffusion.networks.precond import ARCH_PRESETS, arch_config, arch_preset

    assert all(dataclasses.is_dataclass(p) for p in ARCH_PRESETS.values())
    assert arch_preset("adm", 256) is ARCH_PRESETS["adm-imagenet256"] and arch_preset("adm", 64) is ARCH_PRESETS["adm"]
    assert arch_config("adm", 256) == dict(model_type="DhariwalUNet", model_channels=256,
                                           channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2)
    assert arch_config("ddpmpp", 256)["model_type"] == "SongUNet"  # only ADM has a resolution-specific preset
    for name, preset in ARCH_PRESETS.items():
        with torch.device("meta"):
            net = build_network("EDMPrecond", img_resolution=32, img_channels=3, **preset.kwargs())
        assert sum(p.numel() for p in net.parameters()) > 1e6, name
    with pytest.raises(ValueError, match="arch must be one of"):
        arch_preset("unet", 64)
