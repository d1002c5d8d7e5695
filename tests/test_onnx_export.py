"""ONNX export of the 2.5D U-Net with dynamic H, W, D, through the bundle's own command line.

``python -m scripts.export onnx_export`` (MONAI's ``onnx_export``, then the metadata embedded)
on a tiny checkpoint, then onnxruntime in a fresh process (no project code, no torch model) on volumes of other sizes than the exported
example, compared with the eager network. The operators are also checked under
``torch.export`` alone: the exported graph follows the input's size and gives the eager values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch's ONNX exporter (dynamo=True) writes the graph with it
pytest.importorskip("onnxruntime")

from bundle_utils import ROOT, TINY_NET, TINY_NET_OVERRIDES, run  # noqa: E402

from scripts import fused  # noqa: E402
from scripts.operators import Backprojection, Projection  # noqa: E402

EXPORT_SHAPE = [1, 1, 19, 22, 13]
OTHER_SHAPES = [(1, 1, 23, 17, 11), (1, 1, 40, 9, 4), (1, 1, 3, 3, 3)]
DYNAMIC = {"image": {2: "H", 3: "W", 4: "D"}, "pred": {2: "H", 3: "W", 4: "D"}}


def tiny_net():
    """The inference config's network with the tiny overrides, weights perturbed off their initialisation."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update(TINY_NET_OVERRIDES)
    net = parser.get_parsed_content("network_def")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    net = tiny_net()
    ckpt, onnx_path = str(tmp / "model.pt"), str(tmp / "model.onnx")
    torch.save(net.state_dict(), ckpt)
    # MONAI's onnx_export, then the bundle's metadata into the file (scripts.export)
    run([sys.executable, "-m", "scripts.export",
        "onnx_export", "network_def", "--filepath", onnx_path,
        "--ckpt_file", ckpt, "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--input_shape", json.dumps(EXPORT_SHAPE),
        "--converter_kwargs", repr({"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": DYNAMIC}),
    ] + TINY_NET, timeout=600)
    return {"tmp": tmp, "net": net, "onnx": onnx_path}


def test_graph_has_dynamic_spatial_axes(exported):
    import onnx

    model = onnx.load(exported["onnx"])
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[2:]] == ["H", "W", "D"], value.name
    assert [v.name for v in model.graph.input] == ["image"]
    assert [v.name for v in model.graph.output] == ["pred"]


def test_onnxruntime_matches_eager_on_other_sizes(exported):
    tmp = exported["tmp"]
    inputs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(OTHER_SHAPES)]
    for i, x in enumerate(inputs):
        np.save(tmp / f"x{i}.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime
        session = onnxruntime.InferenceSession({exported['onnx']!r}, providers=["CPUExecutionProvider"])
        for i in range({len(inputs)}):
            x = np.load({str(tmp)!r} + f"/x{{i}}.npy")
            np.save({str(tmp)!r} + f"/y{{i}}.npy", session.run(["pred"], {{"image": x}})[0])
        import json
        json.dump(session.get_modelmeta().custom_metadata_map, open({str(tmp)!r} + "/props.json", "w"))
        assert not any(m == "scripts" or m.startswith("scripts.") or m == "torch" for m in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, x in enumerate(inputs):
        with torch.no_grad():
            expected = exported["net"](x)
        actual = torch.from_numpy(np.load(tmp / f"y{i}.npy"))
        assert actual.shape == x.shape
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"input shape {tuple(x.shape)}")
    # the metadata, as onnxruntime reads it without the bundle
    props = json.load(open(tmp / "props.json"))
    assert json.loads(props["metadata.json"]) == json.load(open(os.path.join(ROOT, "configs", "metadata.json")))
    assert json.loads(props["inference.json"]) == json.load(open(os.path.join(ROOT, "configs", "inference.json")))
    assert props["version"] == json.load(open(os.path.join(ROOT, "configs", "metadata.json")))["version"]


def test_embed_metadata_replaces_and_names_missing_files(exported, tmp_path):
    """Embedding again keeps one entry per key (the newer metadata) and the graph; a missing file is named."""
    import onnx

    from scripts.export import embed_metadata, read_metadata

    copy = str(tmp_path / "model.onnx")
    onnx.save(onnx.load(exported["onnx"]), copy)
    meta = json.load(open(os.path.join(ROOT, "configs", "metadata.json")))
    changed = tmp_path / "metadata.json"
    changed.write_text(json.dumps({**meta, "version": "9.9.9"}))
    embed_metadata(copy, meta_file=str(changed))
    model = onnx.load(copy)
    assert [p.key for p in model.metadata_props].count("metadata.json") == 1
    assert read_metadata(copy)["version"] == "9.9.9" and model.doc_string == meta["description"]
    assert len(model.graph.node) == len(onnx.load(exported["onnx"]).graph.node)
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        embed_metadata(copy, config_file=str(tmp_path / "no_such.json"))


class ProjectBackproject(torch.nn.Module):
    """``R(M(x))`` with the net's direction bookkeeping, small enough to export in seconds."""

    def __init__(self, reduction: str, num_directions: int = 5) -> None:
        super().__init__()
        self.projection = Projection(reduction)
        self.backprojection = Backprojection()
        self.num_directions = num_directions

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.projection(x, self.num_directions)
        y = self.backprojection(q[:, :, :1], x.shape[2], x.shape[3], self.num_directions)
        return q, y


@pytest.mark.parametrize("reduction", ["max", "sum"])
def test_exported_operators_follow_the_input_size(reduction):
    eager = ProjectBackproject(reduction)
    auto = torch.export.Dim.AUTO
    example = torch.rand(2, 1, 9, 12, 5)
    program = torch.export.export(eager, (example,), dynamic_shapes=({2: auto, 3: auto, 4: auto},), strict=False)
    exported = program.module()
    for shape in [(2, 1, 9, 12, 5), (2, 1, 17, 6, 3), (2, 1, 30, 31, 2)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
        # the exported graph holds the pure-PyTorch operators: compared with those, bit for bit
        # (the fused kernels agree with them to rounding, tests/test_fused.py)
        with fused.disabled():
            (q, y), (q_ref, y_ref) = exported(x), eager(x)
        assert q.shape == q_ref.shape and y.shape == y_ref.shape
        if reduction == "max":  # the same operations per element: the same bits
            assert torch.equal(q, q_ref) and torch.equal(y, y_ref)
        else:  # the ray sums add in another order
            torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

