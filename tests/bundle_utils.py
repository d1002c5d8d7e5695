"""What the command-line tests share: the bundle root, the ``monai.bundle`` command, a tiny network."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_CMD = [sys.executable, "-m", "monai.bundle"]
# the 2.5D U-Net at test size: 4 directions (subsets of 2 in training), a 3-level 2D U-Net of 4-16 channels
TINY_NET = [
    "--num_directions", "4",
    "--num_subset", "2",
    "--network_def#channels", "[4,8,16]",
    "--network_def#strides", "[2,2]",
    "--network_def#num_res_units", "1",
]
TINY_NET_OVERRIDES = {"num_directions": 4, "num_subset": 2, "network_def#channels": [4, 8, 16],
                      "network_def#strides": [2, 2], "network_def#num_res_units": 1}


def run(args, cwd=ROOT, env=None, check=True, timeout=300):
    """Run a command line; with ``check`` a non-zero exit fails the test with the ends of its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def synthetic_data(folder, num_cases=5, seed=0, size="24"):
    """Write ``num_cases`` synthetic cases of ``size`` (``"24"`` or ``"[H,W,D]"``) with the data command; returns ``folder``."""
    run([sys.executable, "-m", "scripts.synthetic", "--output_dir", str(folder), "--num_cases", str(num_cases),
         "--seed", str(seed), "--size", str(size)])
    return str(folder)
