"""DVC stage ``train``: fit the CNN, test its best checkpoint, track the run in MLflow."""

from convpipe.config.schema import Params
from convpipe.stage import log, run_stage
from convpipe.training.run import train


def train_stage(params: Params) -> None:
    """Train and write the model, metrics, per-epoch history and MLflow run id."""
    result = train(params)
    log.info("trained: %s (MLflow run %s)", result.metrics, result.run.run_id)


if __name__ == "__main__":
    run_stage(train_stage)
