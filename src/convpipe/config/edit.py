"""Writing into ``params.yaml``: the one way convpipe changes a params file.

Two commands write values into the file the user keeps under git: ``convpipe recipe
params/mnist.yaml`` (a recipe: a partial params tree whose every key carries a comment saying
why it differs) and ``convpipe tune --apply`` (the chosen trial's values). Both go through
:func:`write_values`: each value (a scalar, or a whole list such as ``model.conv``) replaces
the one there, every other line, comment and column stays, the result is validated by the
schema before it is written, and the write is atomic. ``git checkout params.yaml`` undoes it.

Dotted keys (``train.lr``) are set by :func:`set_dotted` and read by :func:`leaves`
wherever convpipe handles a params tree.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from convpipe.config.schema import Params, parse_params, parse_yaml, read_yaml
from convpipe.errors import ConvpipeError
from convpipe.io import write_text

__all__ = [
    "apply_recipe",
    "leaves",
    "load_with_recipe",
    "overlaid",
    "set_dotted",
    "to_yaml",
    "write_values",
    "yaml_float",
]


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each dotted key of ``tree`` whose value is not a mapping, with that value.

    Lists stay whole values (``model.conv`` is one leaf).
    """
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_dotted(
    tree: MutableMapping[str, Any], key: str, value: Any, where: str | None = None
) -> None:
    """``tree["train"]["lr"] = value`` for ``key="train.lr"``.

    On a round-trip (comment-keeping) tree, the comment on the key's line stays on it.

    Args:
        tree: A nested mapping (plain, or ruamel's round-trip one).
        key: The dotted key.
        value: Its new value.
        where: For an edit of the user's params, the source of ``key`` for the error line
            (``in recipe params/mnist.yaml``): the key must then already be in ``tree``, so a
            typo is refused rather than added. Without it (a tree being built to validate,
            as the tests do), the last part may be new; its parents must exist.

    Raises:
        ConvpipeError: If ``tree`` lacks the key (with ``where``) or a parent of it, naming
            the closest existing key.
    """
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        missing = not isinstance(node, MutableMapping) or part not in node
        if missing and not (last and where is None and isinstance(node, MutableMapping)):
            choices = [str(k) for k in node] if isinstance(node, Mapping) else []
            close = difflib.get_close_matches(part, choices, n=1)
            hint = f"did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            raise ConvpipeError(
                f"unknown key '{key}'",
                where or "in the params",
                hint or "only keys params.yaml has can be set",
            )
        if last:
            _replace(node, part, value)
        else:
            node = node[part]


def _replace(node: MutableMapping[str, Any], key: str, value: Any) -> None:
    """``node[key] = value``, keeping the key's comment on its line.

    A comment written after ``key:`` and before a block list belongs, for ruamel, in front of
    the list's items; an empty list is written ``[]`` on the key's own line, where ruamel
    would then drop the next line's line break. The comment becomes the line's own instead.
    """
    items = getattr(getattr(node, "ca", None), "items", {})
    comment = items.get(key)
    token = comment[2] if comment and len(comment) > 2 else None
    node[key] = value
    if token is not None and isinstance(value, list | dict) and not value:
        del items[key]
        text = token.value.split("\n")[0].strip()
        node.yaml_add_eol_comment(text, key, column=token.column)  # type: ignore[attr-defined]


def yaml_float(value: float) -> str:
    """``value`` as a YAML float that reads back the same in YAML 1.1 and 1.2.

    ``1e-05`` is a float in YAML 1.2 but a string in 1.1 (PyYAML), which wants a dot in the
    mantissa: ``1.0e-05``.
    """
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


#: Plain scalars YAML 1.1 (PyYAML) reads as booleans or null, but YAML 1.2 as strings
_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false", "null", "~"}


def _str(representer: Any, value: str) -> Any:
    if value.lower() in _YAML11_WORDS:  # a string here and in every reader: quote it
        return representer.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return representer.represent_str(value)


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=2, offset=0)  # params.yaml's own layout
    yaml.representer.add_representer(
        float, lambda rep, value: rep.represent_scalar("tag:yaml.org,2002:float", yaml_float(value))
    )
    yaml.representer.add_representer(str, _str)
    return yaml


def to_yaml(tree: Any) -> str:
    """``tree`` as params files are written: their layout, comments kept.

    Floats and strings are written so that YAML 1.1 and 1.2 readers read them back the same.
    """
    out = io.StringIO()
    _round_trip().dump(tree, out)
    return out.getvalue()


def write_values(
    params_file: str | os.PathLike[str], values: Mapping[str, Any], source: str
) -> list[str]:
    """Write dotted ``values`` into ``params_file``, keeping the rest of it as it is.

    Args:
        params_file: The params file to change (``params.yaml``).
        values: Dotted keys to their new values; each key must be in the file.
        source: Where the values come from, for error lines (``recipe params/mnist.yaml``).

    Returns:
        The dotted keys whose value changed.

    Raises:
        ConvpipeError: A key the params file does not have, or a result the schema refuses;
            the params file is then left untouched.
    """
    params_file = Path(params_file)
    read_yaml(params_file)  # one clear line for a missing or broken params file
    yaml = _round_trip()
    tree = yaml.load(params_file.read_text(encoding="utf-8"))
    current = dict(leaves(tree))
    for key, value in values.items():
        set_dotted(tree, key, value, f"in {source}")
    text = to_yaml(tree)
    parse_params(parse_yaml(text, f"{params_file} with {source}"), f"{params_file} with {source}")
    write_text(params_file, text)
    return [key for key, value in values.items() if current.get(key) != value]


def _read_recipe(recipe: Path) -> dict[str, Any]:
    if not recipe.is_file():
        shipped = ", ".join(str(p) for p in sorted(Path("params").glob("*.yaml")))
        raise ConvpipeError(
            f"recipe not found: {recipe}", "", f"name a recipe file ({shipped or 'params/*.yaml'})"
        )
    tree = read_yaml(recipe)
    if not isinstance(tree, Mapping) or not tree:
        raise ConvpipeError(
            f"recipe {recipe} holds no keys",
            "",
            "a recipe is a params tree with only the keys it changes",
        )
    return dict(leaves(tree))


def apply_recipe(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> list[str]:
    """Write ``recipe``'s values into ``params_file`` (see :func:`write_values`).

    Returns:
        The dotted keys whose value changed.

    Raises:
        ConvpipeError: A missing or empty recipe, a key the params file does not have, or a
            result the schema refuses; the params file is then left untouched.
    """
    return write_values(params_file, _read_recipe(Path(recipe)), f"recipe {recipe}")


def overlaid(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> Any:
    """The plain params tree ``params_file`` would hold with ``recipe`` applied (unchecked)."""
    base = read_yaml(params_file)
    for key, value in _read_recipe(Path(recipe)).items():
        set_dotted(base, key, value, f"in recipe {recipe}")
    return base


def load_with_recipe(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> Params:
    """The params ``params_file`` would hold with ``recipe`` applied (nothing is written)."""
    return parse_params(overlaid(recipe, params_file), f"{params_file} with recipe {recipe}")
