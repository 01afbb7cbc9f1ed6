"""The data sources of the prepare stage: ``data.source`` + ``data.path`` -> :class:`RawDataset`.

Five sources are supported, each read by one module of :mod:`convpipe.data.readers`:

* ``digits``: scikit-learn's bundled 8x8 digits (no download, no path).
* ``imagefolder``: ``path/<class>/**/<image>`` or ``path/{train,val,test}/<class>/...``.
* ``mnist_idx``: the four MNIST IDX files, raw or gzipped.
* ``cifar``: the python versions of CIFAR-10 or CIFAR-100 (read through a restricted unpickler).
* ``csv``: one image per row, ``label,p0,p1,...`` (Kaggle MNIST style).

Sources only *find* images and labels; decoding happens later through each split's
:class:`~convpipe.data.raw.ImageReader`. Everything a user can get wrong (a missing folder, a
bad magic number, a short row) raises one :class:`~convpipe.errors.ConvpipeError` naming the
file or folder, what was expected and what to do.
"""

from __future__ import annotations

from collections.abc import Callable

from convpipe.config.schema import DataParams
from convpipe.data.raw import RawDataset
from convpipe.data.readers.cifar import open_cifar
from convpipe.data.readers.csv_table import open_csv
from convpipe.data.readers.digits import open_digits
from convpipe.data.readers.imagefolder import open_imagefolder
from convpipe.data.readers.mnist_idx import open_mnist_idx
from convpipe.errors import ConvpipeError


def open_source(params: DataParams) -> RawDataset:
    """Find the images and labels ``params.source`` and ``params.path`` describe.

    Args:
        params: The ``data`` section of ``params.yaml``.

    Returns:
        Class names and one split per split present in the data (``all`` when the data
        has none). Labels are int64 in ``0 .. len(class_names) - 1``.

    Raises:
        ConvpipeError: for a missing or malformed source, naming the file or folder.
    """
    if params.source == "digits":
        return open_digits()
    if not params.path:
        raise ConvpipeError(
            f"data.path is required for data.source '{params.source}', got null",
            "in params.yaml",
            "set data.path to the dataset's file or folder",
        )
    openers: dict[str, Callable[[str], RawDataset]] = {
        "imagefolder": open_imagefolder,
        "mnist_idx": open_mnist_idx,
        "cifar": open_cifar,
        "csv": lambda path: open_csv(path, params.csv.image_shape, params.csv.label_column),
    }
    return openers[params.source](params.path)
