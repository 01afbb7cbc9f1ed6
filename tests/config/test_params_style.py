"""params files are written as `dvc exp run -S` writes them back.

DVC applies ``-S key=value`` with Hydra and dumps the whole file again with ruamel.yaml: flow
lists become block lists, ``null`` becomes an empty value, comments inside a list and the blank
line after a section's last list are lost. A file already in that style comes back unchanged
but for the value set, so an experiment's diff of ``params.yaml`` is one line.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from convpipe.config.edit import apply_recipe
from convpipe.config.schema import load_params
from tests.helpers.project import ROOT

# params.yaml as shipped, and as each recipe leaves it
RECIPES = sorted((ROOT / "params").glob("*.yaml"))
PARAMS_FILES = ["params.yaml", *(f"params.yaml + {r.relative_to(ROOT)}" for r in RECIPES)]
# (override, the key's line after it): a scalar of each kind, in several sections
OVERRIDES = [
    ("train.lr=0.002", "  lr: 0.002"),
    ("model.dropout=0.5", "  dropout: 0.5"),
    ("base.seed=7", "  seed: 7"),
    ("train.optimizer=sgd", "  optimizer: sgd"),
    ("augment.copies=3", "  copies: 3"),
    ("tune.n_trials=5", "  n_trials: 5"),
]


def _params_copy(name: str, tmp_path: Path) -> Path:
    """``params.yaml`` (with the recipe ``name`` names applied) copied into ``tmp_path``."""
    copy = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", copy)
    if " + " in name:
        apply_recipe(ROOT / name.split(" + ")[1], copy)
    return copy


def _changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


@pytest.mark.parametrize("path", PARAMS_FILES)
@pytest.mark.parametrize(("override", "line"), OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_dvc_set_param_changes_only_that_line(
    path: str, override: str, line: str, tmp_path: Path
) -> None:
    copy = _params_copy(path, tmp_path)
    before = copy.read_text(encoding="utf-8")
    apply_overrides(copy, [override])
    changed = _changed_lines(before, copy.read_text(encoding="utf-8"))
    assert len(changed) == 2, "\n".join(changed)
    assert changed[0].startswith("-") and changed[1].startswith("+" + line)
    key, _, value = override.partition("=")
    section, name = key.split(".")
    loaded = load_params(copy)
    assert str(getattr(getattr(loaded, section), name)).lower() == value.lower()


@pytest.mark.parametrize("path", PARAMS_FILES)
def test_a_list_override_changes_only_that_list(path: str, tmp_path: Path) -> None:
    copy = _params_copy(path, tmp_path)
    before = copy.read_text(encoding="utf-8")
    apply_overrides(copy, ["augment.affine.scale=[0.8,1.2]"])
    changed = _changed_lines(before, copy.read_text(encoding="utf-8"))
    assert sorted(changed) == sorted(["-    - 0.9", "-    - 1.1", "+    - 0.8", "+    - 1.2"])
