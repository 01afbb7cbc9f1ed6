"""DVC stage ``augment``: seeded augmented copies of the prepared train split, and a preview."""

from convpipe.config.schema import Params
from convpipe.data.augment import write_augmented
from convpipe.stage import log, run_stage


def augment(params: Params) -> None:
    """Materialise ``augment.copies`` augmented copies and ``paths.augment_preview``."""
    manifest = write_augmented(params)
    log.info(
        "augmented %d train images (%d copies), preview in %s",
        manifest.splits["train"].count,
        params.augment.copies,
        params.paths.augment_preview,
    )


if __name__ == "__main__":
    run_stage(augment)
