"""MLflow: where runs go, what identifies them, and how stages find the run of a training.

The train stage opens the run (through Lightning's MLFlowLogger) and writes its id to
``paths.run_info``; the evaluate stage reads that file and logs into the same run. The
tracking URI is always passed explicitly, because MLFlowLogger would otherwise fall back to a
``file:`` store that MLflow ≥ 3.13 rejects.

Modules: ``store`` (the tracking store: its URI, reachability, errors, the password never
shown), ``runs`` (the training's run: opened, closed whatever happens, extended by evaluate),
``init_source`` (what ``model.init_from`` names), ``params`` (params.yaml as MLflow params),
``provenance`` (the tags, inputs and environment that identify a run) and, for the model
registry, ``pyfunc`` (the served model) and ``registry`` (versions and the champion alias).
"""
