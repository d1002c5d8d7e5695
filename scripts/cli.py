"""What every ``monai.bundle run`` of this bundle does first: checked options, ``--help``, clear errors.

MONAI's parser takes any ``--id value`` pair and adds the id if no config defines it, so a typo
(``--max_epochs 1``, ``--eval_splt test``) would silently run the defaults, and ``--help`` would
start a training. Each config's ``initialize`` therefore begins with two expressions::

    "$sys.path.insert(0, os.path.abspath(@bundle_root)) if os.path.abspath(@bundle_root) not in sys.path else None",
    "$importlib.import_module('scripts.cli').setup()"

(no ``@`` reference in the second: MONAI parses any expression containing "import" as Python first). The first makes ``scripts`` importable from any working directory given ``--bundle_root``
(MONAI adds the bundle to ``sys.path`` only after ``initialize``); :func:`setup` then

- re-resolves the config's imports if they were evaluated before ``scripts`` could be found;
- with ``--help`` or ``--print_options``, prints the options and their values and exits, running nothing;
- rejects any id set on the command line (or passed as an override) that no config in the
  bundle's ``configs/`` defines, naming the closest valid ids (:class:`OverrideError`), before
  any data, network or file is touched;
- on the command line, prints expected user errors (a missing or bad dataset, checkpoint or
  option, an unreadable file: :func:`user_error`) as one paragraph instead of a traceback; ``--debug true`` or
  ``UNET25D_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
import types
from collections.abc import Iterator

__all__ = ["OverrideError", "SPECIAL_IDS", "DEBUG_ENV", "setup", "defined_ids", "unknown_ids",
           "closest_ids", "options_text", "user_error", "report_text"]

DEBUG_ENV = "UNET25D_DEBUG"
# command-line switches that this module reads; no config defines them
SPECIAL_IDS = ("help", "print_options", "debug")
_META = "_meta_"
_COMPONENT_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")


class OverrideError(ValueError):
    """An override id that no config of the bundle defines; the message names it and the closest valid ids."""


def _expected() -> tuple[type[BaseException], ...]:
    from scripts.checkpoint_io import CheckpointError, CheckpointNotFoundError
    from scripts.files import DatasetError, DatasetNotFoundError

    return OverrideError, DatasetError, DatasetNotFoundError, CheckpointError, CheckpointNotFoundError, PermissionError


def _walk(node, prefix: str = "") -> Iterator[str]:
    """Every id in a config: ``a``, ``a#b``, ``a#0#c``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        sub = f"{prefix}#{key}" if prefix else str(key)
        yield sub
        yield from _walk(value, sub)


def _config_files(config_dir: str) -> list[str]:
    return sorted(os.path.join(config_dir, f) for f in os.listdir(config_dir)
                  if f.endswith((".json", ".yaml", ".yml")) and f != "metadata.json" and not f.startswith("."))


def _nested(content: dict) -> dict:
    """A config file's content with its nested ids (``"validate#dataset": ...``) as nested dicts."""
    nested: dict = {}
    for key, value in content.items():
        parts = str(key).replace("::", "#").split("#")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return nested


def _definitions(config_dir: str) -> list[dict]:
    from monai.bundle import ConfigParser

    return [_nested(ConfigParser.load_config_file(f)) for f in _config_files(config_dir)]


def defined_ids(config_dir: str) -> set[str]:
    """Every id that some config in ``config_dir`` defines (``metadata.json`` aside)."""
    ids: set[str] = set()
    for content in _definitions(config_dir):
        ids.update(_walk(content))
    return ids


def _same_target(value, definitions: list) -> list:
    """The definitions ``value`` extends: all of them, or for a component those of its ``_target_`` and partial
    ones (a file's nested ids, ``"train#dataloader#sampler"``, define arguments without a ``_target_``)."""
    if isinstance(value, dict) and "_target_" in value:
        return [d for d in definitions if isinstance(d, dict) and d.get("_target_", value["_target_"]) == value["_target_"]]
    return definitions


def unknown_ids(config: dict, definitions: list[dict], allowed: tuple[str, ...] = ()) -> list[str]:
    """The ids of ``config`` that none of ``definitions`` has at the same place.

    A value that replaces a definition wholesale (another type, another component ``_target_``,
    a list entry past the defined ones) is the user's own and is not searched; MONAI's component
    keys (``_disabled_``, ``_requires_``, ...) are allowed on any component.

    Args:
        config: the config in use (the files merged, with the overrides).
        definitions: the contents of the bundle's config files.
        allowed: top-level ids to accept without a definition.
    """
    found = []

    def walk(node, defs: list, prefix: str) -> None:
        if isinstance(node, dict):
            dict_defs = [d for d in defs if isinstance(d, dict)]
            if not dict_defs:
                return
            for key, value in node.items():
                id_ = f"{prefix}#{key}" if prefix else str(key)
                if not prefix and (key in allowed or key == _META):
                    continue
                sub = [d[key] for d in dict_defs if key in d]
                if not sub:
                    if not (key in _COMPONENT_KEYS and "_target_" in node):
                        found.append(id_)
                    continue
                walk(value, _same_target(value, sub), id_)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                # a list entry is defined by a list, or by a file's nested id such as "train#handlers#3"
                sub = [d[i] for d in defs if isinstance(d, list) and i < len(d)]
                sub += [d[str(i)] for d in defs if isinstance(d, dict) and str(i) in d]
                walk(value, _same_target(value, sub), f"{prefix}#{i}")

    walk(config, definitions, "")
    return found


