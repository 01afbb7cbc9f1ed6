"""Image transforms: train-time augmentation, previews of it, and the model's input.

Images in convpipe are uint8 arrays of shape ``(N, H, W, C)`` with ``C`` = 1 or 3. The package
turns the ``augment:`` section of ``params.yaml`` into an albumentations 2.0.x pipeline that
keeps every image's ``(H, W, C)``, and converts batches to the normalised float32
``(N, C, H, W)`` tensors the model reads. One module per job:

* :mod:`.factory`: builds the seeded pipeline from params, reseeds it, saves and loads it.
* :mod:`.apply`: runs it on one image, or offline over a dataset in bounded-memory chunks.
* :mod:`.preview`: the preview grid of originals next to augmented copies, written as PNG.
* :mod:`.batched`: runs it online as batched tensor ops (:class:`~.batched.TensorAugmentation`),
  built from :mod:`.batched_ops`, :mod:`.batched_geometry` and :mod:`.batched_photometric`.
* :mod:`.normalize`: what the model sees, :class:`~.normalize.BatchTransform` (optional online
  augmentation, then normalisation) and :func:`~.normalize.normalize_batch`.
"""

import os

# albumentations asks PyPI for a newer release when it is imported (a network call with a 2 s
# timeout); convpipe never touches the network at run time. Every submodule that imports
# albumentations runs this package first, so opting out here covers all of them.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
