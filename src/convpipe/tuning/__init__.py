"""Optuna tuning campaigns over params keys, on the validation split only.

Modules: ``space`` (what a trial samples, the sampler and pruner), ``storage`` (opening the
study's storage), ``liveness`` (heartbeats; failing the trials of dead workers), ``retry`` (a
stopped trial queued again, to go on from its checkpoint), ``campaign``
(the MLflow parent and child runs), ``objective`` (training one trial), ``reports`` (the
files and plots of a study), ``worker`` (:func:`~convpipe.tuning.worker.tune`, the loop one
worker runs) and ``apply`` (``convpipe tune --apply``: the best values into params.yaml).

A campaign is one Optuna study in ``tune.storage`` (sqlite, a journal file, or any RDB URL).
Each trial samples the keys of ``tune.space``, trains on the prepared + augmented data with a
pruning callback on ``train.monitor`` and returns the best validation value it reached; the
test split is never evaluated. Trials are driven with ``study.ask``/``study.tell`` by
:func:`tune`:

* ``tune.n_trials`` is the campaign total: a plain run continues the study until it holds that
  many COMPLETE + PRUNED trials (FAIL trials, diverged or killed, do not use the budget);
  ``n_trials=N`` runs exactly N more trials in this worker, whatever the study holds.
* Every running trial beats a heartbeat into its user attrs; a trial silent for three beats
  is marked FAIL (and its MLflow run closed) by the next worker that looks: at start, before
  each trial, and while it waits at its end. Such a trial, and one stopped by a preemption
  signal or Ctrl+C, is queued again and goes on from its ``last.ckpt`` in the same child run
  (:mod:`~convpipe.tuning.retry`).
* Trial *n* samples with a sampler seeded by ``base.seed + n``: a campaign is reproducible, a
  resumed one does not replay its points, and workers started at once never draw the same
  random start-up points.

MLflow gets one parent run per study (its id kept in the study's ``mlflow_run_id`` attribute,
so reruns and other workers nest under the same parent) and one child run per trial, tagged
with the trial's Optuna state.
"""