def closest_ids(id_: str, valid: set[str] | list[str], n: int = 3) -> list[str]:
    """Up to ``n`` valid ids closest to ``id_`` (difflib's ratio on the whole id, or on its last part for a short id)."""
    scores = []
    for candidate in valid:
        score = difflib.SequenceMatcher(None, id_, candidate).ratio()
        if "#" not in id_:
            score = max(score, difflib.SequenceMatcher(None, id_, candidate.rsplit("#", 1)[-1]).ratio())
        if score >= 0.6:
            scores.append((-score, len(candidate), candidate))
    return [c for _, _, c in sorted(scores)[:n]]


def _is_section(value) -> bool:
    """A run section (a list of expressions) or a nested section/component: not an option to list."""
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.startswith("$") for v in value)


def options_text(config: dict, config_dir: str) -> str:
    """The ``--help`` page: each top-level option with its value in this run, then the run sections."""
    options = {k: v for k, v in config.items() if k not in SPECIAL_IDS + (_META, "imports") and not _is_section(v)}
    runs = [k for k, v in config.items() if k not in ("imports",) and isinstance(v, list) and _is_section(v)]
    width = max((len(k) for k in options), default=0) + 2
    lines = [
        f"Options of this bundle run (defined in {config_dir}/). Set one with --<id> <value>, a nested "
        "one with # (--network_def#channels \"[16,32,64]\"); an id no config defines is refused. Values as in "
        "this run (expressions start with $, references with @):",
        "",
    ]
    lines += [f"  --{k.ljust(width)}{json.dumps(v)}" for k, v in options.items()]
    lines += ["", f"Run ids (python -m monai.bundle run <id> ...): {', '.join(runs)}",
              "Also: --print_options true (this page), --debug true (tracebacks for expected errors)."]
    return "\n".join(lines)


def _workflow():
    """The ``ConfigWorkflow`` whose ``initialize`` is running, or None (a config parsed without a workflow).

    A config expression has no name for the workflow or the parser that evaluates it, and :func:`setup` needs
    both (the raw config with the command line's overrides, the config folder). MONAI evaluates ``initialize``
    inside ``ConfigWorkflow.initialize``, so the workflow is the nearest ``self`` up the call stack that is one.
    The search only reads frames; outside a workflow (a config parsed by hand, a test) it finds none and
    :func:`setup` does nothing.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate
        frame = frame.f_back
    return None


def _as_bool(value) -> bool:
    from scripts.flags import as_flag

    return as_flag(value, "--debug") if value is not None else False


def user_error(error: BaseException) -> BaseException | None:
    """The expected user error in ``error``'s chain of causes, or None.

    Expected: :class:`OverrideError`, the dataset errors of :mod:`scripts.files`, the checkpoint errors of
    :mod:`scripts.checkpoint_io` and :mod:`scripts.checkpoints`, and ``PermissionError``.
    """
    expected, seen = _expected(), set()
    while error is not None and id(error) not in seen:
        if isinstance(error, expected):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_text(error: BaseException) -> str | None:
    """The paragraph the command line prints for ``error`` (an expected user error in its chain), or None."""
    found = user_error(error)
    if found is None:
        return None
    return f"{type(found).__name__}: {found}\n(For the traceback: --debug true or {DEBUG_ENV}=1.)\n"


def _install_excepthook(debug: bool) -> None:
    """On the command line, print an expected user error as one paragraph (and exit 1) instead of a traceback."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if debug or getattr(spec, "name", "") not in ("monai.bundle.__main__", "monai.bundle"):
        return
    if getattr(sys.excepthook, "user_error_report", False):
        return  # installed by an earlier workflow of this process
    previous = sys.excepthook

    def report(kind, value, traceback) -> None:
        text = report_text(value)
        if text is None:
            previous(kind, value, traceback)
        else:
            sys.stderr.write(text)

    report.user_error_report = True  # type: ignore[attr-defined]
    sys.excepthook = report


def setup() -> None:
    """Run first in every config's ``initialize``: imports, ``--help``, the override check and the error reports.

    Raises:
        OverrideError: an id no config defines.
        SystemExit: after printing the options for ``--help`` / ``--print_options``.
    """
    workflow = _workflow()
    if workflow is None:
        return
    parser = workflow.parser
    if not isinstance(parser.globals.get("scripts"), types.ModuleType):
        # the imports ran before bundle_root was on sys.path: resolve them again
        parser.parse(reset=True)
    config = parser.config
    bundle_root = str(parser.get_parsed_content("bundle_root")) if "bundle_root" in parser else "."
    debug = _as_bool(config.get("debug")) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    _install_excepthook(debug)
    from scripts.tracking import log_above_progress_bars

    log_above_progress_bars()
    config_dir = str(workflow.config_root_path)
    shown_dir = os.path.relpath(config_dir, os.path.abspath(bundle_root))
    if any(_as_bool(config.get(k)) for k in ("help", "print_options")):
        print(options_text(config, shown_dir))
        raise SystemExit(0)
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    tracking = tuple(k for settings in DEFAULT_EXP_MGMT_SETTINGS.values() for k in settings["configs"])
    unknown = unknown_ids(config, _definitions(config_dir), allowed=SPECIAL_IDS + tracking)
    if unknown:
        valid = defined_ids(config_dir)
        parts = []
        for id_ in unknown:
            close = closest_ids(id_, valid)
            hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""
            if "." in id_ or "/" in id_:  # a path: a value that starts with '-' is read as an option
                hint += f" (a value that starts with '-' is read as an option: write --<id>=-{id_})"
            parts.append(f"--{id_}{hint}")
        raise OverrideError(
            f"no config of this bundle ({shown_dir}/*.json) defines {'this id' if len(unknown) == 1 else 'these ids'}: "
            f"{'; '.join(parts)}. Nothing was run. --help lists the options."
        )
