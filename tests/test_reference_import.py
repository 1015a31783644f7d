"""Reference ``.pkl`` / ``.pt`` checkpoints (docs/math.md §10) load by name and never execute their contents.

The test writes the reference's format itself: every project module is pickled as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src,
class_name, state}``, where ``module_src`` and the (temporary, fake) reconstruct function would both
create a marker file if they ever ran.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from relay_diffusion.cli import main as rdm
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.checkpoints.reference import UnsafeCheckpointError, load_reference_checkpoint, load_reference_network
from test_generate import STAGE1_OPTIONS, STAGE2_OPTIONS, read_pngs, tiny_network

pytestmark = pytest.mark.usefixtures("single_thread")

CONTAINERS = (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)


@contextlib.contextmanager
def fake_persistence_module(marker: Path):
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` importable while pickling. Calling it (as
    plain ``pickle.load`` would) creates ``marker``; the module is gone again when loading."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        marker.write_text("reconstruct function executed")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    saved = {name: sys.modules.get(name) for name in (package.__name__, module.__name__)}
    sys.modules.update({package.__name__: package, module.__name__: module})
    try:
        yield _reconstruct_persistent_obj
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def reference_init_kwargs(net: torch.nn.Module) -> dict:
    """The top-level ``_init_kwargs`` as the reference's train.py records them (plus its ``eff_attn``)."""
    kwargs = {k: v for k, v in net.init_kwargs.items() if k != "precision"}
    kwargs["dropout"] = np.float64(kwargs["dropout"])  # a numpy scalar, as reference configs may hold
    kwargs["eff_attn"] = False
    return kwargs


def make_reference_pickler(marker: Path, reconstruct, evil=None):
    """A Pickler class writing project modules in the reference's persistent-object format."""
    module_src = f"open({str(marker)!r}, 'w').write('module_src executed')\n"

    class ReferencePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and not isinstance(obj, CONTAINERS):
                state = {k: v for k, v in obj.__dict__.items()
                         if k.startswith("_") or isinstance(v, (bool, int, float, str, type(None)))}
                is_top = hasattr(obj, "sigma_data") or hasattr(obj, "beta_d") or hasattr(obj, "C_1")
                state["_init_args"] = ()
                state["_init_kwargs"] = reference_init_kwargs(obj) if is_top else dict(getattr(obj, "init_kwargs", {}))
                if "skip_scale" in state:
                    state["skip_scale"] = np.float64(state["skip_scale"])
                if is_top and evil is not None:
                    state["payload"] = evil
                meta = dict(type="class", version=4, module_src=module_src, class_name=type(obj).__name__,
                            state=state)
                return reconstruct, (meta,)
            return NotImplemented

    return ReferencePickler


def write_reference_pkl(path: Path, net, marker: Path, protocol: int = 4, evil=None) -> None:
    with fake_persistence_module(marker) as reconstruct:
        buf = io.BytesIO()
        make_reference_pickler(marker, reconstruct, evil)(buf, protocol=protocol).dump(
            dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(resolution=net.img_resolution))
        )
    path.write_bytes(buf.getvalue())


def write_reference_pt(path: Path, net, marker: Path) -> None:
    with fake_persistence_module(marker) as reconstruct:
        module = types.SimpleNamespace(__name__="pickle", Pickler=make_reference_pickler(marker, reconstruct))
        torch.save(dict(ema=net, net=net, optimizer_state=dict(state={}, param_groups=[]), step=123), path,
                   pickle_module=module)


