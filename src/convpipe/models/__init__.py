"""The CNN classifier: its shapes, its layers, how it is optimised, trained and stored.

Modules: ``shapes`` (each layer's output shape and parameter count by arithmetic, and the
checks of the data-derived inputs), ``network`` (the ``nn.Sequential`` built from
``params.model``, the lambda/m weight penalty, probabilities from logits), ``optim`` (the
optimiser and learning-rate scheduler ``params.train`` names), ``module`` (the LightningModule
``CNNClassifier`` and how it runs: threads, memory layout, compilation) and ``checkpoint``
(reading checkpoints without running code, writing them atomically, and ``load_model``, how
every command gets a trained model from a file).
"""
