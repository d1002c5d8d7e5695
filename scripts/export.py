"""ONNX export with the bundle's metadata inside, as ``ckpt_export`` puts it into a TorchScript file.

MONAI's ``onnx_export`` writes the graph only; :func:`onnx_export` runs it and then
:func:`embed_metadata` stores ``metadata.json`` and the config files as the model's metadata
properties (``metadata_props``: ``"metadata.json"`` and ``"inference.json"`` hold the files' JSON,
``"version"`` the bundle's version), so an ONNX file carries what it is, which version, how it was
trained and how its input must be prepared. onnxruntime reads them without the bundle::

    onnxruntime.InferenceSession("models/model.onnx").get_modelmeta().custom_metadata_map["metadata.json"]

Command line (the arguments of ``python -m monai.bundle onnx_export``)::

    python -m scripts.export onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json ...
    python -m scripts.export embed_metadata --filepath models/model.onnx   # a file exported before
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["embed_metadata", "read_metadata", "onnx_export"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_META = os.path.join(_ROOT, "configs", "metadata.json")
_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "inference.json")


def _files(value: str | Sequence[str] | None, default: str) -> list[str]:
    if value is None:
        return [default]
    return [value] if isinstance(value, str) else list(value)


def embed_metadata(filepath: str, meta_file: str | Sequence[str] | None = None,
                   config_file: str | Sequence[str] | None = None) -> dict[str, str]:
    """Store the bundle's metadata and configs in the ONNX file ``filepath`` (its ``metadata_props``); returns them.

    Args:
        filepath: an ONNX model.
        meta_file: ``metadata.json`` (several are merged in order, as MONAI does); the bundle's by default.
        config_file: the config files to store, each under its file name (``inference.json``); the bundle's
            ``inference.json`` by default.

    Raises:
        FileNotFoundError: ``filepath`` or a metadata or config file does not exist.
        ValueError: two config files with the same name.
    """
    import onnx
    from monai.bundle import ConfigParser

    if not os.path.isfile(filepath):
        raise FileNotFoundError(f"no ONNX file {filepath} to add metadata to.")
    metas = _files(meta_file, _DEFAULT_META)
    for path in metas + _files(config_file, _DEFAULT_CONFIG):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file to embed in {filepath}: {path}")
    metadata = ConfigParser.load_config_files(metas)
    props = {"metadata.json": json.dumps(metadata), "version": str(metadata.get("version", ""))}
    for path in _files(config_file, _DEFAULT_CONFIG):
        name = os.path.splitext(os.path.basename(path))[0] + ".json"
        if name in props:
            raise ValueError(f"two files named {name} to embed in {filepath}.")
        props[name] = json.dumps(ConfigParser.load_config_file(path))
    model = onnx.load(filepath)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    if metadata.get("description"):
        model.doc_string = str(metadata["description"])
    partial = f"{filepath}.{os.getpid()}.tmp"
    onnx.save(model, partial)
    os.replace(partial, filepath)
    return props


def read_metadata(filepath: str) -> dict[str, str]:
    """The metadata properties of an ONNX file (``{key: value}``)."""
    import onnx

    return {p.key: p.value for p in onnx.load(filepath, load_external_data=False).metadata_props}


def onnx_export(net_id: str | None = None, filepath: str | None = None, meta_file: str | Sequence[str] | None = None,
                config_file: str | Sequence[str] | None = None, **kwargs) -> None:
    """MONAI's ``onnx_export`` (same arguments), then :func:`embed_metadata` into the file it wrote."""
    from monai.bundle import onnx_export as monai_onnx_export

    monai_onnx_export(net_id=net_id, filepath=filepath, meta_file=meta_file, config_file=config_file, **kwargs)
    embed_metadata(str(filepath), meta_file=meta_file, config_file=config_file)


def main() -> None:
    import fire

    fire.Fire({"onnx_export": onnx_export, "embed_metadata": embed_metadata}, name="scripts.export",
              serialize=lambda result: None)


if __name__ == "__main__":
    main()
