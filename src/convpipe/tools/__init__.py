"""The user tools: looking at, using and exporting a model outside the DVC stages.

``summary`` (``convpipe summary``: per-layer shapes, parameters and receptive fields),
``predict`` (``convpipe predict``: image files through the trained checkpoint), ``export``
(``convpipe export``: pt2, ONNX or TorchScript, checked against the checkpoint) and
``feature_maps`` (``convpipe feature-maps``: one image through every layer, as a picture).
They depend on ``models`` and ``data``, never on the stages.
"""
