"""Tests for the torch-free reader of torch's legacy checkpoint format."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from encoders import efficientnet_lite, torch_legacy


class _Storage:
    """A fake torch storage: a flat array saved after the pickles."""

    def __init__(self, key: str, data: np.ndarray, type_name: str):
        self.key, self.data, self.type_name = key, data, type_name


class _Tensor:
    """A fake tensor view; pickles exactly like torch's ``Tensor.__reduce_ex__``."""

    rebuild = None  # Set to the fake torch._utils._rebuild_tensor_v2 below.

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))

    def __reduce__(self):
        storage, offset, size, stride = self.args
        return (_Tensor.rebuild, (storage, offset, size, stride, False, collections.OrderedDict()))


@pytest.fixture
def fake_torch(monkeypatch):
    """Installs a stand-in ``torch`` module so pickle emits torch globals.

    pickle writes functions and classes by module + name and checks they can be
    re-imported, so the fake objects must live in importable modules.
    """
    torch_mod = types.ModuleType("torch")
    utils_mod = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch_mod, name, type(name, (), {"__module__": "torch"}))
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    monkeypatch.setattr(_Tensor, "rebuild", _rebuild_tensor_v2)
    return torch_mod


def _write_legacy(path: str, obj, storages: list[_Storage], torch_mod) -> None:
    """Writes ``obj`` the way ``torch.save(..., _use_new_zipfile_serialization=False)`` does."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                storage_type = getattr(torch_mod, o.type_name)
                return ("storage", storage_type, o.key, "cpu", o.data.size, None)
            return None

    with open(path, "wb") as f:
        for header in (
            torch_legacy.MAGIC_NUMBER,
            torch_legacy.PROTOCOL_VERSION,
            {"protocol_version": 1001, "little_endian": True,
             "type_sizes": {"short": 2, "int": 4, "long": 8}},
        ):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def test_reads_views_offsets_strides_and_dtypes(tmp_path, fake_torch):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=24).astype(np.float32)
    counts = np.array([7, -3], dtype=np.int64)
    shared = _Storage("1001", weights, "FloatStorage")
    longs = _Storage("1002", counts, "LongStorage")
    state = collections.OrderedDict(
        [
            # A contiguous [2, 3, 4] tensor over the whole storage.
            ("conv.weight", _Tensor(shared, 0, (2, 3, 4), (12, 4, 1))),
            # A transposed (non-contiguous) view of elements 12..23 as [4, 3].
            ("fc.weight", _Tensor(shared, 12, (4, 3), (1, 4))),
            # A 0-d tensor at an offset, and an int64 vector.
            ("scalar", _Tensor(shared, 5, (), ())),
            ("bn.num_batches_tracked", _Tensor(longs, 0, (2,), (1,))),
        ]
    )
    path = str(tmp_path / "tiny.pth")
    _write_legacy(path, state, [shared, longs], fake_torch)

    got = torch_legacy.load_state_dict(path)

    assert list(got) == list(state)
    np.testing.assert_array_equal(got["conv.weight"], weights.reshape(2, 3, 4))
    np.testing.assert_array_equal(got["fc.weight"], weights[12:].reshape(3, 4).T)
    assert got["fc.weight"].flags["C_CONTIGUOUS"]
    assert got["scalar"].shape == () and got["scalar"] == weights[5]
    np.testing.assert_array_equal(got["bn.num_batches_tracked"], counts)
    assert got["conv.weight"].dtype == np.float32
    assert got["bn.num_batches_tracked"].dtype == np.int64


def test_view_outside_storage_is_rejected(tmp_path, fake_torch):
    storage = _Storage("1", np.zeros(4, np.float32), "FloatStorage")
    path = str(tmp_path / "bad.pth")
    _write_legacy(path, {"w": _Tensor(storage, 2, (3,), (1,))}, [storage], fake_torch)
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="exceeds storage"):
        torch_legacy.load_state_dict(path)


def test_truncated_storage_is_rejected(tmp_path, fake_torch):
    storage = _Storage("1", np.arange(6, dtype=np.float32), "FloatStorage")
    path = str(tmp_path / "t.pth")
    _write_legacy(path, {"w": _Tensor(storage, 0, (6,), (1,))}, [storage], fake_torch)
    data = pathlib.Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="truncated"):
        torch_legacy.load_state_dict(path)


def test_zip_format_gets_a_clear_error(tmp_path):
    path = str(tmp_path / "new_format.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="zip-format"):
        torch_legacy.load_state_dict(path)


def test_arbitrary_globals_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    with open(path, "wb") as f:
        pickle.dump(torch_legacy.MAGIC_NUMBER, f, protocol=2)
        pickle.dump(torch_legacy.PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump({"payload": os.getcwd}, f, protocol=2)  # GLOBAL posix.getcwd
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="Refusing to unpickle"):
        torch_legacy.load_legacy(path)


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "x.pth")
    with open(path, "wb") as f:
        pickle.dump("hello", f, protocol=2)
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="magic number"):
        torch_legacy.load_state_dict(path)
    with open(path, "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(torch_legacy.TorchLegacyFormatError, match="not a torch legacy"):
        torch_legacy.load_state_dict(path)


def test_bundled_weights_file_reads_completely():
    state = torch_legacy.load_state_dict(efficientnet_lite.weights_path())
    # 16 MBConv blocks + stem/head/fc of EfficientNet-Lite0.
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].dtype == np.float32
    # Variances are never negative and every value is finite; misaligned or
    # mis-typed bytes would break both.
    assert all((state[k] >= 0).all() for k in state if k.endswith("running_var"))
    assert all(np.isfinite(v).all() for v in state.values())
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024  # Includes 42,016 BN running means/variances.
