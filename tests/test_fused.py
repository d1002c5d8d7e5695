"""The fused C++ kernels of M and R agree with the pure-PyTorch operators (scripts/fused.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from parameterized import parameterized

from bundle_utils import ROOT
from scripts import fused
from scripts.geometry import detector_size
from scripts.net import UNet25D
from scripts.operators import REDUCTIONS, Backprojection, Projection

KERNELS = fused.ops()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the fused kernels cannot be built here (no C++ compiler?)")

CASES = []
for h, w, d in [(8, 8, 4), (67, 93, 41), (31, 12, 7), (2, 3, 1), (40, 40, 16)]:
    for p, directions in [(1, None), (5, None), (8, [0, 3, 7])]:
        for b, c in [(1, 1), (2, 3)]:
            CASES.append([h, w, d, p, directions, b, c])


@needs_kernels
@parameterized.expand([case + [r] for case in CASES for r in REDUCTIONS])
def test_projection_agrees(h, w, d, p, directions, b, c, reduction):
    x = torch.randn(b, c, h, w, d)
    m = Projection(reduction)
    with fused.disabled():
        expected = m(x, p, directions)
    got = m(x, p, directions)
    # the same samples; a sum may add them in another order
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 if reduction == "sum" else 1e-6)


@needs_kernels
@parameterized.expand(CASES)
def test_backprojection_agrees(h, w, d, p, directions, b, k):
    n = p if directions is None else len(directions)
    q = torch.randn(b, n, k, detector_size(h, w), d)
    r = Backprojection()
    with fused.disabled():
        expected = r(q, h, w, p, directions)
    assert torch.allclose(r(q, h, w, p, directions), expected, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_adjoint(dtype):
    """Fused R keeps the dtype and is still the transpose of R* (the dot-product test)."""
    h, w, d, p = 23, 17, 5, 6
    q = torch.randn(1, p, 2, detector_size(h, w), d, dtype=dtype)
    v = torch.randn(1, 2, h, w, d, dtype=dtype)
    r = Backprojection()
    rq = r(q, h, w, p)
    assert rq.dtype == dtype
    lhs, rhs = (rq * v).sum(), (q * r.adjoint(v, p)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@needs_kernels
def test_training_gradients_agree():
    """A two-path step gives the same gradients with and without the fused kernels."""
    torch.manual_seed(0)
    net = UNet25D(num_directions=4, reduction=["max", "sum"], channels=(4, 8), strides=(2,), num_res_units=1)
    x, y = torch.rand(1, 1, 19, 14, 8), (torch.rand(1, 1, 19, 14, 8) > 0.8).float()

    def grads() -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(1)  # the same random subset of directions
        out = net(x, num_subset=2)
        ((out - y) ** 2).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    fast = grads()
    with fused.disabled():
        slow = grads()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast, slow))


def test_switched_off(monkeypatch, caplog):
    monkeypatch.setenv(fused.ENV_VAR, "0")
    with caplog.at_level(logging.INFO, logger="scripts.fused"):
        assert fused._build() is None
    assert fused.ENV_VAR in caplog.text


def test_failed_build_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("error: no C++ compiler found")

    monkeypatch.delenv(fused.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="scripts.fused"):
        assert fused._build() is None
    assert "no C++ compiler found" in caplog.text and "pure-PyTorch" in caplog.text


def test_build_directory_names_the_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = fused.build_directory()
    assert folder.startswith(str(tmp_path)) and torch.__version__.split("+")[0] in folder


def test_build_directory_follows_the_sources(monkeypatch, tmp_path):
    """The build folder is named by the sources' hash: the same sources anywhere share it, others do not."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = fused.build_directory()
    copy = tmp_path / "elsewhere" / "operators.cpp"
    copy.parent.mkdir()
    shutil.copyfile(fused.SOURCE, copy)
    monkeypatch.setattr(fused, "SOURCE", str(copy))
    assert fused.build_directory() == here
    copy.write_text(copy.read_text() + "\n// another version\n")
    assert fused.build_directory() != here and fused.build_directory().startswith(str(tmp_path))


def test_first_build_is_announced(monkeypatch, tmp_path, caplog):
    """A build folder without the library logs that a compilation starts, with the folder, and compiles a copy of the source."""
    import torch.utils.cpp_extension

    seen = {}

    def interrupted(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("interrupted")

    monkeypatch.delenv(fused.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", interrupted)
    with caplog.at_level(logging.INFO, logger="scripts.fused"):
        assert fused._build() is None
    build = fused.build_directory()
    assert f"compiling the fused M/R kernels in {build}" in caplog.text
    assert seen["build_directory"] == build and seen["sources"] == [os.path.join(build, "operators.cpp")]
    with open(seen["sources"][0]) as copy, open(fused.SOURCE) as original:
        assert copy.read() == original.read()


@needs_kernels
def test_copied_bundle_does_not_rebuild(tmp_path):
    """The bundle's code copied to another folder loads the kernels the repository built: nothing is recompiled."""
    library = os.path.join(fused.build_directory(), "unet25d_mra_ops.so")
    before = os.path.getmtime(library)
    shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import logging; logging.basicConfig(level=logging.INFO); import scripts.fused as f; "
              "assert f.ops() is not None; print(f.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "scripts" / "fused.py")
    assert f"loading the fused M/R kernels from {fused.build_directory()}" in result.stderr
    assert "compiling" not in result.stderr
    assert os.path.getmtime(library) == before


def test_not_for_other_dtypes():
    assert fused.available(torch.zeros(1, dtype=torch.float16)) is None
    assert fused.available(torch.zeros(1, dtype=torch.int64)) is None


@needs_kernels
def test_disabled_block():
    x = torch.zeros(1)
    assert fused.available(x) is not None
    with fused.disabled():
        assert fused.available(x) is None
        with fused.disabled():
            assert fused.available(x) is None
        assert fused.available(x) is None
    assert fused.available(x) is not None
