"""What every DVC stage entry point shares: arguments, params loading, logging, failure.

``pipelines/<stage>.py`` files stay a few lines long: they define one function taking the
validated :class:`~convpipe.config.schema.Params` and hand it to :func:`run_stage`.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Callable, Sequence

from convpipe.config.schema import DEFAULT_PARAMS, Params, load_params
from convpipe.errors import entrypoint

log = logging.getLogger("convpipe")


def distributed_rank() -> int:
    """This process's global rank as the launcher (Lightning, torchrun, SLURM) announced it."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def setup_logging(debug: bool = False) -> None:
    """Log convpipe's own messages to stderr, one line each; leave other loggers alone."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s convpipe: %(message)s", "%H:%M:%S")
        )
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if distributed_rank() != 0:  # under DDP every rank runs the stage; rank 0 speaks for all
        log.setLevel(logging.WARNING)
    # Lightning 2.6 calls an API torch 2.13 deprecated; the warning is theirs, not the user's.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # data.format litdata: LitData's dataset shards itself over DataLoader workers, which
    # Lightning cannot see and warns that __len__ might be off with several of them.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def run_stage(stage: Callable[[Params], None], argv: Sequence[str] | None = None) -> None:
    """Parse the stage's arguments, load params, and run ``stage`` under :func:`entrypoint`."""
    parser = argparse.ArgumentParser(description=stage.__doc__)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file to read")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)

    @entrypoint
    def main() -> None:
        setup_logging(args.debug)
        stage(load_params(args.params))

    main()
