"""The readers behind ``data.source``, one module per input format.

* ``digits`` (:mod:`~convpipe.data.readers.digits`): scikit-learn's bundled 8x8 digits.
* ``imagefolder`` (:mod:`~convpipe.data.readers.imagefolder`): one folder of image files
  per class, optionally inside ``train``/``val``/``test`` folders.
* ``mnist_idx`` (:mod:`~convpipe.data.readers.mnist_idx`): the four MNIST IDX files, raw or
  gzipped.
* ``cifar`` (:mod:`~convpipe.data.readers.cifar`): the python versions of CIFAR-10 or
  CIFAR-100.
* ``csv`` (:mod:`~convpipe.data.readers.csv_table`): one image per row, ``label,p0,p1,...``.

:mod:`~convpipe.data.readers.base` holds what they share: the :class:`ImageReader`
implementations and the helpers that check ``data.path`` and assemble a
:class:`~convpipe.data.raw.RawDataset`. :func:`convpipe.data.sources.open_source` picks the
reader.
"""
