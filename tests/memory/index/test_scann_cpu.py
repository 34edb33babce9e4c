"""memory.index.scann_cpu: ScaNN's SIMD kernels switched on where numpy detects the CPU features, and only there."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memory.index import scann_cpu
from memory.index.shard_index import IndexConfig, IndexKind, ShardIndex
from memory.vectors import l2_normalize

_PROBE = ("import json, scann; from memory.index import scann_cpu; own = scann_cpu.scann_cpu_flags(); "
          "scann_cpu.import_scann(); print(json.dumps([own, scann_cpu.scann_cpu_flags()]))")


def _flags_in_fresh_process(env_value):
    env = {k: v for k, v in os.environ.items() if k != "VMEM_SCANN_CPU_FEATURES"}
    if env_value is not None:
        env["VMEM_SCANN_CPU_FEATURES"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_features():
    from numpy._core._multiarray_umath import __cpu_features__  # pylint: disable=g-import-not-at-top
    return __cpu_features__


def test_import_scann_enables_exactly_the_detected_features():
    own, after = _flags_in_fresh_process(None)
    if not own:
        pytest.skip("this ScaNN build exports no SIMD flags")
    cpu = _cpu_features()
    for name, needs in scann_cpu.SCANN_FLAGS:
        # A flag ScaNN set stays set; one it left off is on exactly when numpy sees every feature it needs.
        assert after[name] == (own[name] or all(cpu.get(f, False) for f in needs)), (name, own, after)


def test_opt_out_leaves_scanns_own_flags():
    own, after = _flags_in_fresh_process("0")
    assert after == own


def test_enabled_kernels_find_the_same_neighbours():
    scann_cpu.import_scann()
    flags = scann_cpu.scann_cpu_flags()
    if not any(flags.values()):
        pytest.skip("no wider SIMD kernels on this machine")
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(4000, 64)).astype(np.float32))
    q = l2_normalize(rng.normal(size=(200, 64)).astype(np.float32))
    index = ShardIndex.build(x, IndexConfig(kind=IndexKind.TREE_AH, num_leaves=40, num_leaves_to_search=8))
    lib = scann_cpu._extension()  # pylint: disable=protected-access
    wide = index.search(q, 10)
    try:
        for name in flags:
            scann_cpu._flag(lib, name).value = False  # pylint: disable=protected-access
        narrow = index.search(q, 10)
    finally:
        for name, on in flags.items():
            scann_cpu._flag(lib, name).value = on  # pylint: disable=protected-access
    assert scann_cpu.scann_cpu_flags() == flags
    np.testing.assert_array_equal(wide[0], narrow[0])
    np.testing.assert_allclose(wide[1], narrow[1], atol=1e-5)
