"""DVC stage ``init``: which weights ``model.init_from`` names right now (train depends on it)."""

from convpipe.config.schema import Params
from convpipe.io import write_json
from convpipe.redact import mask
from convpipe.stage import log, run_stage
from convpipe.tracking.init_source import identify
from convpipe.tracking.store import tracking_uri


def init_stage(params: Params) -> None:
    """Write ``paths.init_source``: a file's sha256, or a registered version and its run."""
    source = params.model.init_from
    identity = identify(source, tracking_uri(params.mlflow) if source else "")
    if source is not None:
        identity["init_from"] = mask(source)
    write_json(params.paths.init_source, identity)
    log.info("init: %s", identity if source else "random weights (model.init_from is empty)")


if __name__ == "__main__":
    run_stage(init_stage)
