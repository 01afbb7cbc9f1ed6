"""params.yaml as MLflow params: flattened, secrets masked, logged in batches."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from convpipe.config.edit import leaves
from convpipe.config.schema import Params

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

from convpipe.redact import mask

# MLflow limits: values per log_batch call, characters per param value
PARAMS_PER_BATCH = 100

MAX_PARAM_LENGTH = 6000


def params_for_mlflow(params: Params) -> dict[str, str]:
    """Every resolved param as ``{"train.lr": "0.003", ...}``, URIs masked.

    Lists (e.g. ``model.conv``) are one JSON value each; values are never truncated below
    MLflow's own limit.
    """
    out = {}
    for key, value in leaves(masked_params(params)):
        out[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _mask_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_tree(v) for v in value]
    return mask(value) if isinstance(value, str) and "://" in value else value


def masked_params(params: Params) -> dict[str, Any]:
    """``params`` as a plain nested mapping with every URL's password masked.

    Any string value that is a URL is masked, whatever its key (``mlflow.tracking_uri``,
    ``tune.storage``, ...), so no database password reaches a run or an artifact.
    """
    return dict(_mask_tree(params.model_dump(mode="json")))


def log_params(client: MlflowClient, run_id: str, values: Mapping[str, str]) -> None:
    """Log ``values`` as run params in batches of at most MLflow's 100 per request."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in values.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