class Evil:
    """A payload that runs a shell command when unpickled by plain pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_same_network(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("protocol", [2, 4])
def test_pkl_loads_by_name_without_running_code(tmp_path, protocol):
    marker = tmp_path / "executed"
    net = tiny_network(8, label_dim=3, seed=1)
    write_reference_pkl(tmp_path / "net.pkl", net, marker, protocol)
    assert b"module_src executed" in (tmp_path / "net.pkl").read_bytes()  # the payload is really there
    loaded = load_reference_network(tmp_path / "net.pkl")
    assert_same_network(loaded, net)
    assert loaded.init_kwargs == net.init_kwargs
    assert not marker.exists()
    assert "torch_utils" not in sys.modules


def test_pt_loads_and_keeps_other_entries(tmp_path):
    marker = tmp_path / "executed"
    net = tiny_network(16, label_dim=3, seed=2)
    write_reference_pt(tmp_path / "state.pt", net, marker)
    data = load_reference_checkpoint(tmp_path / "state.pt")
    assert data["step"] == 123 and data["ema"].class_name == "EDMPrecond"
    assert_same_network(load_network(tmp_path / "state.pt"), net)
    assert not marker.exists()


def test_plain_pickle_would_have_run_the_payload(tmp_path):
    """Control: the files really are dangerous for ``pickle.load`` (with torch_utils importable)."""
    marker = tmp_path / "executed"
    write_reference_pkl(tmp_path / "net.pkl", tiny_network(8, seed=1), marker)
    with fake_persistence_module(marker):
        pickle.loads((tmp_path / "net.pkl").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_reduce_payload_is_refused_by_name(tmp_path, protocol):
    marker = tmp_path / "executed"
    write_reference_pkl(tmp_path / "net.pkl", tiny_network(8, seed=1), marker, protocol, evil=Evil(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        load_reference_network(tmp_path / "net.pkl")
    exec_payload = pickle.dumps({"ema": types.SimpleNamespace()}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"types\.SimpleNamespace"):
        load_reference_checkpoint(_write(tmp_path / "ns.pkl", exec_payload))
    builtins_payload = b"cbuiltins\nexec\n(Vopen('%s', 'w')\ntR." % str(marker).encode()
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec"):
        load_reference_checkpoint(_write(tmp_path / "exec.pkl", builtins_payload))
    assert not marker.exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unknown_network_class_is_named(tmp_path):
    marker = tmp_path / "executed"
    net = tiny_network(8, seed=1)
    net.__class__ = type("MysteryPrecond", (type(net),), {})
    write_reference_pkl(tmp_path / "net.pkl", net, marker)
    with pytest.raises(ValueError, match="MysteryPrecond"):
        load_reference_network(tmp_path / "net.pkl")


def test_reference_checkpoints_give_the_same_images(tmp_path):
    """Reference-format .pkl (stage 1) and .pt (stage 2) generate the same files as the project's own
    safetensors snapshots of the same weights."""
    marker = tmp_path / "executed"
    first, second = tiny_network(8, label_dim=3, seed=1), tiny_network(16, label_dim=3, seed=2)
    write_reference_pkl(tmp_path / "first.pkl", first, marker)
    write_reference_pt(tmp_path / "second.pt", second, marker)
    from relay_diffusion.checkpoints.snapshot import save_network

    save_network(first, tmp_path / "first.safetensors")
    save_network(second, tmp_path / "second.safetensors")
    common = ["--seeds=0-3", "--up_scale_second=2", *STAGE1_OPTIONS, *STAGE2_OPTIONS]
    runner = CliRunner()
    for name, (a, b) in {"ref": ("first.pkl", "second.pt"), "own": ("first.safetensors", "second.safetensors")}.items():
        result = runner.invoke(rdm, ["generate", f"--outdir={tmp_path / name}", f"--network_first={tmp_path / a}",
                                     f"--network_second={tmp_path / b}", *common])
        assert result.exit_code == 0, result.output
    assert read_pngs(tmp_path / "ref") == read_pngs(tmp_path / "own")
    assert not marker.exists()


def test_convert_writes_safetensors_and_json(tmp_path):
    marker = tmp_path / "executed"
    net = tiny_network(16, label_dim=0, seed=3)
    write_reference_pt(tmp_path / "state.pt", net, marker)
    result = CliRunner().invoke(rdm, ["convert", str(tmp_path / "state.pt"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.json").is_file()
    assert_same_network(load_network(tmp_path / "out.safetensors"), net)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("out.safetensors", "out.json"):  # the usual permissions, not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not marker.exists()
    bad = CliRunner().invoke(rdm, ["convert", str(_write(tmp_path / "x.pkl", pickle.dumps(Evil(marker)))), "y"])
    assert bad.exit_code != 0 and "system" in bad.output
    assert not marker.exists()
