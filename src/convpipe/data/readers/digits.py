"""The ``digits`` source: scikit-learn's bundled 8x8 digits (no download, no path)."""

from __future__ import annotations

import numpy as np

from convpipe.data.raw import ALL, RawDataset
from convpipe.data.readers.base import ArrayReader, labelled


def open_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits: 1797 images, classes ``"0"`` .. ``"9"``, split ``all``.

    The 0..16 intensities are scaled to 0..255 with ``round(v * 255 / 16)``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
    names = [str(name) for name in bunch.target_names]
    reader = ArrayReader(images, "sklearn-digits")
    return labelled("digits", names, {ALL: (bunch.target, reader)})
