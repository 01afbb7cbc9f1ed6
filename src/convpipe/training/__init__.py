"""The train stage: a Trainer built from params, early stopping, checkpoints, MLflow.

:func:`train` is the one function ``pipelines/train.py`` calls. It trains on the prepared +
augmented data, tests the best checkpoint, and writes the DVC outputs named in ``paths:``.

The MLflow run gets, once each: a name saying what it is (the DVC experiment's, see
:func:`convpipe.tracking.provenance.run_name`), every resolved param (``train.lr``,
``model.conv``, ...)
plus the values derived from the data (``derived.*``), tags naming the code, data and DVC
experiment (git commit, dirty flag, ``dvc.lock`` hashes, ``dvc.exp_name``), its input datasets,
per-epoch metrics (stepped by epoch), the test metrics of the best checkpoint, and the
artifacts ``params.yaml`` (resolved, URIs masked), the data manifests, the model and the
history. ``metrics/train.json`` records the run's id, so DVC's side leads to it. Whatever
fails after the run is opened marks it FAILED (KILLED on an interrupt): no run is ever left
RUNNING.

Modules: ``run`` (:func:`~convpipe.training.run.train`, the train stage's work),
``trainer`` (the Lightning Trainer and its callbacks from ``train:``), ``callbacks``
(per-epoch history and learning rate), ``resume`` (continuing an interrupted training) and
``preemption`` (scheduler signals: save the batch reached, requeue on SLURM). The MLflow run
itself is :mod:`convpipe.tracking.runs`'.
"""
