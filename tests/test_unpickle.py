"""The one restricted unpickler (checkpoints/unpickle.py): every reader's policy refuses code by name.

Each payload would run a command (or evaluate an expression) if :mod:`pickle` loaded it; the policies of the
reference checkpoints, the Inception pickle and the CIFAR-10 batches must refuse it with an error naming the
global, before anything runs.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from relay_diffusion.checkpoints.reference import REFERENCE_POLICY
from relay_diffusion.checkpoints.unpickle import (
    Stub,
    UnpicklePolicy,
    UnsafePickleError,
    pickle_module,
    restricted_load,
)
from relay_diffusion.data.sources import CIFAR_POLICY
from relay_diffusion.metrics.detector import INCEPTION_PICKLE_POLICY

POLICIES = {"reference": REFERENCE_POLICY, "inception": INCEPTION_PICKLE_POLICY, "cifar": CIFAR_POLICY}


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the global the error must name)."""
    code = f"open({str(marker)!r}, 'w')"
    system = os.system.__module__  # posix or nt
    return {
        "os.system": (pickle.dumps({"x": _System(marker)}, protocol=4), rf"{system}\.system"),
        "os.system, protocol 2": (pickle.dumps([_System(marker)], protocol=2), rf"{system}\.system"),
        "builtins.eval": (b"cbuiltins\neval\n(V%s\ntR." % code.encode(), r"builtins\.eval"),
        "builtins.exec": (b"cbuiltins\nexec\n(V%s\ntR." % code.encode(), r"builtins\.exec"),
        "__builtin__.eval (Python 2 name)": (b"c__builtin__\neval\n(V%s\ntR." % code.encode(), r"builtins\.eval"),
        "builtins.getattr": (b"cbuiltins\ngetattr\n(cbuiltins\nobject\nV__subclasses__\ntR.", r"builtins\.getattr"),
        "subprocess.check_output": (b"csubprocess\ncheck_output\n((Vtrue\nltR.", r"subprocess\.check_output"),
    }


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_every_policy_refuses_code_by_name(tmp_path, policy_name):
    policy, marker = POLICIES[policy_name], tmp_path / "executed"
    for what, (data, name) in _payloads(marker).items():
        with pytest.raises(UnsafePickleError, match=rf"refusing to load {name} from {policy.what}") as err:
            restricted_load(io.BytesIO(data), policy)
        assert isinstance(err.value, pickle.UnpicklingError), what
    assert not marker.exists()


def test_refusal_happens_in_find_class_and_the_error_names_the_file_kind():
    with pytest.raises(UnsafePickleError) as err:
        REFERENCE_POLICY.find("os", "system")
    assert str(err.value).startswith("refusing to load os.system from a reference checkpoint: it is not needed for")
    assert "refusing to load posix.getcwd from a CIFAR-10 batch" in _message(CIFAR_POLICY, "posix", "getcwd")


def _message(policy: UnpicklePolicy, module: str, name: str) -> str:
    with pytest.raises(UnsafePickleError) as err:
        policy.find(module, name)
    return str(err.value)


def test_inception_policy_stubs_classes_without_importing_them():
    """Classes of the Inception pickle become inert records (its own classes live in source never run)."""
    sys.modules.pop("colorsys", None)
    cls = INCEPTION_PICKLE_POLICY.find("colorsys", "SomeNetwork")
    assert issubclass(cls, Stub) and cls.pickled_name == "colorsys.SomeNetwork" and "colorsys" not in sys.modules
    obj = cls(1, a=2)
    obj.__setstate__({"_modules": {}})
    assert (obj.args, obj.kwargs, obj.state) == ((1,), {"a": 2}, {"_modules": {}})
    assert INCEPTION_PICKLE_POLICY.find("subprocess", "Popen").pickled_name == "subprocess.Popen"  # inert, not Popen
    for policy in (REFERENCE_POLICY, CIFAR_POLICY):  # the other policies refuse unknown classes too
        with pytest.raises(UnsafePickleError, match=r"types\.SimpleNamespace"):
            policy.find("types", "SimpleNamespace")


def test_torch_load_goes_through_the_policy(tmp_path):
    import torch

    marker = tmp_path / "executed"
    torch.save({"w": torch.arange(3.0), "evil": _System(marker)}, tmp_path / "x.pt")
    with pytest.raises(UnsafePickleError, match=r"system"):
        torch.load(tmp_path / "x.pt", weights_only=False, pickle_module=pickle_module(REFERENCE_POLICY))
    torch.save({"w": torch.arange(3.0)}, tmp_path / "ok.pt")
    ok = torch.load(tmp_path / "ok.pt", weights_only=False, pickle_module=pickle_module(REFERENCE_POLICY))
    assert torch.equal(ok["w"], torch.arange(3.0)) and not marker.exists()


def test_reading_cifar_does_not_import_torch():
    code = "import sys, relay_diffusion.data.sources; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
