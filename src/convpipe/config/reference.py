"""The params reference page (``docs/params.md``), generated from the schema and ``params.yaml``.

Every key of ``params.yaml`` gets a row: its type and range (from the typed schema), its
shipped value, the comment written beside it in ``params.yaml`` and the DVC stages that read it
(from ``dvc.yaml``'s ``params:`` lists). Nothing is written twice: change the schema or a
comment and ``make docs`` regenerates the page; a test fails while the page is stale.

Usage: ``python -m convpipe.config.reference docs/params.md``
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from convpipe.config.schema import DEFAULT_PARAMS, Params
from convpipe.io import write_text

# Who reads the keys no DVC stage lists.
OTHER_READERS = {
    "tune": "`convpipe tune`",
    "paths": "`dvc.yaml` (`${paths.*}`) and the stages",
    "runtime": "train (speed only: never changes what is learnt)",
}

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


@dataclass(frozen=True)
class Row:
    """One key of the reference."""

    key: str
    kind: str
    value: str
    comment: str
    stages: str


def _bounds(metadata: Sequence[Any]) -> list[str]:
    out = []
    for item in metadata:
        for constraint in getattr(item, "metadata", [item]):
            for name, sign in _BOUNDS:
                if getattr(constraint, name, None) is not None:
                    out.append(f"{sign} {getattr(constraint, name)}")
    return out


def _plain(annotation: Any) -> tuple[Any, list[str]]:
    """The annotation without ``Annotated``, and its bounds as text (``≥ 0``, ``< 1``)."""
    bounds: list[str] = []
    while get_origin(annotation) is Annotated:
        annotation, *meta = get_args(annotation)
        bounds += _bounds(meta)
    return annotation, bounds


def describe_type(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A short reading of a field's type: ``float ≥ 0, < 1``, ``one of a | b``, ``int or empty``.

    Args:
        annotation: The field's type (pydantic keeps ``Annotated`` bounds in ``metadata``).
        metadata: The field's constraints (``FieldInfo.metadata``).
    """
    annotation, bounds = _plain(annotation)
    bounds = _bounds(metadata) + bounds
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(describe_type(a) for a in options)
        return text + (" or empty" if len(options) < len(get_args(annotation)) else "")
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return f"list of {describe_type(item)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    name = getattr(annotation, "__name__", str(annotation))
    return name + (" " + ", ".join(bounds) if bounds else "")


def _comment(node: Any, key: str) -> str:
    items = getattr(getattr(node, "ca", None), "items", {})
    tokens = items.get(key) or []
    for token in tokens[2:3] if len(tokens) > 2 else []:
        if token is not None:
            return " ".join(token.value.strip().lstrip("#").split())
    return ""


def _value(value: Any) -> str:
    if value is None:
        return "*(empty)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Mapping | list):
        return "*(see below)*" if isinstance(value, Mapping) else f"*({len(value)} items)*"
    return f"`{value}`"


def _walk(node: Any, model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, Any, str]]:
    """``(key, type text, value, comment)`` for every key under ``node``, in schema order."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = node.get(name) if isinstance(node, Mapping) else None
        comment = _comment(node, name) or " ".join((field.description or "").split())
        yield key, describe_type(field.annotation, field.metadata), value, comment
        plain, _ = _plain(field.annotation)
        if get_origin(plain) is dict and isinstance(value, Mapping):  # tune.space: any key
            for entry, dim in value.items():
                shown = ", ".join(f"{k}: {v}" for k, v in dim.items())
                yield f"{key}.{entry}", "search dimension", f"`{{{shown}}}`", ""
            continue
        inner = plain
        if get_origin(plain) is list:
            inner = (get_args(plain) or (None,))[0]
        elif get_origin(plain) in (typing.Union, types.UnionType):
            inner = next((a for a in get_args(plain) if isinstance(a, type)), None)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and not _dims(inner):
            if get_origin(plain) is list:
                first = value[0] if isinstance(value, list) and value else {}
                yield from _walk(first, inner, f"{key}[].")
            elif isinstance(value, Mapping):
                yield from _walk(value, inner, f"{key}.")


def _dims(model: type[BaseModel]) -> bool:
    # tune.space maps any key to a search dimension: described on the tuning page
    return model.__name__.endswith("Dim")


def stages_reading(dvc_yaml: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{params prefix: [stage, ...]}`` from ``dvc.yaml``'s ``params:`` lists."""
    readers: dict[str, list[str]] = {}
    for stage, spec in dvc_yaml.get("stages", {}).items():
        for entry in spec.get("params", []):
            for name in entry if isinstance(entry, Mapping) else [entry]:
                readers.setdefault(str(name), []).append(stage)
    return readers


def _who(key: str, readers: Mapping[str, list[str]]) -> str:
    plain = key.replace("[]", "")
    found = sorted(
        {
            s
            for p, stages in readers.items()
            if plain == p or plain.startswith(p + ".")
            for s in stages
        }
    )
    if found:
        return ", ".join(found)
    return OTHER_READERS.get(plain.split(".")[0], "—")


def reference_rows(params_path: Path, dvc_path: Path) -> list[Row]:
    """Every key of ``params_path`` with its type, value, comment and readers."""
    yaml = YAML()
    data: CommentedMap = yaml.load(params_path.read_text(encoding="utf-8"))
    readers = stages_reading(yaml.load(dvc_path.read_text(encoding="utf-8")))
    return [
        Row(
            key,
            kind,
            value if kind == "search dimension" else _value(value),
            comment,
            _who(key, readers),
        )
        for key, kind, value, comment in _walk(data, Params, "")
    ]


HEADER = """# Parameters reference

Every key of `params.yaml`: its type and range (from the typed schema,
`src/convpipe/config/schema.py`), the shipped value, the comment beside it in `params.yaml`, and
the DVC stages that read it (a change reruns them). Generated by `make docs`
(`python -m convpipe.config.reference docs/params.md`); a test fails while it is stale.
`model.conv[].*` and `model.stages[].*` are the keys of each list item.

`params.yaml` is the single source of every value. It is validated on load: an unknown key stops
the stage with a did-you-mean (`unknown key 'train.lrr', did you mean 'train.lr'?`), a wrong type
or range names the key, what was expected and what was received (`convpipe validate` checks the
file without running anything). Change a value for one experiment without editing the file with
`dvc exp run -S train.lr=0.01`, or edit `params.yaml` and `dvc repro`; `dvc params diff` shows
what changed. Recipes (`params/*.yaml`) are overlays: `convpipe recipe params/photos.yaml` writes
their values in, keeping every comment.

"""


def render(params_path: Path, dvc_path: Path) -> str:
    """The reference page as Markdown: one table per section."""
    rows = reference_rows(params_path, dvc_path)
    out = [HEADER]
    section = None
    for row in rows:
        top = row.key.split(".")[0]
        if top != section:
            section = top
            out.append(f"\n## `{top}`\n\n| key | type | value | what it is | read by |\n")
            out.append("|---|---|---|---|---|\n")
        if row.key == top:
            continue
        comment = row.comment.replace("|", "\\|")
        out.append(f"| `{row.key}` | {row.kind} | {row.value} | {comment} | {row.stages} |\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the path given (``docs/params.md``)."""
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0] if args else "docs/params.md")
    write_text(target, render(Path(DEFAULT_PARAMS), Path("dvc.yaml")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
