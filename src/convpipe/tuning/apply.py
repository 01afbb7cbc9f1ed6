"""``convpipe tune --apply``: the best trial's values written into the params file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from convpipe.config.schema import parse_params
from convpipe.errors import ConvpipeError
from convpipe.io import write_text

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

_NOT_PLAIN = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def yaml_scalar(value: Any) -> str:
    """``value`` as a YAML scalar that reads back the same in YAML 1.1 and 1.2."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _NOT_PLAIN:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _scalar_span(root: Any, key: str, path: Path) -> tuple[int, int]:
    """Start and end offsets of the scalar value of dotted ``key`` in a composed YAML doc."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode

    node = root
    for part in key.split("."):
        found = None
        if isinstance(node, MappingNode):
            found = next((v for k, v in node.value if k.value == part), None)
        if found is None:
            raise ConvpipeError(f"key '{key}' not found", f"in {path}", "add it to the file")
        node = found
    if not isinstance(node, ScalarNode):
        raise ConvpipeError(f"'{key}' is not a single value", f"in {path}", "edit it by hand")
    return node.start_mark.index, node.end_mark.index


def _replace(text: str, start: int, end: int, new: str) -> str:
    """``text[start:end]`` replaced by ``new``, keeping the column of a trailing comment."""
    rest = text[end:]
    gap = len(rest) - len(rest.lstrip(" "))
    if gap and rest[gap:].startswith("#"):
        rest = " " * max(1, gap + (end - start) - len(new)) + rest[gap:]
    return text[:start] + new + rest


def apply_best(study: optuna.Study, params_file: str | Path) -> dict[str, Any]:
    """Write the best trial's values into ``params_file``, changing nothing else in it.

    Only the characters of each tuned value are replaced: comments, order, quoting and
    layout stay as they were. The result is validated before it is written.

    Returns:
        The values written (floats rounded to 6 significant digits).

    Raises:
        ConvpipeError: if the study has no complete trial yet, or the result is not valid.
    """
    from ruamel.yaml import YAML

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConvpipeError(
            f"study '{study.study_name}' has no complete trial", "", "run convpipe tune first"
        )
    values = {
        k: float(f"{v:.6g}") if isinstance(v, float) else v
        for k, v in study.best_trial.params.items()
    }
    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    root = YAML().compose(text)
    spans = sorted(((*_scalar_span(root, k, path), k) for k in values), reverse=True)
    for start, end, key in spans:  # from the end, so earlier offsets stay valid
        text = _replace(text, start, end, yaml_scalar(values[key]))
    parse_params(YAML(typ="safe", pure=True).load(text), str(path))
    write_text(path, text)
    return values
