"""Recipes: overlays of ``params.yaml`` that hold only the keys they change.

A recipe (``params/mnist.yaml``) is a partial params tree whose every key carries a comment
saying why it differs. ``convpipe recipe params/mnist.yaml`` writes it into ``params.yaml``
in place: each listed value (a scalar, or a whole list such as ``model.conv``) replaces the
one there, every other line and comment stays, and the result is validated before it is
written. ``git checkout params.yaml`` undoes it.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from convpipe.config.schema import Params, parse_params, read_yaml
from convpipe.errors import ConvpipeError
from convpipe.io import write_text


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Each dotted key of ``tree`` whose value is not a mapping, with that value."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=2, offset=0)  # params.yaml's own layout
    return yaml


def _read_recipe(recipe: Path) -> Mapping[str, Any]:
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
    return tree


def _set(tree: Any, key: str, value: Any, recipe: Path) -> None:
    """``tree[...][last] = value`` for dotted ``key``, which ``tree`` must already have."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts):
        if not isinstance(node, MutableMapping) or part not in node:
            choices = [str(k) for k in node] if isinstance(node, Mapping) else []
            close = difflib.get_close_matches(part, choices, n=1)
            hint = f"did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            raise ConvpipeError(
                f"unknown key '{key}'",
                f"in recipe {recipe}",
                hint or "a recipe may only change keys params.yaml has",
            )
        if depth == len(parts) - 1:
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


def apply_recipe(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> list[str]:
    """Write ``recipe``'s values into ``params_file``, keeping the rest of it as it is.

    Args:
        recipe: The overlay file.
        params_file: The params file to change (``params.yaml``).

    Returns:
        The dotted keys whose value changed.

    Raises:
        ConvpipeError: a key the params file does not have, or a result the schema refuses;
            the params file is then left untouched.
    """
    recipe, params_file = Path(recipe), Path(params_file)
    overlay = dict(leaves(_read_recipe(recipe)))
    read_yaml(params_file)  # one clear line for a missing or broken params file
    yaml = _round_trip()
    tree = yaml.load(params_file.read_text(encoding="utf-8"))
    current = dict(leaves(tree))
    for key, value in overlay.items():
        _set(tree, key, value, recipe)
    out = io.StringIO()
    yaml.dump(tree, out)
    text = out.getvalue()
    parse_params(read_yaml_text(text), f"{params_file} with recipe {recipe}")
    write_text(params_file, text)
    return [key for key, value in overlay.items() if current.get(key) != value]


def read_yaml_text(text: str) -> Any:
    """``text`` parsed as plain YAML data (no round-trip types)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:  # a ruamel round-trip fault: say so rather than show a traceback
        first = " ".join(str(exc).split())[:200]
        raise ConvpipeError(
            f"applying the recipe gave invalid YAML ({first})",
            "in the params file",
            "report this; set the recipe's values by hand meanwhile",
        ) from None


def overlaid(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> Any:
    """The plain params tree ``params_file`` would hold with ``recipe`` applied (unchecked)."""
    base = read_yaml(params_file)
    for key, value in leaves(_read_recipe(Path(recipe))):
        _set(base, key, value, Path(recipe))
    return base


def load_with_recipe(recipe: str | os.PathLike[str], params_file: str | os.PathLike[str]) -> Params:
    """The params ``params_file`` would hold with ``recipe`` applied (nothing is written)."""
    return parse_params(overlaid(recipe, params_file), f"{params_file} with recipe {recipe}")
