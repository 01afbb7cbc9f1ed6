"""The evaluate stage: test-split metrics, DVC plots and pictures, logged to the train run.

``metrics`` and ``plots`` are pure (tensors and arrays in, values or figures out);
:func:`convpipe.evaluation.evaluate.evaluate` is the one function that reads the checkpoint
and writes outputs.
"""
