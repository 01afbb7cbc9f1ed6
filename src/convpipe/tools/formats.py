"""The output formats of the user tools, declared once for the tools and the CLI's choices.

Kept free of torch so that building the ``convpipe`` argument parser stays quick.
"""

from __future__ import annotations

__all__ = ["EXPORT_SUFFIXES", "PREDICT_FORMATS", "SUMMARY_FORMATS"]

#: ``convpipe summary --format``: an aligned table, or JSON rows
SUMMARY_FORMATS = ("table", "json")

#: ``convpipe predict --format`` (see :func:`convpipe.tools.predict.format_predictions`)
PREDICT_FORMATS = ("table", "csv", "json")

#: ``convpipe export --format``, each with the suffix its default output file gets
EXPORT_SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
