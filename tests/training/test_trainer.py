"""training/trainer.py: the monitors train.monitor may name are the metrics training logs."""

from __future__ import annotations

import pytest

from convpipe.training.trainer import MONITOR_MODES, MONITORS
from tests.helpers.models import QUIET_LIGHTNING, classifier, loader, trainer

pytestmark = QUIET_LIGHTNING


def test_the_monitors_are_exactly_the_epoch_metrics_a_fit_logs(params) -> None:
    module = classifier(params, num_classes=3)
    fit = trainer(max_steps=-1, max_epochs=1)
    fit.fit(module, loader(3), loader(3))
    logged = {key for key in fit.callback_metrics if key.startswith(("train/", "val/"))}
    # val/count is the number of validation images (proof that DDP counts each once): logged,
    # never a quality to monitor
    assert logged - {"val/count"} == set(MONITORS) and "val/count" in logged


@pytest.mark.parametrize("key", MONITORS)
def test_each_monitor_has_the_direction_it_improves_in(key: str) -> None:
    assert MONITOR_MODES[key] == ("max" if key.endswith("/acc") else "min")
