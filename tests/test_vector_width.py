"""The CPU kernels at the vector widths this machine does not pick.

:mod:`nbdw.simd` sizes its vectors from the target: 64 bytes with AVX-512, 32 with AVX2. A test
run therefore exercises only its own machine's width, and a kernel that assumes 16 float32
lanes (or that a multiplier of 8 fits in a float64 vector) would pass there and fail on the
other kind. This module reruns the kernel path tests of ``test_cpu_kernels.py`` and the lane
test of ``test_simd.py`` in a child process for each other width (32 and 64 bytes; 16 only
where it is the native one), forced with ``NBDW_VECTOR_BYTES``. LLVM lowers every width on any
x86 target (wider vectors as pairs of registers), so each width runs on every CI machine, and
with it both tap loops: 64-byte vectors slide inputs in registers (``nbdw.cpu.SLIDE``), narrower
ones load them per tap. The child gets a Numba cache directory of its own: Numba's cache key
does not see the width.
"""

import os
import subprocess
import sys

import pytest

from nbdw import simd

HERE = os.path.dirname(os.path.abspath(__file__))
OTHER_WIDTHS = [w for w in (32, 64) if w != simd.VECTOR_BYTES]

# Every kernel path at float32; channel groups and streaming stores also at float64 (half the
# lanes: multipliers 8 and 16 no longer fit a vector) and float16; the flat-row forward at both
# accumulator dtypes.
SELECTION = ("block_and_tail or channel_groups or work_units or select_lanes"
             " or (fewer_channels and (float32 or float64))")


@pytest.mark.parametrize("width", OTHER_WIDTHS)
def test_kernel_paths_at_another_vector_width(width, tmp_path):
    env = dict(os.environ, NBDW_VECTOR_BYTES=str(width), NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    probe = subprocess.run([sys.executable, "-c", "import nbdw.simd as s, nbdw.cpu as c, numpy as np; "
                            "print(s.VECTOR_BYTES, c._lanes(np.float32), c._lanes(np.float64), c.SLIDE)"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [str(width), str(width // 4), str(width // 8), str(width == 64)]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(HERE, "test_cpu_kernels.py"), os.path.join(HERE, "test_simd.py"),
                          "-k", SELECTION],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"at {width}-byte vectors:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary
