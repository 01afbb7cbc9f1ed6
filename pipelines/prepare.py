"""DVC stage ``prepare``: read ``data.source``, split it and write ``paths.prepared``."""

from convpipe.config.schema import Params
from convpipe.data.prepare import write_prepared
from convpipe.data.sources import open_source
from convpipe.stage import log, run_stage


def prepare(params: Params) -> None:
    """Probe, split, normalise and save the dataset with its manifest."""
    raw = open_source(params.data)
    manifest = write_prepared(raw, params.data, params.base.seed, params.paths.prepared)
    counts = ", ".join(f"{k} {v.count}" for k, v in manifest.splits.items())
    log.info(
        "prepared %s: %d classes, %dx%dx%d, %s, %d skipped",
        manifest.source,
        manifest.num_classes,
        *manifest.image_size,
        manifest.channels,
        counts,
        manifest.skipped.count,
    )


if __name__ == "__main__":
    run_stage(prepare)
