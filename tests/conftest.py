"""Shared fixtures: the shipped params.yaml, raw and validated with overrides.

Helpers (factories, tiny models, data generators, servers, project copies) live in
:mod:`tests.helpers`; fixtures only here, and the one hook that orders the test files.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one xdist worker per core: a worker, and every process its tests start,
    # then computes on one thread, as two busy OpenMP pools on two cores slow each other
    # down far more than they gain. Set before torch is imported anywhere in the worker.
    os.environ["OMP_NUM_THREADS"] = "1"

from convpipe.config.edit import set_dotted
from convpipe.config.schema import Params, parse_params, read_yaml
from tests.helpers.project import ROOT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files with the most ``slow`` tests first, each file's tests in their own order.

    ``make test`` gives each xdist worker whole files (``--dist loadfile``), in the order
    collected: the end-to-end files, minutes each, first, and the many short unit files
    after them even the workers out at the end, instead of one worker finishing a long
    journey alone while the other waits.
    """
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's own order kept


@pytest.fixture(scope="session", autouse=True)
def _own_precision_cache(tmp_path_factory) -> Iterator[None]:
    """Measured precision verdicts go to a folder of this session, never the user's cache.

    Set in the environment, so the pipelines tests start as subprocesses use it too.
    """
    from convpipe.training.precision import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("precision-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


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


@pytest.fixture
def params(make_params) -> Params:
    """The shipped params, validated."""
    return make_params()


@pytest.fixture
def seeded() -> None:
    """torch's global RNG seeded (``pytest.mark.usefixtures("seeded")`` for a whole module)."""
    import torch

    torch.manual_seed(0)
