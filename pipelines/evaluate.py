"""DVC stage ``evaluate``: test-split metrics, plots and pictures, logged to the train run."""

from convpipe.config.schema import Params
from convpipe.evaluation.evaluate import evaluate
from convpipe.stage import log, run_stage


def evaluate_stage(params: Params) -> None:
    """Evaluate the best checkpoint on the test split."""
    metrics = evaluate(params)
    log.info("test accuracy %.4f on %d images", metrics["accuracy"], metrics["count"])


if __name__ == "__main__":
    run_stage(evaluate_stage)
