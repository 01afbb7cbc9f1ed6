"""``convpipe predict``'s output: predictions as an aligned table, CSV or JSON.

The predicting itself is :mod:`convpipe.inference.predict`'s.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from convpipe.inference.predict import Prediction
from convpipe.tools.formats import PREDICT_FORMATS
from convpipe.tools.summary import render_table

FORMATS = PREDICT_FORMATS


def _csv_text(predictions: Sequence[Prediction], k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    ranks = range(1, k + 1)
    writer.writerow(
        ["path", *(f"{what}_{r}" for r in ranks for what in ("class", "probability")), "error"]
    )
    for pred in predictions:
        cells: list[str] = []
        for r in ranks:
            pair = pred.top[r - 1] if r <= len(pred.top) else None
            cells += [pair[0], f"{pair[1]:.6f}"] if pair else ["", ""]
        writer.writerow([pred.path, *cells, pred.error or ""])
    return out.getvalue()


def _json_text(predictions: Sequence[Prediction]) -> str:
    rows = [
        {
            "path": pred.path,
            "predictions": [{"class": name, "probability": p} for name, p in pred.top],
            "error": pred.error,
        }
        for pred in predictions
    ]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def _table_text(predictions: Sequence[Prediction], k: int) -> str:
    headers = ["file", *(f"top {r}" for r in range(1, k + 1))]
    rows = [
        [pred.path, f"ERROR: {pred.error}"]
        if pred.error is not None
        else [pred.path, *(f"{name} {p:.4f}" for name, p in pred.top)]
        for pred in predictions
    ]
    return render_table(headers, rows)


def format_predictions(predictions: Sequence[Prediction], fmt: str, top_k: int) -> str:
    """Render predictions.

    Args:
        predictions: From :func:`predict_files`.
        fmt: ``table`` (aligned text, ``name probability`` per rank, ``ERROR: reason`` for a
            failed file), ``csv`` (``path,class_1,probability_1,...,class_k,probability_k,error``)
            or ``json`` (a list of ``{"path", "predictions": [{"class", "probability"}],
            "error"}``).
        top_k: Ranks to show (columns of the table and the CSV).

    Returns:
        The text, ending with a newline.

    Raises:
        ValueError: For an unknown ``fmt``.
    """
    k = max((len(p.top) for p in predictions), default=0) or top_k
    if fmt == "csv":
        return _csv_text(predictions, k)
    if fmt == "json":
        return _json_text(predictions)
    if fmt == "table":
        return _table_text(predictions, k)
    raise ValueError(f"unknown format {fmt!r}, expected one of {FORMATS}")
