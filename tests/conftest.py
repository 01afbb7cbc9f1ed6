"""Shared fixtures: the repo root, params loaded from the shipped params.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from convpipe.config import Params, parse_params, read_yaml, set_dotted

ROOT = Path(__file__).resolve().parents[1]

#: One small conv block (4 filters, same padding, batch norm, 2x2 max pooling): fast tests.
TINY_CONV = [
    {
        "filters": 4,
        "kernel": 3,
        "stride": 1,
        "padding": "same",
        "activation": "relu",
        "batch_norm": True,
        "pool": "max",
        "pool_size": 2,
    }
]


@pytest.fixture(scope="session")
def raw_params() -> dict[str, Any]:
    """The shipped params.yaml as a plain dict (copy it before changing it)."""
    return read_yaml(ROOT / "params.yaml")


@pytest.fixture
def make_params(raw_params: dict[str, Any]):
    """Build Params from the shipped file with dotted-key overrides: make_params(**{"a.b": 1})."""

    def build(overrides: dict[str, Any] | None = None, **kw: Any) -> Params:
        raw = copy.deepcopy(raw_params)
        for key, value in {**(overrides or {}), **kw}.items():
            set_dotted(raw, key, value)
        return parse_params(raw)

    return build
